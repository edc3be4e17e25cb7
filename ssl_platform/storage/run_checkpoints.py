"""The checkpoints of a run, on local disk or S3: list them, check that one is complete, find the latest complete.

A run directory (local path or ``s3://`` URI) holds Ray Train's ``checkpoint_*`` directories. A checkpoint counts
only once its ``manifest.json`` (written last) is there and lists files that all exist with their recorded sizes
(:func:`remote_manifest`); checksums are verified on load or download (:mod:`ssl_platform.storage.checkpoint_cache`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import Any

from methods.checkpoint_io import MANIFEST_FILE, CheckpointError, IncompleteCheckpointError
from ssl_platform.storage.uri_files import join_uri, read_text, resolve_uri


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


def prune_checkpoints_beyond_keep(run_uri: str, keep: int, tracked: Sequence[str] = (), fs=None) -> list[str]:
    """Delete the ``checkpoint_*`` directories of a finished run (local path or ``s3://``) except those Ray Train
    tracks (``tracked``: paths or names), its newest complete one, and the next-newest complete ones while fewer
    than ``keep`` are kept; return the URIs of those deleted.

    Ray's tracked checkpoints always stay: Ray Train refuses to restore a run directory whose snapshot names a
    checkpoint that is gone (``CheckpointManagerInitializationError``). After a node loss Ray may still track one
    from before the loss; then a newer one the lost group completed but never reported is what goes (seen on the
    two-node test: 3 checkpoints with ``keep: 2`` while newer-first counting kept the unreported one).

    Ray Train deletes only the checkpoints it registered: after a node loss, ones the lost group wrote (or half
    wrote) but never reported, and ones from before the loss that Ray no longer tracks, would stay in storage past
    ``checkpoint.keep`` -- at cluster scale a full model + optimizer state each. Called once the run has finished,
    so nothing else writes to its directory. Directory names sort by time (``checkpoint_<date>_<time>``); a
    complete one has its manifest and every listed file (:func:`remote_manifest`).
    """
    names = [u.rsplit("/", 1)[1] for u in list_checkpoint_uris(run_uri, fs)]
    kept = {os.path.basename(t.rstrip("/")) for t in tracked}
    newest = True
    for name in reversed(names):  # the newest complete one, then newer before older until `keep` are kept
        if len(kept) >= keep and not newest:
            break
        if name in kept:
            newest = False
            continue
        try:
            remote_manifest(join_uri(run_uri, name), fs)
        except CheckpointError:
            continue
        if newest or len(kept) < keep:
            kept.add(name)
        newest = False
    stale = [join_uri(run_uri, n) for n in names if n not in kept]
    for uri in stale:
        f, path = resolve_uri(uri, fs)
        f.delete_dir(path)
    return stale
