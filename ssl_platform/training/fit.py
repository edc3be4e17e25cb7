"""``TorchTrainer.fit`` as the platform runs it, for single runs and sweep trials alike: CPUs left for decoding, a
notice while the workers wait for resources, the MLflow run marked FAILED on failure, one clear error when the
checkpoint storage stopped the run, and old checkpoints pruned to ``checkpoint.keep`` at the end."""

from __future__ import annotations

import os

from omegaconf import DictConfig

from methods.checkpoint_io import MANIFEST_FILE
from ssl_platform.spec import SpecError
from ssl_platform.storage.retry import StorageUnavailableError, find_storage_error
from ssl_platform.storage.run_checkpoints import prune_checkpoints_beyond_keep
from ssl_platform.storage.uri_files import storage_uri
from ssl_platform.tracking.run_log import TrackedRun
from ssl_platform.training.resource_wait import ResourceWaitNotice
from ssl_platform.training.watch import CollapseStop, take_collapse_stop


def check_cpus_left_for_data(scaling: DictConfig) -> None:
    """Streamed data is decoded by Ray Data tasks on the CPUs the Train workers (the spec's ``scaling``) leave free:
    with none left, the run would wait forever. Refused on a local instance; on a cluster (``RAY_ADDRESS``, maybe
    autoscaling) a warning."""
    import ray

    sc = scaling
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


def fit_tracked(trainer, spec: DictConfig, run_name: str, run: TrackedRun):
    """``trainer.fit()`` (with a message while it waits for resources); a failed fit marks the MLflow run FAILED
    (queued, then sent or kept within ``tracking.flush_timeout_s``), and one stopped by its storage ends with one clear
    error (:func:`_raise_if_storage_failure`). Used by single runs and by every sweep trial."""

    take_collapse_stop(spec.checkpoint, run_name)  # a resumed run starts without an earlier stop's reason
    try:
        with ResourceWaitNotice.for_scaling(spec.scaling):  # says so while the workers wait for resources
            result = trainer.fit()
    except BaseException as err:
        _end_failed(run)
        _raise_if_storage_failure(spec.checkpoint, run_name, err)
        raise
    if result.error is not None:
        _end_failed(run)
        _raise_if_storage_failure(spec.checkpoint, run_name, result.error)
        raise result.error
    stopped = take_collapse_stop(spec.checkpoint, run_name)
    if stopped:  # eval.stop_on_collapse: the workers left the loop together, rank 0 wrote why
        _end_failed(run)
        raise CollapseStop(f"run {run_name!r} stopped: {stopped}")
    prune_lost_checkpoints(result, spec.checkpoint.keep)
    return result


def _end_failed(run: TrackedRun) -> None:
    run.end("FAILED")
    run.close()


def prune_lost_checkpoints(result, keep: int) -> None:
    """A finished run keeps ``checkpoint.keep`` checkpoints, also after a worker group was lost and restarted (see
    :func:`~ssl_platform.storage.run_checkpoints.prune_checkpoints_beyond_keep`); says which it deleted."""
    from pyarrow.fs import LocalFileSystem

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


def _raise_if_storage_failure(checkpoint: DictConfig, run_name: str, err: BaseException) -> None:
    """A run stopped by its checkpoint storage (the spec's ``checkpoint`` section: unreachable or failing after all
    retries) ends with one clear error."""

    cause = find_storage_error(err)
    if cause is None:
        return
    run_uri = f"{checkpoint.uri.rstrip('/')}/{run_name}"
    raise StorageUnavailableError(
        f"run {run_name!r} stopped: its checkpoint storage {run_uri} is unreachable or failing -- {cause}. "
        f"A checkpoint without {MANIFEST_FILE} is never loaded: once the storage is back, `--resume` continues "
        f"from the last complete checkpoint"
    ) from err
