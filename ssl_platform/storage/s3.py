"""S3 URIs, and S3 filesystems built from the standard AWS configuration.

* :func:`is_s3`, :func:`split_s3`, :func:`fs_path`: ``s3://bucket/key`` URIs and the paths pyarrow expects.
* :func:`filesystem` builds a picklable :class:`ssl_platform.storage.retrying_fs.RetryingS3FileSystem` (its Python-level
  calls retried with backoff) from the standard AWS configuration (``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``,
  ``AWS_ACCESS_KEY_ID``..., profiles, IAM roles) or the spec's ``checkpoint.endpoint_url`` (endpoint only, never
  secrets). pyarrow's constructor does not read the endpoint variables itself, and Ray builds filesystems in every
  process, so the object is handed to Ray Train (``storage_filesystem``) and to the workers, which need it to fetch
  a method's checkpoint (e.g. SALT's teacher) from S3.
* :func:`storage_options` / :func:`worker_storage_options`: the ``build_trainer`` arguments for a spec.

The rest of the storage layer: :mod:`ssl_platform.storage.retry` (retries with backoff), :mod:`ssl_platform.storage.uri_files`
(small files by URI), :mod:`ssl_platform.storage.run_checkpoints` (a run's checkpoints on any storage),
:mod:`ssl_platform.storage.checkpoint_cache` (verified local copies), :mod:`ssl_platform.storage.checkpoint_upload` (manifest
last) and :mod:`ssl_platform.storage.method_checkpoints` (a method's checkpoint arguments).
"""

from __future__ import annotations

import os
from typing import Any

from omegaconf import DictConfig

from ssl_platform.spec import method_checkpoint_params
from ssl_platform.storage.retrying_fs import RetryingS3FileSystem

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


def spec_needs_s3(checkpoint: DictConfig, method: DictConfig) -> bool:
    """The spec keeps its checkpoints on S3 (its ``checkpoint`` section) or gives the method a checkpoint there
    (its ``method`` section, e.g. an ``s3://`` teacher)."""

    return (is_s3(checkpoint.uri) or any(is_s3(str(method[k])) for k in method_checkpoint_params(method))
            or is_s3(method.get("encoder_init")))  # released weights to start the encoder from


def spec_filesystem(checkpoint: DictConfig) -> RetryingS3FileSystem:
    """:func:`filesystem` for the spec's ``checkpoint`` section: its ``endpoint_url`` and ``upload_*`` retry settings."""
    return filesystem(checkpoint.get("endpoint_url"), attempts=checkpoint.get("upload_attempts", 5),
                      backoff_s=checkpoint.get("upload_backoff_s", 1.0))


def storage_options(checkpoint: DictConfig) -> dict[str, Any]:
    """``build_trainer`` keyword arguments that point Ray Train's storage at ``checkpoint.uri``."""
    if not is_s3(checkpoint.uri):
        return {}
    return {"storage_filesystem": spec_filesystem(checkpoint), "storage_path": fs_path(checkpoint.uri)}


def worker_storage_options(checkpoint: DictConfig, method: DictConfig) -> dict[str, Any]:
    """``build_trainer`` keyword arguments for the spec's ``checkpoint`` and ``method`` sections: Ray storage on S3
    and the workers' S3 filesystem."""
    out = storage_options(checkpoint)
    if spec_needs_s3(checkpoint, method):
        out["s3_filesystem"] = out.get("storage_filesystem") or spec_filesystem(checkpoint)
    return out
