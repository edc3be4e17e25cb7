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


def preflight(spec: DictConfig) -> DataPlan:
    """Data and checkpoint storage checks; returns the run's data plan."""
    source = check_data(spec)
    check_storage(spec.checkpoint)
    return source
