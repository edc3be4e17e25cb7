"""Checkpoint URIs on S3 (or any S3-compatible server) and on local disk.

* :func:`filesystem` builds a picklable :class:`RetryingS3FileSystem` (a ``pyarrow.fs.S3FileSystem`` whose Python-level
  calls -- Ray Train's own state files and old-checkpoint deletion, our small files and listings -- are retried with
  backoff) from the standard AWS configuration
  (``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``..., profiles, IAM roles) or the spec's
  ``checkpoint.endpoint_url`` (endpoint only, never secrets). pyarrow's constructor does not read the
  endpoint variables itself, and Ray builds filesystems in every process, so the object is handed to Ray
  Train (``storage_filesystem``) and to the workers, which need it to fetch a teacher from S3.
* :func:`list_checkpoint_uris` / :func:`latest_complete_checkpoint_uri` list the checkpoints of a run.
* :func:`download_checkpoint` copies a checkpoint (``s3://`` or local) into a local cache directory and
  verifies its manifest (files, sizes, SHA-256): a half-uploaded or corrupt checkpoint is never loaded.
* :func:`upload_checkpoint_dir` writes a checkpoint directory to its storage (used by the training loop instead of
  Ray Train's own copy): every file is retried with exponential backoff (:func:`retry_with_backoff`) and
  ``manifest.json`` goes last, so an upload cut by an unreachable or failing endpoint never leaves a manifest
  without all its files; once the tries are used up, :class:`CheckpointUploadError` names the checkpoint URI.
  Each try is itself a few quick S3 requests: pyarrow's S3 client retries a request 3 times and gives up
  connecting after its 1 s connect timeout (a closed port fails a write in about 3 s, a silent host in about 10 s).
* :func:`preflight_method_checkpoints` runs before Ray starts: the SALT teacher of a spec must exist, be
  complete and have the architecture the spec asks for.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from pyarrow.fs import S3FileSystem

from methods.checkpoint_io import (
    MANIFEST_FILE,
    CheckpointError,
    IncompleteCheckpointError,
    check_encoder_config,
    load_encoder_file,
    verify_manifest,
)

# Credentials resolved by these providers are short-lived and present on every node: let pyarrow find them.
_NODE_LOCAL_CREDENTIALS = ("iam-role", "container-role", "assume-role-with-web-identity")


def is_s3(uri: str | os.PathLike | None) -> bool:
    return isinstance(uri, str) and uri.startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``."""
    if not is_s3(uri) or len(uri) <= 5:
        raise ValueError(f"expected an s3://bucket/prefix URI, got {uri!r}")
    bucket, _, key = uri[5:].partition("/")
    return bucket, key.strip("/")


def fs_path(uri: str) -> str:
    """The path pyarrow's S3FileSystem (and Ray, given a custom filesystem) expects: no ``s3://`` scheme."""
    return uri[5:].rstrip("/") if is_s3(uri) else uri


def endpoint_url(spec_endpoint: str | None = None) -> str | None:
    """The S3 endpoint: the spec's ``checkpoint.endpoint_url``, else ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``."""
    return spec_endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def filesystem(spec_endpoint: str | None = None, *, attempts: int = 5, backoff_s: float = 1.0) -> RetryingS3FileSystem:
    """A picklable S3 filesystem for the configured endpoint, region and credentials, retrying with backoff."""
    import boto3

    session = boto3.Session()
    kwargs: dict[str, Any] = {"region": session.region_name or "us-east-1"}
    endpoint = endpoint_url(spec_endpoint)
    if endpoint:
        kwargs["endpoint_override"] = endpoint
        if endpoint.startswith("http://"):
            kwargs["scheme"] = "http"
    creds = session.get_credentials()
    if creds is not None and getattr(creds, "method", None) not in _NODE_LOCAL_CREDENTIALS:
        frozen = creds.get_frozen_credentials()
        kwargs.update(access_key=frozen.access_key, secret_key=frozen.secret_key)
        if frozen.token:
            kwargs["session_token"] = frozen.token
    return RetryingS3FileSystem(retry_attempts=attempts, retry_backoff_s=backoff_s, **kwargs)


def boto3_client(spec_endpoint: str | None = None):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint_url(spec_endpoint), region_name=boto3.Session().region_name or "us-east-1")


def spec_needs_s3(spec: DictConfig) -> bool:
    return is_s3(spec.checkpoint.uri) or is_s3(_teacher(spec))


def spec_filesystem(spec: DictConfig) -> RetryingS3FileSystem:
    """:func:`filesystem` for a spec: its ``checkpoint.endpoint_url`` and ``checkpoint.upload_*`` retry settings."""
    c = spec.checkpoint
    return filesystem(c.get("endpoint_url"), attempts=c.get("upload_attempts", 5), backoff_s=c.get("upload_backoff_s", 1.0))


def storage_options(spec: DictConfig) -> dict[str, Any]:
    """``build_trainer`` keyword arguments that point Ray Train's storage at ``checkpoint.uri``."""
    if not is_s3(spec.checkpoint.uri):
        return {}
    return {"storage_filesystem": spec_filesystem(spec), "storage_path": fs_path(spec.checkpoint.uri)}


def _join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])


def _resolve(uri: str, fs=None, spec_endpoint: str | None = None):
    """(filesystem, path) for a URI; local paths get pyarrow's LocalFileSystem."""
    from pyarrow.fs import LocalFileSystem

    if is_s3(uri):
        return (fs or filesystem(spec_endpoint)), fs_path(uri)
    return LocalFileSystem(), os.path.abspath(uri)


# ---- small text files (chain state) --------------------------------------------------------------------
def read_text(uri: str, fs=None) -> str | None:
    """The text of a local or S3 file, or None if it does not exist."""
    from pyarrow.fs import FileType

    f, path = _resolve(uri, fs)
    if f.get_file_info(path).type != FileType.File:
        return None
    with f.open_input_stream(path) as stream:
        return stream.read().decode()


def write_text(uri: str, text: str, fs=None) -> None:
    f, path = _resolve(uri, fs)
    if not is_s3(uri):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(path).with_name(f".{Path(path).name}.tmp-{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, path)
        return
    with f.open_output_stream(path) as stream:  # an S3 PUT is atomic: readers see the old or the new object
        stream.write(text.encode())


# ---- writing checkpoints: retries with backoff, manifest last --------------------------------------------
T = TypeVar("T")
MAX_BACKOFF_S = 30.0


class StorageUnavailableError(OSError):
    """A storage operation still failed after all its tries (endpoint unreachable or failing); names the URI."""


class CheckpointUploadError(StorageUnavailableError):
    """A checkpoint could not be written to its storage after all tries; the message names the checkpoint URI."""


def _describe(err: BaseException) -> str:
    # Ray Train re-runs an upload whose error text contains "AWS Error <CODE>" (3 times, unlogged) on top of
    # our own tries: the final error is reworded so that the retry budget is the one the spec asks for.
    text = re.sub(r"AWS Error ", "AWS error ", str(err)).strip()
    return f"{type(err).__name__}: {text[:500]}"


def retry_with_backoff(
    fn: Callable[[], T],
    what: str,
    *,
    attempts: int,
    backoff_s: float,
    retry_on: tuple[type[BaseException], ...] = (OSError,),
    error: type[StorageUnavailableError] = StorageUnavailableError,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """``fn()``, tried up to ``attempts`` times while it raises one of ``retry_on``.

    Waits ``backoff_s`` before the second try and doubles the wait after each failed try (at most
    ``MAX_BACKOFF_S``); every failed try is printed. ``FileNotFoundError`` and an error that was already retried
    (:class:`StorageUnavailableError`) pass through at once. After the last try, raises ``error`` naming ``what``
    (e.g. the checkpoint URI and file), the number of tries, the time spent and the last error.
    """
    if attempts < 1:
        raise ValueError(f"attempts: expected an integer >= 1, got {attempts!r}")
    start = time.monotonic()
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except retry_on as err:
            if isinstance(err, (StorageUnavailableError, FileNotFoundError)):
                raise  # already retried / an answer, not an outage: callers may test for FileNotFoundError
            if attempt == attempts:
                raise error(
                    f"{what}: failed after {attempt} attempt{'s' if attempt > 1 else ''} over "
                    f"{time.monotonic() - start:.1f} s; last error: {_describe(err)}"
                ) from err
            delay = min(MAX_BACKOFF_S, backoff_s * 2 ** (attempt - 1))
            print(f"[ssl_platform] {what}: attempt {attempt}/{attempts} failed ({_describe(err)}); retrying in {delay:.1f} s", flush=True)
            sleep(delay)
    raise AssertionError("unreachable")  # the last attempt returns or raises


def find_storage_error(err: BaseException) -> StorageUnavailableError | None:
    """The :class:`StorageUnavailableError` behind a failed run, if any: Ray Train wraps it in a ``ControllerError``
    (the controller could not write its checkpoint bookkeeping) or a ``WorkerGroupError`` (a checkpoint upload)."""
    todo, seen = [err], set()
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, StorageUnavailableError):
            return e
        failures = getattr(e, "worker_failures", None)
        todo += [e.__cause__, e.__context__, getattr(e, "controller_failure", None), getattr(e, "_base_exc", None),
                 getattr(e, "cause", None), *(failures.values() if isinstance(failures, dict) else ())]
    return None


def storage_uri(fs, path: str) -> str:
    """The URI of ``path`` on pyarrow filesystem ``fs``: ``s3://bucket/key`` on S3, else the path."""
    return f"s3://{path.lstrip('/')}" if getattr(fs, "type_name", "") == "s3" else path


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


class RetryingS3FileSystem(S3FileSystem):
    """``pyarrow.fs.S3FileSystem`` whose Python-level operations are retried with :func:`retry_with_backoff`.

    Ray Train's controller writes its checkpoint bookkeeping (``checkpoint_manager_snapshot.json``) and deletes
    old checkpoints through the storage filesystem; without retries one failed request there ends the run, even
    when the checkpoint upload itself would have ridden the outage out. ``open_output_stream`` returns a
    buffered writer that sends the object on close, retried as a whole (for small files: checkpoint files go
    through :func:`upload_checkpoint_dir`). Calls made from C++ (``pyarrow.fs.copy_files``, e.g. Ray's download
    of a checkpoint) keep pyarrow's own per-request retries. Survives pickling (Ray sends it to every process).
    """

    def __init__(self, *, retry_attempts: int = 5, retry_backoff_s: float = 1.0, **kwargs: Any):
        super().__init__(**kwargs)
        self._kwargs = kwargs
        self.retry_attempts = retry_attempts
        self.retry_backoff_s = retry_backoff_s

    def __reduce__(self):
        return _rebuild_retrying_fs, (self._kwargs, self.retry_attempts, self.retry_backoff_s)

    def _retry(self, what: str, fn: Callable[[], T]) -> T:
        return retry_with_backoff(fn, what, attempts=self.retry_attempts, backoff_s=self.retry_backoff_s)

    def _uri(self, path: Any) -> str:
        return f"s3://{str(getattr(path, 'base_dir', path)).lstrip('/')}"

    def get_file_info(self, paths_or_selector):
        if isinstance(paths_or_selector, (list, tuple)):
            what = f"{len(paths_or_selector)} paths under s3://" if len(paths_or_selector) != 1 else self._uri(paths_or_selector[0])
        else:
            what = self._uri(paths_or_selector)
        return self._retry(f"listing {what}", lambda: S3FileSystem.get_file_info(self, paths_or_selector))

    def create_dir(self, path, *, recursive=True):
        return self._retry(f"creating {self._uri(path)}", lambda: S3FileSystem.create_dir(self, path, recursive=recursive))

    def delete_dir(self, path):
        return self._retry(f"deleting {self._uri(path)}", lambda: S3FileSystem.delete_dir(self, path))

    def delete_dir_contents(self, path, *, accept_root_dir=False, missing_dir_ok=False):
        return self._retry(f"deleting {self._uri(path)}", lambda: S3FileSystem.delete_dir_contents(
            self, path, accept_root_dir=accept_root_dir, missing_dir_ok=missing_dir_ok))

    def delete_file(self, path):
        return self._retry(f"deleting {self._uri(path)}", lambda: S3FileSystem.delete_file(self, path))

    def move(self, src, dest):
        return self._retry(f"moving {self._uri(src)}", lambda: S3FileSystem.move(self, src, dest))

    def copy_file(self, src, dest):
        return self._retry(f"copying {self._uri(src)}", lambda: S3FileSystem.copy_file(self, src, dest))

    def open_input_stream(self, path, compression="detect", buffer_size=None):
        return self._retry(f"reading {self._uri(path)}", lambda: S3FileSystem.open_input_stream(self, path, compression, buffer_size))

    def open_input_file(self, path):
        return self._retry(f"reading {self._uri(path)}", lambda: S3FileSystem.open_input_file(self, path))

    def open_output_stream(self, path, compression="detect", buffer_size=None, metadata=None):
        import pyarrow as pa

        def send(data: bytes) -> None:
            def put() -> None:
                with S3FileSystem.open_output_stream(self, path, compression, buffer_size, metadata) as out:
                    out.write(data)

            self._retry(f"writing {self._uri(path)}", put)

        return pa.PythonFile(_SendOnClose(send), mode="w")


def _rebuild_retrying_fs(kwargs: dict[str, Any], attempts: int, backoff_s: float) -> RetryingS3FileSystem:
    return RetryingS3FileSystem(retry_attempts=attempts, retry_backoff_s=backoff_s, **kwargs)


class _SendOnClose(io.RawIOBase):
    """Bytes kept in memory and handed to ``send`` once, on close."""

    def __init__(self, send: Callable[[bytes], None]):
        super().__init__()
        self._buf = io.BytesIO()
        self._send = send

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        return self._buf.write(data)

    def close(self) -> None:
        if not self.closed:
            try:
                self._send(self._buf.getvalue())
            finally:
                super().close()


# ---- checkpoints of a run ------------------------------------------------------------------------------
def list_checkpoint_uris(run_uri: str, fs=None) -> list[str]:
    """The ``checkpoint_*`` directories of a run (local path or ``s3://``), oldest first."""
    from pyarrow.fs import FileSelector, FileType

    f, path = _resolve(run_uri, fs)
    infos = f.get_file_info(FileSelector(path, allow_not_found=True, recursive=False))
    names = sorted(i.base_name for i in infos if i.type == FileType.Directory and i.base_name.startswith("checkpoint_"))
    return [_join(run_uri, n) for n in names]


def remote_manifest(ckpt_uri: str, fs=None) -> dict[str, Any]:
    """The manifest of a checkpoint after checking that every listed file exists with its recorded size.

    Raises :class:`IncompleteCheckpointError` (no manifest, missing file: an unfinished write or upload) or
    :class:`CheckpointError` (size mismatch, unreadable manifest). Checksums are checked on download.
    """
    from pyarrow.fs import FileSelector, FileType

    text = read_text(_join(ckpt_uri, MANIFEST_FILE), fs)
    if text is None:
        raise IncompleteCheckpointError(f"incomplete checkpoint {ckpt_uri!r}: no {MANIFEST_FILE} (written last; the writer or upload did not finish)")
    try:
        manifest = json.loads(text)
        files = manifest["files"]
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"checkpoint {ckpt_uri!r}: unreadable {MANIFEST_FILE} ({err})") from None
    f, path = _resolve(ckpt_uri, fs)
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


def latest_complete_checkpoint_uri(run_uri: str, fs=None) -> str | None:
    """The newest checkpoint of a run whose manifest exists and whose files are all there, or None."""
    for uri in reversed(list_checkpoint_uris(run_uri, fs)):
        try:
            remote_manifest(uri, fs)
            return uri
        except CheckpointError:
            continue
    return None


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


# ---- method checkpoints (SALT teacher) -----------------------------------------------------------------
def _teacher(spec: DictConfig) -> str | None:
    teacher = spec.method.get("teacher") if isinstance(spec.method, DictConfig) else None
    return str(teacher) if teacher else None


def localize_method_checkpoints(spec: DictConfig, fs=None) -> DictConfig:
    """A copy of ``spec`` whose ``method.teacher`` is a verified local directory (downloaded if ``s3://``)."""
    teacher = _teacher(spec)
    if not is_s3(teacher):
        return spec
    out = OmegaConf.create(OmegaConf.to_container(spec, resolve=True))
    out.method.teacher = str(download_checkpoint(teacher, fs=fs or spec_filesystem(spec)))
    return out


def preflight_method_checkpoints(spec: DictConfig) -> None:
    """Before Ray starts: the spec's teacher checkpoint exists, is complete and matches ``method.encoder_*``."""
    teacher = _teacher(spec)
    if teacher is None:
        return
    from ssl_platform.spec import SpecError

    if not is_s3(teacher) and not Path(teacher).exists():
        raise SpecError("method.teacher", "an existing checkpoint directory (local path) or s3:// URI", teacher)
    local = localize_method_checkpoints(spec).method.teacher
    payload = load_encoder_file(local)
    kwargs = spec.method.get("encoder_kwargs")
    kwargs = OmegaConf.to_container(kwargs, resolve=True) if isinstance(kwargs, DictConfig) else kwargs
    check_encoder_config(payload, spec.method.get("encoder_name", "vit_tiny_patch16_224"), kwargs, f"method.teacher {teacher!r}")


def worker_storage_options(spec: DictConfig) -> dict[str, Any]:
    """``build_trainer`` keyword arguments for a spec: Ray storage on S3 and the workers' S3 filesystem."""
    out = storage_options(spec)
    if spec_needs_s3(spec):
        out["s3_filesystem"] = out.get("storage_filesystem") or spec_filesystem(spec)
    return out
