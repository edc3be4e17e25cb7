"""Driver side of a training run: Ray start-up, MLflow run, ``TorchTrainer.fit``, result table."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig


@dataclass
class RunResult:
    run_name: str
    mlflow_run_id: str
    metrics: dict[str, Any]
    checkpoint_path: str | None
    storage_path: str
    tracking_uri: str
    history: list[dict[str, Any]] = field(default_factory=list)


def init_ray(num_cpus: int | None = None) -> None:
    """Connect to the cluster of ``RAY_ADDRESS`` (``ray job submit``) or start a small local instance."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Train V2 patches print() in workers to also log it, which shows every progress line twice.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    # Worker start-up on a small, busy machine can take longer than Train V2's default 60 s.
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")
    # Train V2's PreemptionWatcher (cloud node-drain notices, unused by our loop) makes every run print a core
    # worker error line ("constructor arguments in the object store and max_restarts > 0"); set it to 1 to keep it.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        return
    cpus = num_cpus or int(os.environ.get("SSL_PLATFORM_NUM_CPUS", 0)) or max(2, os.cpu_count() or 2)
    ray.init(
        num_cpus=cpus,
        object_store_memory=local_object_store_bytes(),
        include_dashboard=True,  # Train V2's placement-group cleanup needs the State API (dashboard)
        dashboard_host="127.0.0.1",
        dashboard_port=int(os.environ.get("SSL_PLATFORM_DASHBOARD_PORT", 0)) or free_port(),
        log_to_driver=True,
        runtime_env={
            "env_vars": {"PYTHONPATH": _pythonpath(), "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"},
            "worker_process_setup_hook": "ssl_platform.run.pin_ray_address",
        },
    )


LOCAL_OBJECT_STORE_MB = 2048


def local_object_store_bytes(total_memory: int | None = None) -> int:
    """The object store of a local instance: ``SSL_PLATFORM_OBJECT_STORE_MB`` or 2 GiB, at most 30% of RAM (Ray's
    own default share). Ray Data's decoded batches live there: under 200 MB its executor ran one decode task at a
    time ("backpressured: ResourceBudget"); 2 GiB gave 1.2-1.4x the decoded images/s on 2 cores (measured). Shared
    memory is used only as objects are stored."""
    raw = os.environ.get("SSL_PLATFORM_OBJECT_STORE_MB", "")
    if raw:
        try:
            mb = int(raw)
        except ValueError:
            raise ValueError(f"SSL_PLATFORM_OBJECT_STORE_MB: expected a whole number of MB, got {raw!r}") from None
        if mb < 80:
            raise ValueError(f"SSL_PLATFORM_OBJECT_STORE_MB: expected at least 80 (Ray's minimum object store), got {mb}")
        return mb * 1024**2
    if total_memory is None:
        total_memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return min(LOCAL_OBJECT_STORE_MB * 1024**2, max(80 * 1024**2, int(0.3 * total_memory)))


def pin_ray_address() -> None:
    """Worker setup hook: point the State API at this cluster (it cannot guess when several run locally)."""
    import ray

    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _pythonpath() -> str:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parts = [here] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return os.pathsep.join(dict.fromkeys(parts))


def default_run_name(spec: DictConfig) -> str:
    return f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid() % 10000:04d}"


def run_experiment(
    spec: DictConfig,
    *,
    run_name: str | None = None,
    resume: bool = False,
    resume_from: str | None = None,
    parent_run_id: str | None = None,
    extra_tags: dict[str, str] | None = None,
    step_hooks: list | None = None,
) -> RunResult:
    """Train ``spec`` with Ray Train and track it in MLflow. ``resume`` reuses ``run_name``'s checkpoints/run.
    ``step_hooks``: :class:`ssl_platform.hooks.StepHook` objects run in every worker (tests inject faults)."""
    from ssl_platform import tracking
    from ssl_platform.train import build_trainer

    if resume and not run_name:
        raise ValueError("resume needs the run name of the run to continue (see `ssl_platform runs` or the MLflow UI)")
    run_name = run_name or default_run_name(spec)
    from ssl_platform.method_checkpoints import preflight_method_checkpoints
    from ssl_platform.preflight import preflight
    from ssl_platform.s3 import worker_storage_options

    source = preflight(spec)  # data (listed once) and checkpoint location, before Ray starts
    preflight_method_checkpoints(spec)  # a missing/incomplete/mismatched method checkpoint (e.g. SALT's teacher) too
    storage = worker_storage_options(spec)  # S3 checkpoint.uri: Ray's storage + workers' filesystem
    init_ray()
    if source is not None:
        check_cpus_left_for_data(spec)  # before the MLflow run: a streamed run whose workers take every CPU would hang
    run_id = tracking.start_run(spec, run_name, resume=resume, parent_run_id=parent_run_id, extra_tags=extra_tags)
    trainer = build_trainer(spec, run_name, run_id, resume_from=resume_from, step_hooks=step_hooks, source=source, **storage)
    result = fit_tracked(trainer, spec, run_name, run_id)
    ckpt = result.checkpoint.path if result.checkpoint is not None else None
    if ckpt:
        tracking.set_tags(spec.tracking.uri, run_id, {"final_checkpoint": _uri(spec, ckpt)})
    tracking.end_run(spec.tracking.uri, run_id, "FINISHED")
    history = []
    if result.metrics_dataframe is not None:
        history = result.metrics_dataframe.to_dict("records")
    return RunResult(
        run_name=run_name,
        mlflow_run_id=run_id,
        metrics=dict(result.metrics or {}),
        checkpoint_path=_uri(spec, ckpt) if ckpt else None,
        storage_path=f"{spec.checkpoint.uri.rstrip('/')}/{run_name}",
        tracking_uri=spec.tracking.uri,
        history=history,
    )


def check_cpus_left_for_data(spec: DictConfig) -> None:
    """Streamed data is decoded by Ray Data tasks on the CPUs the Train workers leave free: with none left, the run
    would wait forever. Refused on a local instance; on a cluster (``RAY_ADDRESS``, maybe autoscaling) a warning."""
    import ray

    from ssl_platform.spec import SpecError

    sc = spec.scaling
    total = float(ray.cluster_resources().get("CPU", 0))
    left = total - sc.num_workers * sc.cpus_per_worker
    if left >= 1:
        return
    error = SpecError("scaling.cpus_per_worker", f"at most {max(0.0, (total - 1) / sc.num_workers):g} so that Ray Data's "
                      f"decode tasks get a CPU (the cluster has {total:g} CPUs for {sc.num_workers} worker(s))",
                      sc.cpus_per_worker)
    if not os.environ.get("RAY_ADDRESS"):
        raise error
    print(f"[ssl_platform] warning: {error} -- the run waits until the cluster has CPUs free for decoding", flush=True)


def fit_tracked(trainer, spec: DictConfig, run_name: str, run_id: str):
    """``trainer.fit()`` (with a message while it waits for resources); a failed fit marks the MLflow run FAILED,
    and one stopped by its storage ends with one clear error (:func:`_raise_if_storage_failure`). Used by single
    runs and by every sweep trial."""
    from ssl_platform import tracking
    from ssl_platform.resource_wait import ResourceWaitNotice

    try:
        with ResourceWaitNotice.for_spec(spec):  # says so while the workers wait for resources
            result = trainer.fit()
    except BaseException as err:
        tracking.end_run(spec.tracking.uri, run_id, "FAILED")
        _raise_if_storage_failure(spec, run_name, err)
        raise
    if result.error is not None:
        tracking.end_run(spec.tracking.uri, run_id, "FAILED")
        _raise_if_storage_failure(spec, run_name, result.error)
        raise result.error
    prune_lost_checkpoints(result, spec.checkpoint.keep)
    return result


def prune_lost_checkpoints(result, keep: int) -> None:
    """A finished run keeps ``checkpoint.keep`` checkpoints, also after a worker group was lost and restarted (see
    :func:`~ssl_platform.run_checkpoints.prune_checkpoints_beyond_keep`); says which it deleted."""
    from pyarrow.fs import LocalFileSystem

    from ssl_platform.run_checkpoints import prune_checkpoints_beyond_keep
    from ssl_platform.uri_files import storage_uri

    if not (isinstance(result.filesystem, LocalFileSystem) or getattr(result.filesystem, "type_name", "") == "s3"):
        return  # the storages the platform writes to (checkpoint.uri: a local path or s3://)
    run_uri = storage_uri(result.filesystem, result.path)
    tracked = [ckpt.path for ckpt, _ in (result.best_checkpoints or [])]
    try:
        removed = prune_checkpoints_beyond_keep(run_uri, keep, tracked, fs=result.filesystem)
    except OSError as err:  # the run itself finished: its newest checkpoints are complete
        print(f"[ssl_platform] warning: could not remove old checkpoints under {run_uri}: {err}", flush=True)
        return
    for uri in removed:
        print(f"[ssl_platform] removed {uri}: beyond checkpoint.keep={keep} (left by a restarted worker group)", flush=True)


def _raise_if_storage_failure(spec: DictConfig, run_name: str, err: BaseException) -> None:
    """A run stopped by its checkpoint storage (unreachable or failing after all retries) ends with one clear error."""
    from methods.checkpoint_io import MANIFEST_FILE
    from ssl_platform.retry import StorageUnavailableError, find_storage_error

    cause = find_storage_error(err)
    if cause is None:
        return
    run_uri = f"{spec.checkpoint.uri.rstrip('/')}/{run_name}"
    raise StorageUnavailableError(
        f"run {run_name!r} stopped: its checkpoint storage {run_uri} is unreachable or failing -- {cause}. "
        f"A checkpoint without {MANIFEST_FILE} is never loaded: once the storage is back, `--resume` continues "
        f"from the last complete checkpoint"
    ) from err


def _uri(spec: DictConfig, path: str) -> str:
    if spec.checkpoint.uri.startswith("s3://") and not path.startswith("s3://"):
        return "s3://" + path.lstrip("/")
    return path


def result_table(res: RunResult) -> str:
    from ssl_platform import tracking

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
        ("checkpoint", res.checkpoint_path or "none"),
        ("MLflow run id", res.mlflow_run_id),
        ("open MLflow", tracking.ui_command(res.tracking_uri)),
    ]
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 3 + max(len(v) for _, v in rows))
    return "\n".join([line, *(f"{k.ljust(width)} | {v}" for k, v in rows), line])
