"""MLflow stores and runs through ``MlflowClient``: the client of a store, experiments, the tags and spec record of a
run, and looking a run up by its name.

One run per training run: params = flattened resolved spec (secret-like keys dropped), metrics per epoch
with ``step=epoch``, tags (method, git commit, spec hash, checkpoint URI, Ray job id), the resolved spec and
the final encoder as artifacts. A resumed run (same run name) continues the same MLflow run. Nothing here is
called on the training path: the writes go through :mod:`ssl_platform.tracking.run_log`'s queue.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ssl_platform.spec import dump_yaml, public_params, spec_hash

RUN_NAME_TAG = "ssl.run_name"
_MAX_PARAM_LEN = 6000


_READY_STORES: set[str] = set()


def client(tracking_uri: str):
    import logging

    import mlflow

    # "Creating initial MLflow database tables..." / "Updating database tables" at INFO on every new sqlite store
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
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


# MLflow 3's UI opens an experiment of unknown kind on its GenAI overview (traces, prompts); this experiment tag
# (the value its UI reads, ``ExperimentKind.CUSTOM_MODEL_DEVELOPMENT``) makes it open on the training runs.
EXPERIMENT_KIND_TAG = ("mlflow.experimentKind", "custom_model_development")


def experiment_id(c, name: str) -> str:
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            c.restore_experiment(exp.experiment_id)
        if EXPERIMENT_KIND_TAG[0] not in exp.tags:
            c.set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND_TAG)
        return exp.experiment_id
    try:
        return c.create_experiment(name, tags=dict([EXPERIMENT_KIND_TAG]))
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


def run_tags(run_name: str, record: SpecRecord | None, *, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The tags a new run is created with: its name (``ssl.run_name``), method, git commit, spec hash, checkpoint
    URI, the Ray job id when there is one, and ``extra``."""
    tags = {RUN_NAME_TAG: run_name, "git_commit": git_commit()}
    if record is not None:
        tags.update({"method": record.method, "spec_hash": record.spec_hash,
                     "checkpoint_uri": f"{record.checkpoint_root}/{run_name}"})
    job_id = os.environ.get("RAY_JOB_ID") or os.environ.get("RAY_JOB_SUBMISSION_ID")
    if job_id:
        tags["ray_job_id"] = job_id
    tags.update(extra or {})
    return tags


def log_params(c, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)[:_MAX_PARAM_LEN]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        c.log_batch(run_id, params=items[i : i + 100])


def ui_command(tracking_uri: str) -> str:
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri}"
    return f"mlflow ui --backend-store-uri {tracking_uri}"
