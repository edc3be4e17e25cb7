"""Pre-flight checks on the driver, before Ray starts: the data (listed once) and the local checkpoint location.

Workers would hit the same problems, but only after Ray, the worker group and the MLflow run were set up,
and (for data) once per worker and per retry. Errors name the key, the expected form and the value seen.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from omegaconf import DictConfig

from ssl_platform.data.small_sets import DataError
from ssl_platform.data.streaming import DataPlan, plan_data
from ssl_platform.spec import SpecError
from ssl_platform.storage.method_checkpoints import preflight_encoder_init


class StorageError(OSError):
    """The checkpoint location cannot be written."""


def check_data(spec: DictConfig) -> DataPlan:
    """The training and evaluation data: streamed sources (``image_folder``, ``shards``) listed / their manifests read
    once (:func:`~ssl_platform.data.streaming.plan_data`; the counts travel to the workers); ``cifar10``: the copy
    exists."""
    for key, data in (("data", spec.data), ("eval.data", spec.eval.data)):
        if data is not None and data.name == "cifar10" and not (data.root and (Path(data.root) / "cifar-10-batches-py").is_dir()):
            raise DataError(f"{key}.root: expected a directory holding cifar-10-batches-py, got {data.root!r}")
    return plan_data(spec)


def check_storage(checkpoint: DictConfig) -> None:
    """A local ``checkpoint.uri`` can be created and written (S3 URIs are checked by their own module)."""
    uri = checkpoint.uri
    if "://" in uri:
        return
    path = Path(uri)
    probe = path / f".ssl_platform-write-test-{uuid.uuid4().hex[:8]}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise StorageError(
            f"checkpoint.uri: expected a writable directory, got {uri!r} ({type(err).__name__}: {err.strerror or err})"
        ) from None


def check_scaling(spec: DictConfig) -> None:
    """``scaling.strategy`` and ``optim.accumulation_steps`` against the batch: FSDP with one worker is allowed (a
    notice: it shards nothing); the micro-batches must split each worker's batch evenly."""
    workers = int(spec.scaling.num_workers)
    if spec.scaling.strategy == "fsdp" and workers == 1:
        print("[ssl_platform] notice: scaling.strategy: fsdp with scaling.num_workers=1 shards nothing (one worker "
              "holds every parameter and optimizer state, as with ddp); it only pays off with more workers", flush=True)
    k = int(spec.optim.accumulation_steps)
    per_worker = max(1, int(spec.data.batch_size) // workers)
    if per_worker % k != 0:
        raise SpecError("optim.accumulation_steps", f"a divisor of the per-worker batch {per_worker} (data.batch_size "
                        f"{spec.data.batch_size} over {workers} worker(s))", k)


def check_encoder_init(spec: DictConfig) -> None:
    """``method.encoder_init`` (released weights) is readable and fits the encoder, read from the checkpoint's shapes."""
    layout = preflight_encoder_init(spec.method, spec.checkpoint)
    if layout:
        print(f"[ssl_platform] method.encoder_init: {layout} layout, fits {spec.method.get('encoder_name')!r}", flush=True)


def preflight(spec: DictConfig) -> DataPlan:
    """Scaling, data, checkpoint storage and ``method.encoder_init`` checks; returns the run's data plan."""
    check_scaling(spec)
    source = check_data(spec)
    check_storage(spec.checkpoint)
    check_encoder_init(spec)
    return source
