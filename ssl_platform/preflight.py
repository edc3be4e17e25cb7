"""Pre-flight checks on the driver, before Ray starts: the data (listed once) and the local checkpoint location.

Workers would hit the same problems, but only after Ray, the worker group and the MLflow run were set up,
and (for data) once per worker and per retry. Errors name the key, the expected form and the value seen.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from omegaconf import DictConfig

from ssl_platform.data import DataError


class StorageError(OSError):
    """The checkpoint location cannot be written."""


def check_data(spec: DictConfig):
    """Streamed sources (``image_folder``, ``shards``): list them / read their manifests once and return the
    :class:`~ssl_platform.streaming.StreamedSource` (its counts travel to the workers); ``cifar10``: the copy exists."""
    from ssl_platform.spec import STREAMED_DATASETS
    from ssl_platform.streaming import plan_streamed_source

    data = spec.data
    if data.name in STREAMED_DATASETS:
        return plan_streamed_source(spec)
    if data.name == "cifar10" and not (data.root and (Path(data.root) / "cifar-10-batches-py").is_dir()):
        raise DataError(f"data.root: expected a directory holding cifar-10-batches-py, got {data.root!r}")
    return None


def check_storage(spec: DictConfig) -> None:
    """A local ``checkpoint.uri`` can be created and written (S3 URIs are checked by their own module)."""
    uri = spec.checkpoint.uri
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


def preflight(spec: DictConfig):
    """Data and checkpoint storage checks; returns the planned streamed source (or None for in-memory data)."""
    source = check_data(spec)
    check_storage(spec)
    return source
