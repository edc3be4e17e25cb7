"""Encoder checkpoint format shared by the methods (SALT's teacher) and the platform.

A checkpoint is a DIRECTORY. It holds ``encoder.pt`` plus whatever else the platform stores (method and
optimizer state, spec, ...) and ``manifest.json``, written LAST (atomically): a directory without
``manifest.json`` is an incomplete checkpoint and is never loaded. ``encoder.pt`` is::

    torch.save({"format": "ssl_platform.encoder/v1", "method": <method name>, "encoder_name": <timm name>,
                "encoder_kwargs": {...}, "state_dict": {name: tensor}})

Loading accepts the directory or the ``encoder.pt`` file itself. Pure torch, local paths only (the platform
copies remote checkpoints to a local directory first).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

ENCODER_FORMAT = "ssl_platform.encoder/v1"
ENCODER_FILE = "encoder.pt"
MANIFEST_FILE = "manifest.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: incomplete, wrong format, or not matching the requested encoder."""


class IncompleteCheckpointError(CheckpointError):
    """A checkpoint directory without ``manifest.json`` (its writer did not finish)."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint's architecture or state dict does not match the module it is loaded into."""


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(directory: str | os.PathLike, extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``manifest.json`` (atomically, last): every file of ``directory`` with size and SHA-256, plus ``extra``."""
    d = Path(directory)
    files = {
        p.relative_to(d).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(d.rglob("*"))
        if p.is_file() and p.name != MANIFEST_FILE and not p.name.startswith(".")
    }
    manifest = {"format": "ssl_platform.checkpoint/v1", "files": files, **dict(extra or {})}
    tmp = d / f".{MANIFEST_FILE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
    os.replace(tmp, d / MANIFEST_FILE)
    return d / MANIFEST_FILE


def verify_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """Check that ``directory`` is a complete checkpoint: manifest present, every listed file present with
    the recorded size and SHA-256. Returns the manifest; raises :class:`IncompleteCheckpointError` (no
    manifest, missing file) or :class:`CheckpointError` (size or checksum mismatch, unreadable manifest)."""
    d = Path(directory)
    mpath = d / MANIFEST_FILE
    if not mpath.is_file():
        raise IncompleteCheckpointError(
            f"incomplete checkpoint {str(d)!r}: no {MANIFEST_FILE} (written last; the writer did not finish)"
        )
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"checkpoint {str(d)!r}: unreadable {MANIFEST_FILE} ({err})") from None
    for name, meta in files.items():
        f = d / name
        if not f.is_file():
            raise IncompleteCheckpointError(f"incomplete checkpoint {str(d)!r}: {name!r} is listed in the manifest but missing")
        size = meta["size"] if isinstance(meta, dict) else meta
        if f.stat().st_size != size:
            raise CheckpointError(f"checkpoint {str(d)!r}: {name!r} has {f.stat().st_size} bytes, the manifest says {size}")
        if isinstance(meta, dict) and "sha256" in meta and _sha256(f) != meta["sha256"]:
            raise CheckpointError(f"checkpoint {str(d)!r}: {name!r} fails its SHA-256 checksum (corrupt or changed)")
    return manifest


def save_encoder(
    path: str | os.PathLike,
    method_name: str,
    encoder_config: Mapping[str, Any],
    state_dict: Mapping[str, torch.Tensor],
    *,
    manifest: bool = True,
) -> Path:
    """Save an encoder; return the path of ``encoder.pt``.

    :param path: checkpoint directory (created if needed), or a file path ending in ``.pt``.
    :param method_name: the method that trained the encoder (e.g. ``"mae"``).
    :param encoder_config: ``{"encoder_name": ..., "encoder_kwargs": {...}}`` (``SSLMethod.encoder_config()``).
    :param state_dict: the encoder's weights (moved to CPU).
    :param manifest: for a directory, write ``manifest.json`` afterwards. The platform passes ``False`` when it
        adds more files and then calls :func:`write_manifest` itself, last.
    """
    if "encoder_name" not in encoder_config:
        raise ValueError(f"encoder_config needs an 'encoder_name' key, got keys {sorted(encoder_config)}")
    p = Path(path)
    is_file = p.suffix == ".pt"
    target = p if is_file else p / ENCODER_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": ENCODER_FORMAT,
        "method": str(method_name),
        "encoder_name": str(encoder_config["encoder_name"]),
        "encoder_kwargs": dict(encoder_config.get("encoder_kwargs") or {}),
        "state_dict": {k: v.detach().cpu().clone() for k, v in state_dict.items()},
    }
    _atomic_torch_save(payload, target)
    if manifest and not is_file:
        write_manifest(p, {"method": str(method_name), "encoder_name": payload["encoder_name"]})
    return target


def load_encoder_file(path: str | os.PathLike) -> dict[str, Any]:
    """Load an encoder checkpoint (directory with ``manifest.json``, or an ``encoder.pt`` file).

    Returns the dict saved by :func:`save_encoder`. Raises :class:`IncompleteCheckpointError` for a directory
    without a manifest and :class:`CheckpointError` for a missing file or another format.
    """
    p = Path(path)
    if p.is_dir():
        verify_manifest(p)
        p = p / ENCODER_FILE
    if not p.is_file():
        raise CheckpointError(f"checkpoint {str(p)!r}: no such file (expected a checkpoint directory or {ENCODER_FILE})")
    try:
        payload = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt or foreign file: never a crash deep inside torch
        raise CheckpointError(f"checkpoint {str(p)!r}: not a readable torch file ({type(err).__name__}: {str(err)[:200]})") from None
    if not isinstance(payload, dict) or payload.get("format") != ENCODER_FORMAT:
        seen = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"checkpoint {str(p)!r}: expected format {ENCODER_FORMAT!r}, got {seen!r}")
    for key in ("encoder_name", "encoder_kwargs", "state_dict"):
        if key not in payload:
            raise CheckpointError(f"checkpoint {str(p)!r}: missing key {key!r}")
    return payload


def _normalise(value: Any) -> Any:
    """Make kwargs comparable across YAML/JSON/Python (tuples vs lists)."""
    if isinstance(value, Mapping):
        return {str(k): _normalise(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    return value


def check_encoder_config(payload: Mapping[str, Any], encoder_name: str, encoder_kwargs: Mapping[str, Any] | None, what: str) -> None:
    """Raise :class:`CheckpointMismatchError` naming the difference if the checkpoint's encoder config differs.

    ``encoder_kwargs=None`` means "whatever the checkpoint says" (only the name is checked).
    """
    if payload["encoder_name"] != encoder_name:
        raise CheckpointMismatchError(
            f"{what}: checkpoint encoder_name {payload['encoder_name']!r} != requested encoder_name {encoder_name!r}"
        )
    if encoder_kwargs is None:
        return
    saved, wanted = _normalise(payload["encoder_kwargs"]), _normalise(encoder_kwargs)
    if saved != wanted:
        keys = sorted(set(saved) | set(wanted))
        diffs = [f"{k}: checkpoint {saved.get(k, '<unset>')!r} vs requested {wanted.get(k, '<unset>')!r}" for k in keys if saved.get(k, "<unset>") != wanted.get(k, "<unset>")]
        raise CheckpointMismatchError(f"{what}: encoder_kwargs differ ({'; '.join(diffs)})")


def _short(keys: Iterable[str], limit: int = 10) -> str:
    keys = list(keys)
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_state_dict_strict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str) -> None:
    """``module.load_state_dict(state_dict, strict=True)`` with an error that names every mismatch.

    Raises :class:`CheckpointMismatchError` listing missing keys, unexpected keys and differing shapes.
    """
    check_state_dict(module.state_dict(), state_dict, what)
    module.load_state_dict(dict(state_dict), strict=True)


def check_state_dict(own: Mapping[str, torch.Tensor], state_dict: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise :class:`CheckpointMismatchError` listing the missing keys, unexpected keys and differing shapes of
    ``state_dict`` against a module's own state dict ``own`` (sharded tensors compare by their global shape)."""
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys [{_short(missing)}]")
        if unexpected:
            parts.append(f"unexpected keys [{_short(unexpected)}]")
        if shapes:
            parts.append(f"shape mismatch [{_short(shapes, 5)}]")
        raise CheckpointMismatchError(f"{what}: state dict does not match the model: " + "; ".join(parts))
