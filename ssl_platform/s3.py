"""Checkpoint URIs on S3 (or any S3-compatible server) and on local disk.

* :func:`filesystem` builds a picklable ``pyarrow.fs.S3FileSystem`` from the standard AWS configuration
  (``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``..., profiles, IAM roles) or the spec's
  ``checkpoint.endpoint_url`` (endpoint only, never secrets). pyarrow's constructor does not read the
  endpoint variables itself, and Ray builds filesystems in every process, so the object is handed to Ray
  Train (``storage_filesystem``) and to the workers, which need it to fetch a teacher from S3.
* :func:`list_checkpoint_uris` / :func:`latest_complete_checkpoint_uri` list the checkpoints of a run.
* :func:`download_checkpoint` copies a checkpoint (``s3://`` or local) into a local cache directory and
  verifies its manifest (files, sizes, SHA-256): a half-uploaded or corrupt checkpoint is never loaded.
* :func:`preflight_method_checkpoints` runs before Ray starts: the SALT teacher of a spec must exist, be
  complete and have the architecture the spec asks for.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

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


def filesystem(spec_endpoint: str | None = None):
    """A picklable ``pyarrow.fs.S3FileSystem`` for the configured endpoint, region and credentials."""
    import boto3
    from pyarrow.fs import S3FileSystem

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
    return S3FileSystem(**kwargs)


def boto3_client(spec_endpoint: str | None = None):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint_url(spec_endpoint), region_name=boto3.Session().region_name or "us-east-1")


def spec_needs_s3(spec: DictConfig) -> bool:
    return is_s3(spec.checkpoint.uri) or is_s3(_teacher(spec))


def storage_options(spec: DictConfig) -> dict[str, Any]:
    """``build_trainer`` keyword arguments that point Ray Train's storage at ``checkpoint.uri``."""
    if not is_s3(spec.checkpoint.uri):
        return {}
    return {"storage_filesystem": filesystem(spec.checkpoint.get("endpoint_url")), "storage_path": fs_path(spec.checkpoint.uri)}


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
    out.method.teacher = str(download_checkpoint(teacher, fs=fs or filesystem(spec.checkpoint.get("endpoint_url"))))
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
        out["s3_filesystem"] = out.get("storage_filesystem") or filesystem(spec.checkpoint.get("endpoint_url"))
    return out
