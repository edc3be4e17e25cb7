"""A method's checkpoint arguments (``SSLMethod.checkpoint_params``, e.g. SALT's ``teacher``), for any method.

* :func:`preflight_method_checkpoints` runs before Ray starts: every checkpoint the spec gives the method exists,
  is complete (manifest, sizes, SHA-256) and suits the method (``SSLMethod.check_checkpoint``, e.g. the
  teacher's architecture against ``method.encoder_*``).
* :func:`localize_method_checkpoints` runs in each worker before the method is built: ``s3://`` checkpoints are
  replaced by verified local copies (:mod:`ssl_platform.storage.checkpoint_cache`).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from methods.registry import get_method_class
from ssl_platform.spec import SpecError, method_checkpoint_params, method_kwargs
from ssl_platform.storage.checkpoint_cache import download_checkpoint
from ssl_platform.storage.s3 import is_s3, spec_filesystem


def localize_method_checkpoints(method: DictConfig, checkpoint: DictConfig, fs=None) -> DictConfig:
    """The spec's ``method`` section, or a copy of it whose ``s3://`` checkpoint arguments are verified local
    directories (fetched with ``fs``, else a filesystem from the ``checkpoint`` section's S3 settings)."""
    remote = [k for k in method_checkpoint_params(method) if is_s3(str(method[k]))]
    if not remote:
        return method
    out = OmegaConf.create(OmegaConf.to_container(method, resolve=True))
    fs = fs or spec_filesystem(checkpoint)
    for key in remote:
        out[key] = str(download_checkpoint(str(method[key]), fs=fs))
    return out


def preflight_method_checkpoints(method: DictConfig, checkpoint: DictConfig) -> None:
    """Before Ray starts: each checkpoint argument of the method (the spec's ``method`` section) exists, is complete
    and suits the method; ``s3://`` ones are fetched with the ``checkpoint`` section's S3 settings.

    Raises :class:`SpecError` for a local path that does not exist, and the method's
    :class:`methods.checkpoint_io.CheckpointError` for an incomplete, corrupt or mismatched checkpoint.
    """

    keys = method_checkpoint_params(method)
    for key in keys:
        value = str(method[key])
        if not is_s3(value) and not Path(value).exists():
            raise SpecError(f"method.{key}", "an existing checkpoint directory (local path) or s3:// URI", value)
    if not keys:
        return
    cls = get_method_class(method.name)
    local = localize_method_checkpoints(method, checkpoint)
    kwargs = method_kwargs(method)
    for key in keys:
        cls.check_checkpoint(key, str(local[key]), kwargs, f"method.{key} {str(method[key])!r}")
