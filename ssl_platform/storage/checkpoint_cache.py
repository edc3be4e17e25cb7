"""Verified local copies of checkpoints: :func:`download_checkpoint` copies an ``s3://`` checkpoint into a local
cache and verifies its manifest (files, sizes, SHA-256), so a half-uploaded or corrupt checkpoint is never loaded.

The cache (``$SSL_PLATFORM_CACHE``, default ``<tmp>/ssl_platform_cache``) is keyed by the URI and the manifest's
content; a cached copy is re-verified before use, and a download lands in a temporary directory renamed into
place, so processes on one node that download the same checkpoint do not see each other's partial copies.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from methods.checkpoint_io import CheckpointError, verify_manifest
from ssl_platform.storage.run_checkpoints import remote_manifest
from ssl_platform.storage.s3 import filesystem, fs_path, is_s3


def cache_root() -> Path:
    return Path(os.environ.get("SSL_PLATFORM_CACHE") or Path(tempfile.gettempdir()) / "ssl_platform_cache")


def download_checkpoint(uri: str, cache_dir: str | os.PathLike | None = None, fs=None) -> Path:
    """A local, verified copy of checkpoint ``uri``; a local directory is verified and returned as it is.

    S3 checkpoints are cached under ``cache_dir`` (default ``$SSL_PLATFORM_CACHE`` or the temp dir), keyed by
    the URI and the manifest's content, and re-verified (sizes + SHA-256) before use. Raises
    :class:`IncompleteCheckpointError` / :class:`CheckpointError` for a checkpoint that is not complete.
    """
    if not is_s3(uri):
        verify_manifest(uri)
        return Path(uri)
    from pyarrow.fs import LocalFileSystem, copy_files

    f = fs or filesystem()
    manifest = remote_manifest(uri, f)
    key = hashlib.sha256((uri + json.dumps(manifest, sort_keys=True)).encode()).hexdigest()[:20]
    root = Path(cache_dir) if cache_dir else cache_root()
    target = root / key
    if target.is_dir():
        try:
            verify_manifest(target)
            return target
        except CheckpointError:
            shutil.rmtree(target, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
    try:
        copy_files(fs_path(uri), str(tmp), source_filesystem=f, destination_filesystem=LocalFileSystem())
        try:
            verify_manifest(tmp)
        except CheckpointError as err:
            raise type(err)(f"{err} [downloaded from {uri}]") from None
        try:
            os.replace(tmp, target)
        except OSError:  # another process on this node finished the same download first
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    verify_manifest(target)
    return target
