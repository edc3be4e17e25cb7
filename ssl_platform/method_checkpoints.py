"""A method's checkpoint arguments (``SSLMethod.checkpoint_params``, e.g. SALT's ``teacher``), for any method.

* :func:`preflight_method_checkpoints` runs before Ray starts: every checkpoint the spec gives the method exists,
  is complete (manifest, sizes, SHA-256) and suits the method (``SSLMethod.check_checkpoint``, e.g. the
  teacher's architecture against ``method.encoder_*``).
* :func:`localize_method_checkpoints` runs in each worker before the method is built: ``s3://`` checkpoints are
  replaced by verified local copies (:mod:`ssl_platform.checkpoint_cache`).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ssl_platform.checkpoint_cache import download_checkpoint
from ssl_platform.s3 import is_s3, spec_filesystem
from ssl_platform.spec import SpecError, method_checkpoint_params, method_kwargs


def localize_method_checkpoints(spec: DictConfig, fs=None) -> DictConfig:
    """``spec``, or a copy of it whose ``s3://`` checkpoint arguments of the method are verified local directories."""
    remote = [k for k in method_checkpoint_params(spec) if is_s3(str(spec.method[k]))]
    if not remote:
        return spec
    out = OmegaConf.create(OmegaConf.to_container(spec, resolve=True))
    fs = fs or spec_filesystem(spec)
    for key in remote:
        out.method[key] = str(download_checkpoint(str(spec.method[key]), fs=fs))
    return out


def preflight_method_checkpoints(spec: DictConfig) -> None:
    """Before Ray starts: each checkpoint argument of the method exists, is complete and suits the method.

    Raises :class:`SpecError` for a local path that does not exist, and the method's
    :class:`methods.checkpoint_io.CheckpointError` for an incomplete, corrupt or mismatched checkpoint.
    """
    from methods.registry import get_method_class

    keys = method_checkpoint_params(spec)
    for key in keys:
        value = str(spec.method[key])
        if not is_s3(value) and not Path(value).exists():
            raise SpecError(f"method.{key}", "an existing checkpoint directory (local path) or s3:// URI", value)
    if not keys:
        return
    cls = get_method_class(spec.method.name)
    local = localize_method_checkpoints(spec)
    kwargs = method_kwargs(spec)
    for key in keys:
        cls.check_checkpoint(key, str(local.method[key]), kwargs, f"method.{key} {str(spec.method[key])!r}")
