"""A method's checkpoint arguments (``SSLMethod.checkpoint_params``, e.g. SALT's ``teacher``), for any method.

* :func:`preflight_method_checkpoints` runs before Ray starts: every checkpoint the spec gives the method exists,
  is complete (manifest, sizes, SHA-256) and suits the method (``SSLMethod.check_checkpoint``, e.g. the
  teacher's architecture against ``method.encoder_*``).
* :func:`localize_method_checkpoints` runs in each worker before the method is built: ``s3://`` checkpoints are
  replaced by verified local copies (:mod:`ssl_platform.storage.checkpoint_cache`).
* :func:`localize_encoder_init` gives a local copy of ``method.encoder_init`` (released weights, one file) and
  :func:`preflight_encoder_init` checks them against the method's encoder before Ray starts.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from methods.checkpoint_io import CheckpointError
from methods.pretrained import encoder_init_targets, fit_state_dict, read_checkpoint, to_timm
from methods.registry import build_method, get_method_class
from ssl_platform.spec import SpecError, method_checkpoint_params, method_kwargs
from ssl_platform.storage.checkpoint_cache import cache_root, download_checkpoint
from ssl_platform.storage.s3 import fs_path, is_s3, spec_filesystem


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


def localize_encoder_init(uri: str, checkpoint: DictConfig, fs=None) -> Path:
    """A local copy of the released-weights file ``uri`` (``method.encoder_init``): a local path as it is; an ``s3://``
    object downloaded once into the cache (keyed by URI, size and modification time; renamed into place)."""
    if not is_s3(uri):
        if not Path(uri).is_file():
            raise CheckpointError(f"method.encoder_init: expected an existing checkpoint file (or s3:// URI), got {uri!r}")
        return Path(uri)
    from pyarrow.fs import FileType

    fs = fs or spec_filesystem(checkpoint)
    info = fs.get_file_info(fs_path(uri))
    if info.type != FileType.File:
        raise CheckpointError(f"method.encoder_init: expected an existing object, got {uri!r} (not found)")
    key = hashlib.sha256(f"{uri}|{info.size}|{info.mtime_ns}".encode()).hexdigest()[:20]
    target = cache_root() / "encoder_init" / key / Path(fs_path(uri)).name
    if target.is_file() and target.stat().st_size == info.size:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".download-", dir=target.parent)
    with os.fdopen(fd, "wb") as out, fs.open_input_stream(fs_path(uri)) as stream:
        while chunk := stream.read(1 << 24):
            out.write(chunk)
    os.replace(tmp, target)
    return target


def _shape_only_method(method: DictConfig):
    """The spec's method built on the meta device (shapes, no memory), or on the CPU if its constructor needs values."""
    kwargs = method_kwargs(method)
    try:
        with torch.device("meta"):
            return build_method(method.name, **kwargs)
    except Exception:  # a constructor that reads values (e.g. .item()) cannot run on meta tensors
        return build_method(method.name, **kwargs)


def preflight_encoder_init(method: DictConfig, checkpoint: DictConfig) -> str | None:
    """Before Ray starts: ``method.encoder_init`` is readable, in a known layout, and fits the method's encoder (keys and
    shapes; the position grid may differ: it is resampled). Returns the layout found; raises
    :class:`methods.checkpoint_io.CheckpointError` naming the key and what does not fit."""
    uri = method.get("encoder_init")
    if not uri:
        return None
    label = f"method.encoder_init {uri!r}"
    sd, layout = to_timm(read_checkpoint(localize_encoder_init(str(uri), checkpoint)), label)
    for target in encoder_init_targets(_shape_only_method(method)):
        fit_state_dict(sd, target.state_dict(), f"{label} ({layout} layout, encoder {method.get('encoder_name')!r})")
    return layout
