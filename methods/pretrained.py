"""Released weights as the start of an encoder (``method.encoder_init``): official checkpoint layouts renamed to timm's
VisionTransformer, checked against the encoder (missing / unexpected keys, shapes) and position embeddings resampled
when the patch grid differs.

Layouts (detected from the keys; pure torch, local files: the platform copies ``s3://`` files first):

* ``timm``: a timm ViT state dict (or ``{"state_dict": ...}``, or this platform's ``encoder.pt``).
* ``dino``: facebookresearch/dino. The released backbones (``dino_vitbase16_pretrain.pth``) are timm-named state dicts;
  the full checkpoints (``..._full_checkpoint.pth``, ``checkpoint.pth`` of ``main_dino.py``) hold ``teacher``
  (``backbone.*`` / ``head.*``) and ``student`` (``module.backbone.*``: DDP): the teacher's backbone is taken.
* ``ibot``: bytedance/ibot, as DINO (``teacher`` / ``student``, ``backbone.`` / ``module.backbone.``; released
  ``checkpoint_teacher.pth`` holds ``{"state_dict": ...}``); iBOT's ``masked_embed`` (its mask token) is dropped.
* ``mae``: facebookresearch/mae ``{"model": ...}`` (``mae_pretrain_vit_base.pth``: the encoder; the visualisation
  checkpoints add ``decoder_*`` and ``mask_token``, dropped).
* ``data2vec``: the Hugging Face ``Data2VecVisionModel`` layout of the released data2vec (v1) vision checkpoints
  (``facebook/data2vec-vision-base``): ``data2vec_vision.embeddings.*``, ``encoder.layer.N.attention.attention.query``
  / ``key`` (no bias) / ``value``, ``layernorm_before`` / ``layernorm_after``, ``lambda_1`` / ``lambda_2`` (layer scale:
  set ``encoder_kwargs.init_values``), ``pooler.layernorm`` (mean pooling: ``global_pool: avg``). Relative position
  biases have no place in a timm ViT: such a checkpoint is refused, naming the keys. fairseq's data2vec 2.0 image
  checkpoints (``base_imagenet.pt``) are refused too: their blocks are post-LayerNorm (``layer_norm_first: false``),
  not the pre-norm blocks of a timm ViT, so renamed keys would compute something else.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from methods.checkpoint_io import ENCODER_FORMAT, CheckpointError, check_state_dict
from methods.teacher_student import EMATeacherMethod

LAYOUTS = ("timm", "dino", "ibot", "mae", "data2vec")


def read_checkpoint(path: str | os.PathLike) -> Any:
    """A released checkpoint file, on the CPU (tensors, dicts, and the ``argparse.Namespace`` of the official
    training scripts' ``args``; nothing else is unpickled)."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"method.encoder_init {str(path)!r}: no such file (expected a checkpoint file)")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # a foreign or corrupt file: never a crash deep inside torch
        raise CheckpointError(f"method.encoder_init {str(path)!r}: not a readable torch checkpoint "
                              f"({type(err).__name__}: {str(err)[:200]})") from None


def _tensors(d: Mapping) -> dict[str, torch.Tensor]:
    return {str(k): v for k, v in d.items() if isinstance(v, torch.Tensor)}


def _strip(sd: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sd.items()}


def _backbone(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DINO / iBOT: ``module.`` (DDP) off, then only the ``backbone.`` part (the heads dropped)."""
    sd = _strip(sd, "module.")
    if any(k.startswith("backbone.") for k in sd):
        sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    return sd


def _hf_data2vec(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face ``Data2VecVisionModel`` keys -> timm ViT keys (query / key / value -> one ``qkv``)."""
    sd = _strip(sd, "data2vec_vision.")
    rel = [k for k in sd if "relative_position" in k]
    if rel:
        raise CheckpointError(f"method.encoder_init: a data2vec checkpoint with relative position biases ({rel[:3]}): "
                              "a timm ViT has absolute positions only (use a checkpoint with "
                              "use_absolute_position_embeddings)")
    out: dict[str, torch.Tensor] = {}
    simple = {"embeddings.cls_token": "cls_token", "embeddings.position_embeddings": "pos_embed",
              "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
              "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
              "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias",
              "pooler.layernorm.weight": "fc_norm.weight", "pooler.layernorm.bias": "fc_norm.bias"}
    per_layer = {"attention.output.dense": "attn.proj", "layernorm_before": "norm1", "layernorm_after": "norm2",
                 "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2"}
    for key, value in sd.items():
        m = re.match(r"encoder\.layer\.(\d+)\.(.+)$", key)
        if key in simple:
            out[simple[key]] = value
        elif key == "embeddings.mask_token":
            continue  # the pretext task's mask token, not part of the encoder
        elif m is None:
            out[key] = value  # reported as unexpected
        elif m.group(2) in ("lambda_1", "lambda_2"):
            out[f"blocks.{m.group(1)}.ls{m.group(2)[-1]}.gamma"] = value
        elif m.group(2).startswith("attention.attention."):
            continue  # query / key / value: joined below
        else:
            name, _, leaf = m.group(2).rpartition(".")
            out[f"blocks.{m.group(1)}.{per_layer.get(name, name)}.{leaf}"] = value
    for i in sorted({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.layer\.(\d+)\.", k))}):
        a = f"encoder.layer.{i}.attention.attention."
        q, k, v = (sd[a + n + ".weight"] for n in ("query", "key", "value"))
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat([q, k, v])
        if a + "query.bias" in sd:  # BEiT-style: no key bias (zeros)
            out[f"blocks.{i}.attn.qkv.bias"] = torch.cat([sd[a + "query.bias"], torch.zeros_like(sd[a + "query.bias"]),
                                                          sd[a + "value.bias"]])
    return out


def to_timm(obj: Any, label: str = "method.encoder_init") -> tuple[dict[str, torch.Tensor], str]:
    """``(timm ViT state dict, layout)`` of a loaded checkpoint in one of :data:`LAYOUTS` (module docstring)."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{label}: expected a state dict or a checkpoint dict, got {type(obj).__name__}")
    if obj.get("format") == ENCODER_FORMAT and isinstance(obj.get("state_dict"), Mapping):
        return _tensors(obj["state_dict"]), "timm"
    if isinstance(obj.get("teacher"), Mapping):  # DINO / iBOT training checkpoint: the teacher
        sd = _backbone(_tensors(obj["teacher"]))
        return _drop_ibot(sd), "ibot" if "masked_embed" in sd else "dino"
    if isinstance(obj.get("model"), Mapping):  # MAE
        sd = _strip(_tensors(obj["model"]), "module.")
        return {k: v for k, v in sd.items() if not k.startswith("decoder_") and k != "mask_token"}, "mae"
    inner = obj.get("state_dict") if isinstance(obj.get("state_dict"), Mapping) else obj
    sd = _tensors(inner)
    if any(k.startswith("modality_encoders.") for k in sd):
        raise CheckpointError(f"{label}: a fairseq data2vec 2.0 checkpoint (modality_encoders.*): its blocks are "
                              "post-LayerNorm, not a timm ViT's pre-norm blocks; use the Hugging Face data2vec-vision "
                              "layout (see README)")
    if any(k.startswith(("data2vec_vision.", "embeddings.patch_embeddings")) for k in sd):
        return _hf_data2vec(sd), "data2vec"
    if any(k.startswith(("module.", "backbone.")) for k in sd):
        sd = _backbone(sd)
        return _drop_ibot(sd), "ibot" if "masked_embed" in sd else "dino"
    return _drop_ibot(sd), "ibot" if "masked_embed" in sd else "timm"


def _drop_ibot(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in sd.items() if k != "masked_embed"}


# ---- fitting a state dict to an encoder -------------------------------------------------------------------
def _prefix_tokens(length: int) -> int:
    """Prefix (class / register) tokens of a position table of ``length`` rows: the rest is a square grid."""
    for prefix in (0, 1, 2, 4, 5, 8, 9):
        side = math.isqrt(max(length - prefix, 0))
        if length - prefix > 0 and side * side == length - prefix:
            return prefix
    raise CheckpointError(f"method.encoder_init: pos_embed of {length} rows is no square patch grid (+ prefix tokens)")


def resample_pos_embed(pos: torch.Tensor, target_shape: tuple[int, ...]) -> torch.Tensor:
    """``pos`` ``[1, P + N, D]`` -> ``target_shape`` ``[1, P' + N', D]``: the patch grid bicubically resampled (timm's
    ``resample_abs_pos_embed``); prefix rows kept (zeros where the checkpoint has none, e.g. MAE-style tables)."""
    from timm.layers import resample_abs_pos_embed

    if tuple(pos.shape) == tuple(target_shape) or pos.ndim != 3 or pos.shape[-1] != target_shape[-1]:
        return pos
    src_prefix, dst_prefix = _prefix_tokens(pos.shape[1]), _prefix_tokens(target_shape[1])
    side = math.isqrt(target_shape[1] - dst_prefix)
    grid = resample_abs_pos_embed(pos[:, src_prefix:].float(), [side, side], num_prefix_tokens=0).to(pos.dtype)
    prefix = pos[:, :src_prefix][:, :dst_prefix]
    pad = pos.new_zeros(1, dst_prefix - prefix.shape[1], pos.shape[-1])
    return torch.cat([pad, prefix, grid], dim=1)


def fit_state_dict(sd: Mapping[str, torch.Tensor], own: Mapping[str, Any], label: str) -> dict[str, torch.Tensor]:
    """``sd`` made to fit an encoder whose state dict (or shapes) is ``own``: a classifier ``head.*`` the encoder does
    not have is dropped, ``pos_embed`` resampled to the encoder's grid; then every key and shape is checked
    (:class:`methods.checkpoint_io.CheckpointMismatchError` listing missing / unexpected keys and shapes)."""
    out = {k: v for k, v in sd.items() if not (k.startswith("head.") and k not in own)}
    if "pos_embed" in out and "pos_embed" in own:
        out["pos_embed"] = resample_pos_embed(out["pos_embed"], tuple(own["pos_embed"].shape))
    check_state_dict(own, out, label)
    return out


def encoder_init_targets(method: nn.Module) -> list[nn.Module]:
    """The encoders ``method.encoder_init`` starts: the exported encoder, and for an EMA teacher-student method
    (DINO, iBOT, data2vec) its counterpart too (teacher and student start equal)."""
    encoder = method.export_encoder()
    if not hasattr(encoder, "patch_embed") or not hasattr(encoder, "blocks"):
        raise CheckpointError(f"method.encoder_init: {type(method).__name__}'s encoder is a "
                              f"{type(encoder).__name__}, not a timm ViT: released ViT weights do not apply")
    if not isinstance(method, EMATeacherMethod):
        return [encoder]
    name = next(n for n, m in method.named_modules() if m is encoder)
    swap = {"teacher": "student", "student": "teacher"}
    other = ".".join(swap.get(part, part) for part in name.split("."))
    return [encoder, method.get_submodule(other)]


def load_encoder_init(method: nn.Module, path: str | os.PathLike, label: str | None = None) -> str:
    """Start ``method``'s encoder(s) (:func:`encoder_init_targets`) from the checkpoint file ``path``; returns the
    layout found. Raises :class:`methods.checkpoint_io.CheckpointError` with the keys that do not fit."""
    label = label or f"method.encoder_init {str(path)!r}"
    sd, layout = to_timm(read_checkpoint(path), label)
    for target in encoder_init_targets(method):
        fitted = fit_state_dict(sd, target.state_dict(), f"{label} ({layout} layout)")
        with torch.no_grad():
            target.load_state_dict(fitted, strict=True)
    return layout
