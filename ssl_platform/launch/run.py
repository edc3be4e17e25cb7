"""Driver side of one training run: pre-flight, Ray start-up, the MLflow run, ``TorchTrainer.fit``, the result table."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig

from ssl_platform.data.streaming import DataPlan
from ssl_platform.launch.preflight import preflight
from ssl_platform.storage.method_checkpoints import preflight_method_checkpoints
from ssl_platform.storage.s3 import worker_storage_options
from ssl_platform.tracking import mlflow_runs as tracking
from ssl_platform.tracking import run_log
from ssl_platform.training.fit import check_cpus_left_for_data, fit_tracked
from ssl_platform.training.ray_runtime import init_ray
from ssl_platform.training.trainer import build_trainer

EVAL_SKIPPED_TAG = "eval_skipped"


@dataclass
class RunResult:
    run_name: str
    mlflow_run_id: str
    metrics: dict[str, Any]
    checkpoint_path: str | None
    storage_path: str
    tracking_uri: str
    history: list[dict[str, Any]] = field(default_factory=list)
    tracking_pending: list[str] = field(default_factory=list)  # pending files of records not sent (sync-tracking)
    sync_command: str = ""


def default_run_name(name: str) -> str:
    """A new run's name: the spec's ``name``, the time and the process id."""
    return f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid() % 10000:04d}"


def run_experiment(
    spec: DictConfig,
    *,
    run_name: str | None = None,
    resume: bool = False,
    resume_from: str | None = None,
    parent: run_log.TrackedRun | None = None,
    extra_tags: dict[str, str] | None = None,
    step_hooks: list | None = None,
) -> RunResult:
    """Train ``spec`` with Ray Train and track it in MLflow. ``resume`` reuses ``run_name``'s checkpoints/run.
    ``parent``: the MLflow run this one is a child of (a chain's). ``step_hooks``:
    :class:`ssl_platform.training.hooks.StepHook` objects run in every worker (tests inject faults).

    Tracking never holds training back: MLflow writes are queued (:mod:`ssl_platform.tracking.run_log`); a server
    that is down at start or during the run gets them when it answers, and what it did not get by the end (after
    ``tracking.flush_timeout_s``) is kept beside the checkpoints for ``sync-tracking``."""
    if resume and not run_name:
        raise ValueError("resume needs the run name of the run to continue (see `ssl_platform runs` or the MLflow UI)")
    run_name = run_name or default_run_name(spec.name)

    run_log.check_server(spec.tracking)  # tracking.require_server_at_start: refused before anything starts
    source = preflight(spec)  # data (listed once) and checkpoint location, before Ray starts
    extra_tags = {**(extra_tags or {}), **_evaluation_tags(source)}
    # a missing/incomplete/mismatched method checkpoint (e.g. SALT's teacher) too
    preflight_method_checkpoints(spec.method, spec.checkpoint)
    storage = worker_storage_options(spec.checkpoint, spec.method)  # S3 checkpoint.uri: Ray's storage + workers' fs
    init_ray()
    if source.streamed:
        check_cpus_left_for_data(spec.scaling)  # before the MLflow run: a streamed run whose workers take every CPU would hang
    run = run_log.open_run(spec.tracking, run_name, tracking.SpecRecord.of(spec), resume=resume, parent=parent,
                           extra_tags=extra_tags, journal=run_log.journal_for(spec.checkpoint, run_name))
    trainer = build_trainer(spec, run_name, run.identity, resume_from=resume_from, step_hooks=step_hooks, source=source,
                            tracking_run=run.for_rank0(), **storage)
    del source  # the listing now lives in Ray's object store as blocks: the driver keeps no copy for the run
    result = fit_tracked(trainer, spec, run_name, run)
    ckpt = result.checkpoint.path if result.checkpoint is not None else None
    if ckpt:
        run.set_tags({"final_checkpoint": _uri(spec.checkpoint, ckpt)})
    run.end("FINISHED")
    pending = run_log.close_and_report(run)
    history = []
    if result.metrics_dataframe is not None:
        history = result.metrics_dataframe.to_dict("records")
    return RunResult(
        run_name=run_name,
        mlflow_run_id=run.run_id or "",
        tracking_pending=pending,
        sync_command=run_log.sync_hint(run.journal) if pending else "",
        metrics=dict(result.metrics or {}),
        checkpoint_path=_uri(spec.checkpoint, ckpt) if ckpt else None,
        storage_path=f"{spec.checkpoint.uri.rstrip('/')}/{run_name}",
        tracking_uri=spec.tracking.uri,
        history=history,
    )


def _evaluation_tags(plan: DataPlan) -> dict[str, str]:
    """Says once, on the console and as an MLflow tag, that kNN and the probe are skipped, and why."""
    reason = plan.no_evaluation_reason
    if reason is None:
        return {}
    print(f"[ssl_platform] no kNN / linear probe: {reason}; set eval.data to a labelled source "
          "(digits, cifar10, an image_folder, shards) to evaluate the encoder", flush=True)
    return {EVAL_SKIPPED_TAG: reason}


def _uri(checkpoint: DictConfig, path: str) -> str:
    """A checkpoint path Ray reports, as a URI of the spec's ``checkpoint`` storage."""
    if checkpoint.uri.startswith("s3://") and not path.startswith("s3://"):
        return "s3://" + path.lstrip("/")
    return path


def result_table(res: RunResult) -> str:
    m = res.metrics

    def fmt(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    rows = [
        ("run", res.run_name),
        ("epochs", fmt(m.get("epoch"))),
        ("final loss", fmt(m.get("loss"))),
        ("kNN top-1 (trained encoder)", fmt(m.get("knn_top1", "n/a"))),
        ("kNN top-1 (same encoder, random init)", fmt(m.get("knn_top1_random_init", "n/a"))),
        *(
            [("linear probe top-1 (trained / random init)", f"{fmt(m['linear_top1'])} / {fmt(m.get('linear_top1_random_init', 'n/a'))}")]
            if "linear_top1" in m else []
        ),
        *([("online probe top-1 (val)", fmt(m["online_probe_top1"]))] if "online_probe_top1" in m else []),
        ("checkpoint", res.checkpoint_path or "none"),
        ("MLflow run id", res.mlflow_run_id or "not created yet (the tracking server did not answer)"),
        ("open MLflow", tracking.ui_command(res.tracking_uri)),
        *([("tracking pending", f"{len(res.tracking_pending)} file(s): {res.sync_command}")] if res.tracking_pending else []),
    ]
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 3 + max(len(v) for _, v in rows))
    return "\n".join([line, *(f"{k.ljust(width)} | {v}" for k, v in rows), line])
