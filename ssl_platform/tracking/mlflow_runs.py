"""MLflow tracking through ``MlflowClient`` (explicit run ids, so the driver and rank 0 share one run).

One run per training run: params = flattened resolved spec (secret-like keys dropped), metrics per epoch
with ``step=epoch``, tags (method, git commit, spec hash, checkpoint URI, Ray job id), the resolved spec and
the final encoder as artifacts. A resumed run (same run name) continues the same MLflow run.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ssl_platform.spec import dump_yaml, public_params, spec_hash

RUN_NAME_TAG = "ssl.run_name"
_MAX_PARAM_LEN = 6000


_READY_STORES: set[str] = set()


def client(tracking_uri: str):
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    if tracking_uri.startswith("sqlite:///") and tracking_uri not in _READY_STORES:
        return _create_sqlite_store_once(tracking_uri)
    return mlflow.MlflowClient(tracking_uri=tracking_uri)


def _create_sqlite_store_once(tracking_uri: str):
    """A client of a sqlite store, the store created / migrated under an exclusive file lock.

    MLflow creates the tables of a new sqlite store on first use; two processes doing that at once (two jobs
    submitted together, a sweep's first trials) fail with ``table ... already exists``. The first one to take the
    lock creates the store, the others then find it ready.
    """
    import fcntl

    import mlflow

    db = Path(tracking_uri[len("sqlite:///") :])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            c = mlflow.MlflowClient(tracking_uri=tracking_uri)
            c.search_experiments(max_results=1)  # first use: creates or migrates the tables
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    _READY_STORES.add(tracking_uri)
    return c


GIT_COMMIT_ENV = "SSL_PLATFORM_GIT_COMMIT"


def git_commit() -> str:
    """The commit of the code that runs: ``SSL_PLATFORM_GIT_COMMIT`` (set by ``submit``: a job's uploaded
    working_dir has no ``.git``), else ``git rev-parse HEAD`` of the repository holding this package."""
    if os.environ.get(GIT_COMMIT_ENV):
        return os.environ[GIT_COMMIT_ENV]
    return local_git_commit()


def local_git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False,
                             cwd=Path(__file__).resolve().parents[2])
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def experiment_id(c, name: str) -> str:
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            c.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    try:
        return c.create_experiment(name)
    except Exception:  # created concurrently
        return c.get_experiment_by_name(name).experiment_id


def find_run(c, exp_id: str, run_name: str) -> str | None:
    runs = c.search_runs([exp_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'", max_results=1)
    return runs[0].info.run_id if runs else None


@dataclass(frozen=True)
class SpecRecord:
    """What a training run's MLflow run records of its spec: the method's name and the spec's hash (tags), the
    checkpoint root (``checkpoint.uri``, for the ``checkpoint_uri`` tag), the params (the flattened resolved spec,
    secret-like keys dropped) and the redacted spec YAML (an artifact)."""

    method: str
    spec_hash: str
    checkpoint_root: str
    params: dict[str, Any]
    yaml: str

    @classmethod
    def of(cls, spec: DictConfig) -> SpecRecord:
        return cls(method=spec.method.name, spec_hash=spec_hash(spec), checkpoint_root=spec.checkpoint.uri.rstrip("/"),
                   params=public_params(spec), yaml=dump_yaml(spec))


def start_run(
    tracking: DictConfig,
    run_name: str,
    record: SpecRecord,
    *,
    resume: bool = False,
    parent_run_id: str | None = None,
    extra_tags: dict[str, str] | None = None,
) -> str:
    """Create (or, with ``resume``, reopen) the MLflow run of a training run in the store and experiment of the
    spec's ``tracking`` section; log params, tags and spec from ``record`` (:meth:`SpecRecord.of` the spec)."""
    c = client(tracking.uri)
    exp_id = experiment_id(c, tracking.experiment)
    if resume:
        existing = find_run(c, exp_id, run_name)
        if existing:
            c.update_run(existing, status="RUNNING")
            return existing
    tags = {
        RUN_NAME_TAG: run_name,
        "mlflow.runName": tracking.run_name or run_name,
        "method": record.method,
        "git_commit": git_commit(),
        "spec_hash": record.spec_hash,
        "checkpoint_uri": f"{record.checkpoint_root}/{run_name}",
    }
    job_id = os.environ.get("RAY_JOB_ID") or os.environ.get("RAY_JOB_SUBMISSION_ID")
    if job_id:
        tags["ray_job_id"] = job_id
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    tags.update(extra_tags or {})
    run = c.create_run(exp_id, tags=tags, run_name=tracking.run_name or run_name)
    log_params(c, run.info.run_id, record.params)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "spec.yaml"
        path.write_text(record.yaml)
        c.log_artifact(run.info.run_id, str(path))
    return run.info.run_id


def log_params(c, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)[:_MAX_PARAM_LEN]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        c.log_batch(run_id, params=items[i : i + 100])


def log_metrics(tracking_uri: str, run_id: str, metrics: dict[str, float], step: int) -> None:
    from mlflow.entities import Metric

    c = client(tracking_uri)
    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, int(step)) for k, v in metrics.items() if isinstance(v, (int, float))]
    if items:
        c.log_batch(run_id, metrics=items)


def logged_steps(tracking_uri: str, run_id: str, key: str) -> set[int]:
    """The steps at which ``key`` was logged in a run."""
    return {m.step for m in client(tracking_uri).get_metric_history(run_id, key)}


def log_artifacts(tracking_uri: str, run_id: str, paths: list[str | Path], artifact_path: str | None = None) -> None:
    c = client(tracking_uri)
    for p in paths:
        c.log_artifact(run_id, str(p), artifact_path)


def set_tags(tracking_uri: str, run_id: str, tags: dict[str, Any]) -> None:
    c = client(tracking_uri)
    for k, v in tags.items():
        c.set_tag(run_id, k, str(v))


def end_run(tracking_uri: str, run_id: str, status: str = "FINISHED") -> None:
    client(tracking_uri).set_terminated(run_id, status=status)


def ui_command(tracking_uri: str) -> str:
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri}"
    return f"mlflow ui --backend-store-uri {tracking_uri}"
