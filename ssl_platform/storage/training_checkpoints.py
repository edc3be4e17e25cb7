"""Training checkpoints: one directory each, with ``manifest.json`` written last.

Layout of a checkpoint directory::

    model.pt        method state dict (the whole method: encoder, heads, teacher, centres)
    optimizer.pt    optimizer + LR-scheduler state
    encoder.pt      the exported encoder (``methods.checkpoint_io`` format: name, kwargs, state dict)
    state.json      epoch, global step, metrics so far, random-init baseline, MLflow run id
    spec.yaml       the resolved spec (secrets redacted)
    manifest.json   files with sizes and SHA-256, step, spec hash -- written LAST

A directory without a manifest, or whose files do not match it, is never loaded. The checkpoints of a local run
are listed and searched with :mod:`ssl_platform.storage.run_checkpoints` (the same loop as for ``s3://`` runs), checked
here with the full :func:`methods.checkpoint_io.verify_manifest` (sizes and SHA-256).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from methods import checkpoint_io
from methods.checkpoint_io import CheckpointError, IncompleteCheckpointError, verify_manifest
from ssl_platform.spec import dump_yaml, spec_hash
from ssl_platform.storage.run_checkpoints import latest_complete_checkpoint_uri, list_checkpoint_uris

__all__ = [
    "CheckpointError",
    "IncompleteCheckpointError",
    "write_training_checkpoint",
    "load_training_checkpoint",
    "list_checkpoints",
    "latest_complete_checkpoint",
    "latest_checkpoint_of_run",
]


def write_training_checkpoint(
    directory: str | os.PathLike,
    *,
    method,
    optimizer: torch.optim.Optimizer,
    scheduler,
    spec: DictConfig,
    state: dict[str, Any],
    model_state: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict[str, Any] | None = None,
    encoder_state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a checkpoint directory. ``model_state`` / ``optimizer_state`` / ``encoder_state``: full (unsharded) state
    dicts gathered by the caller (the trainer passes them under every ``scaling.strategy``, the optimizer's keyed by
    parameter names, :mod:`ssl_platform.training.sharding`); unset: ``method.state_dict()``, ``optimizer.state_dict()``
    and ``method.encoder_state_dict()`` of an unsharded method."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    torch.save(model_state if model_state is not None else method.state_dict(), d / "model.pt")
    opt = optimizer_state if optimizer_state is not None else optimizer.state_dict()
    torch.save({"optimizer": opt, "scheduler": scheduler.state_dict()}, d / "optimizer.pt")
    encoder = encoder_state if encoder_state is not None else method.encoder_state_dict()
    checkpoint_io.save_encoder(d, method.method_name, method.encoder_config(), encoder, manifest=False)
    (d / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True, default=float))
    (d / "spec.yaml").write_text(dump_yaml(spec))
    checkpoint_io.write_manifest(
        d,
        {
            "method": method.method_name,
            "epoch": state.get("epoch"),
            "global_step": state.get("global_step"),
            "spec_hash": spec_hash(spec),
        },
    )
    return d


def load_training_checkpoint(directory: str | os.PathLike) -> dict[str, Any]:
    """Verify the manifest, then load model/optimizer state and ``state.json``."""
    d = Path(directory)
    if not d.is_dir():
        what = "a file" if d.exists() else "no such directory"
        raise CheckpointError(f"checkpoint {str(d)!r}: expected a training checkpoint directory (with manifest.json), got {what}")
    manifest = verify_manifest(d)
    for name in ("model.pt", "optimizer.pt", "state.json"):
        if name not in manifest["files"]:
            raise CheckpointError(f"checkpoint {str(d)!r} is not a training checkpoint: {name!r} is not in its manifest")
    model = _torch_load(d, "model.pt", weights_only=True)
    opt = _torch_load(d, "optimizer.pt", weights_only=False)
    _check_training_payload(d, model, opt)
    try:
        state = json.loads((d / "state.json").read_text())
    except ValueError as err:
        raise CheckpointError(f"checkpoint {str(d)!r}: unreadable 'state.json' ({err})") from None
    if not isinstance(state, dict) or not {"epoch", "global_step"} <= set(state):
        raise CheckpointError(f"checkpoint {str(d)!r}: 'state.json' has no epoch/global_step, not a training checkpoint")
    return {"model": model, "optimizer": opt["optimizer"], "scheduler": opt["scheduler"], "state": state, "manifest": manifest}


def _torch_load(d: Path, name: str, *, weights_only: bool) -> Any:
    try:
        return torch.load(d / name, map_location="cpu", weights_only=weights_only)
    except Exception as err:  # corrupt or foreign file: never a crash deep inside torch
        raise CheckpointError(f"checkpoint {str(d)!r}: unreadable torch file {name!r} ({type(err).__name__}: {str(err)[:200]})") from None


def _check_training_payload(d: Path, model: Any, opt: Any) -> None:
    """A foreign torch file (another tool's checkpoint) is rejected with the key that is wrong."""
    if not isinstance(model, dict) or not all(isinstance(v, torch.Tensor) for v in model.values()):
        raise CheckpointError(f"checkpoint {str(d)!r}: 'model.pt' is not a state dict of tensors (foreign file?), got {type(model).__name__}")
    if not isinstance(opt, dict) or not {"optimizer", "scheduler"} <= set(opt):
        seen = sorted(map(str, opt)) if isinstance(opt, dict) else type(opt).__name__
        raise CheckpointError(f"checkpoint {str(d)!r}: 'optimizer.pt' expected keys ['optimizer', 'scheduler'], got {seen}")


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Ray Train's checkpoint directories of a local run (``checkpoint_*``), oldest first."""

    return [Path(uri) for uri in list_checkpoint_uris(str(run_dir))]


def latest_complete_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest checkpoint directory of a local run whose manifest verifies (sizes and SHA-256), or None."""

    uri = latest_complete_checkpoint_uri(str(run_dir), check=verify_manifest)
    return Path(uri) if uri else None


def latest_checkpoint_of_run(run_dir: str | os.PathLike, mlflow_run_id: str | None) -> Path | None:
    """The newest complete checkpoint of ``run_dir`` written for ``mlflow_run_id`` (its ``state.json``), or None.

    Ray Train registers a reported checkpoint asynchronously: a worker lost right after a report can restart
    the group with no checkpoint although one was persisted. This finds it (local storage only).
    """

    def written_for_this_run(ckpt: str) -> None:
        verify_manifest(ckpt)
        try:
            state = json.loads((Path(ckpt) / "state.json").read_text())
        except (OSError, ValueError) as err:
            raise CheckpointError(f"checkpoint {ckpt!r}: unreadable 'state.json' ({err})") from None
        if not isinstance(state, dict) or state.get("mlflow_run_id") != mlflow_run_id:
            raise CheckpointError(f"checkpoint {ckpt!r} was not written for MLflow run {mlflow_run_id!r}")

    if not mlflow_run_id or not Path(run_dir).is_dir():
        return None
    uri = latest_complete_checkpoint_uri(str(run_dir), check=written_for_this_run)
    return Path(uri) if uri else None
