"""Pre-flight checks on the driver, before Ray starts: the data root and the local checkpoint location.

Workers would hit the same problems, but only after Ray, the worker group and the MLflow run were set up,
and (for data) once per worker and per retry. Errors name the key, the expected form and the value seen.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from omegaconf import DictConfig

from ssl_platform.data import IMAGE_SUFFIXES, DataError


class StorageError(OSError):
    """The checkpoint location cannot be written."""


def check_data(spec: DictConfig) -> None:
    """``data.root`` exists and (for ``image_folder``) holds ``root/class_name/image`` files."""
    data = spec.data
    if data.name not in ("image_folder", "cifar10"):
        return
    root = Path(data.root or "")
    if not data.root or not root.is_dir():
        raise DataError(f"data.root: expected an existing directory for data.name={data.name}, got {data.root!r}")
    if data.name == "cifar10":
        if not (root / "cifar-10-batches-py").is_dir():
            raise DataError(f"data.root: expected a directory holding cifar-10-batches-py, got {data.root!r}")
        return
    classes = [c for c in root.iterdir() if c.is_dir() and _has_image(c)]
    if not classes:
        loose = _has_image(root, recursive=False)
        hint = " (images lie directly under it: put them in root/class_name/)" if loose else ": the dataset is empty"
        raise DataError(
            f"data.root: expected an ImageFolder tree root/class_name/image ({', '.join(sorted(IMAGE_SUFFIXES))}), "
            f"got {data.root!r} with no class directory holding images{hint}"
        )


def _has_image(directory: Path, recursive: bool = True) -> bool:
    it = os.walk(directory) if recursive else [(str(directory), [], os.listdir(directory))]
    for _, _, files in it:
        if any(Path(f).suffix.lower() in IMAGE_SUFFIXES for f in files):
            return True
    return False


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


def preflight(spec: DictConfig) -> None:
    check_data(spec)
    check_storage(spec)
