"""Writing a checkpoint directory to its storage, ``manifest.json`` last, every file retried with backoff.

Used by the training loop instead of Ray Train's own copy (``checkpoint_upload_fn``): an upload cut by an
unreachable or failing endpoint never leaves a manifest without all its files; once the tries are used up,
:class:`CheckpointUploadError` names the checkpoint URI. Each try is itself a few quick S3 requests: pyarrow's S3
client retries a request 3 times and gives up connecting after its 1 s connect timeout (a closed port fails a
write in about 3 s, a silent host in about 10 s).
"""

from __future__ import annotations

import os
from pathlib import Path

from pyarrow.fs import S3FileSystem

from methods.checkpoint_io import MANIFEST_FILE, IncompleteCheckpointError
from ssl_platform.storage.retry import StorageUnavailableError, retry_with_backoff
from ssl_platform.storage.uri_files import storage_uri


class CheckpointUploadError(StorageUnavailableError):
    """A checkpoint could not be written to its storage after all tries; the message names the checkpoint URI."""


def _copy_file(src: Path, fs, dest: str, chunk: int = 8 * 1024 * 1024) -> None:
    # S3's own streaming upload (not RetryingS3FileSystem's buffered one): the object appears on close only
    stream = S3FileSystem.open_output_stream(fs, dest) if isinstance(fs, S3FileSystem) else fs.open_output_stream(dest)
    with open(src, "rb") as inp, stream as out:
        while data := inp.read(chunk):
            out.write(data)


def upload_checkpoint_dir(local_dir: str | os.PathLike, fs, dest: str, *, attempts: int = 5, backoff_s: float = 1.0) -> str:
    """Copy checkpoint directory ``local_dir`` to ``dest`` on pyarrow filesystem ``fs``, ``manifest.json`` last.

    Every file is retried with :func:`retry_with_backoff`. If a file still fails, the upload stops before the
    manifest and :class:`CheckpointUploadError` names the checkpoint URI: the partial directory has no manifest,
    so it is never loaded, and earlier checkpoints are untouched. Returns the checkpoint URI.
    """
    local = Path(local_dir)
    uri = storage_uri(fs, dest)
    files = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    if MANIFEST_FILE not in files:
        raise IncompleteCheckpointError(f"checkpoint {str(local)!r}: no {MANIFEST_FILE}, refusing to upload it to {uri}")
    files = [f for f in files if f != MANIFEST_FILE] + [MANIFEST_FILE]
    # S3 has no directories (a marker object would only be noise); other filesystems need the parents first
    s3 = getattr(fs, "type_name", "") == "s3"
    dirs = [] if s3 else sorted({dest, *(f"{dest}/{os.path.dirname(f)}" for f in files if "/" in f)})
    try:
        for d in dirs:
            retry_with_backoff(lambda d=d: fs.create_dir(d, recursive=True), f"checkpoint upload to {uri} (directory)",
                               attempts=attempts, backoff_s=backoff_s, error=CheckpointUploadError)
        for name in files:
            what = f"checkpoint upload to {uri} ({name!r}{', written last' if name == MANIFEST_FILE else ''})"
            retry_with_backoff(lambda n=name: _copy_file(local / n, fs, f"{dest}/{n}"), what, attempts=attempts,
                               backoff_s=backoff_s, error=CheckpointUploadError)
    except CheckpointUploadError as err:
        raise CheckpointUploadError(
            f"{err}. The checkpoint has no {MANIFEST_FILE} there and is never loaded; the run's earlier checkpoints are kept"
        ) from err.__cause__
    return uri
