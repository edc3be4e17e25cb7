"""The checkpoints of a run, on local disk or S3: list them, check that one is complete, find the latest complete.

A run directory (local path or ``s3://`` URI) holds Ray Train's ``checkpoint_*`` directories. A checkpoint counts
only once its ``manifest.json`` (written last) is there and lists files that all exist with their recorded sizes
(:func:`remote_manifest`); checksums are verified on load or download (:mod:`ssl_platform.checkpoint_cache`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

from methods.checkpoint_io import MANIFEST_FILE, CheckpointError, IncompleteCheckpointError
from ssl_platform.uri_files import join_uri, read_text, resolve_uri, storage_uri


def list_checkpoint_uris(run_uri: str, fs=None) -> list[str]:
    """The ``checkpoint_*`` directories of a run (local path or ``s3://``), oldest first."""
    from pyarrow.fs import FileSelector, FileType

    f, path = resolve_uri(run_uri, fs)
    infos = f.get_file_info(FileSelector(path, allow_not_found=True, recursive=False))
    names = sorted(i.base_name for i in infos if i.type == FileType.Directory and i.base_name.startswith("checkpoint_"))
    return [join_uri(run_uri, n) for n in names]


def remote_manifest(ckpt_uri: str, fs=None) -> dict[str, Any]:
    """The manifest of a checkpoint after checking that every listed file exists with its recorded size.

    Raises :class:`IncompleteCheckpointError` (no manifest, missing file: an unfinished write or upload) or
    :class:`CheckpointError` (size mismatch, unreadable manifest). Checksums are checked on download.
    """
    from pyarrow.fs import FileSelector, FileType

    text = read_text(join_uri(ckpt_uri, MANIFEST_FILE), fs)
    if text is None:
        raise IncompleteCheckpointError(f"incomplete checkpoint {ckpt_uri!r}: no {MANIFEST_FILE} (written last; the writer or upload did not finish)")
    try:
        manifest = json.loads(text)
        files = manifest["files"]
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"checkpoint {ckpt_uri!r}: unreadable {MANIFEST_FILE} ({err})") from None
    f, path = resolve_uri(ckpt_uri, fs)
    sizes = {
        os.path.relpath(i.path, path).replace(os.sep, "/"): i.size
        for i in f.get_file_info(FileSelector(path, recursive=True))
        if i.type == FileType.File
    }
    for name, meta in files.items():
        size = meta["size"] if isinstance(meta, dict) else meta
        if name not in sizes:
            raise IncompleteCheckpointError(f"incomplete checkpoint {ckpt_uri!r}: {name!r} is listed in the manifest but missing")
        if sizes[name] != size:
            raise CheckpointError(f"checkpoint {ckpt_uri!r}: {name!r} has {sizes[name]} bytes, the manifest says {size}")
    return manifest


def latest_complete_checkpoint_uri(run_uri: str, fs=None, *, check: Callable[[str], Any] | None = None) -> str | None:
    """The newest checkpoint of a run that passes ``check`` (a function of its URI that raises
    :class:`CheckpointError` when the checkpoint does not count), or None.

    Default ``check``: :func:`remote_manifest` (manifest there, every file with its size). Local callers pass
    :func:`methods.checkpoint_io.verify_manifest` to check the SHA-256 of every file as well.
    """
    for uri in reversed(list_checkpoint_uris(run_uri, fs)):
        try:
            check(uri) if check is not None else remote_manifest(uri, fs)
            return uri
        except CheckpointError:
            continue
    return None


def prune_untracked_checkpoints(run_path: str, fs, kept: list[str], keep: int) -> list[str]:
    """Delete the ``checkpoint_*`` directories under ``run_path`` (a path on pyarrow filesystem ``fs``) that Ray
    Train does not track and that are older than every one it ``kept``; return the URIs of those deleted.

    After a worker group is lost, the restarted group keeps only the checkpoints that were registered: one the lost
    group wrote (or half wrote) but never reported stays in storage, past ``checkpoint.keep`` -- at cluster scale a
    full model + optimizer state per lost node. Called once a run has finished (nothing else writes to its
    directory). Nothing is deleted unless Ray kept ``keep`` checkpoints, so the newest ``keep`` always stay.
    Directory names sort by time (``checkpoint_<date>_<time>``).
    """
    from pyarrow.fs import FileSelector, FileType

    names = {os.path.basename(k.rstrip("/")) for k in kept}
    if len(names) < keep:
        return []
    infos = fs.get_file_info(FileSelector(run_path, allow_not_found=True, recursive=False))
    stale = sorted(i.path for i in infos if i.type == FileType.Directory and i.base_name.startswith("checkpoint_")
                   and i.base_name not in names and i.base_name < min(names))
    for path in stale:
        fs.delete_dir(path)
    return [storage_uri(fs, p) for p in stale]
