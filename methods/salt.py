"""SALT stage 2: Static-teacher Asymmetric Latent Training (Li et al., Apple, arXiv 2509.24317).

Stage 1 ("V-Pixel") is pixel reconstruction with multi-block masks: :class:`methods.mae.MAE` with
``mask_type="multiblock"``. Stage 2 (this module) trains a NEW student against the FROZEN stage-1 encoder:

* teacher ``f_T`` (frozen, eval mode, never updated, no EMA) encodes the full image; its targets are the
  final-LayerNorm patch tokens ``LN(f_T(x))[:, P:]`` (``[B, N, D]``, P prefix tokens dropped), re-normalised over
  channels without affine parameters, ``z = layer_norm(LN(f_T(x)))`` (``target_layer_norm=True``, default), as
  I-JEPA (``src/train.py``) and V-JEPA (``app/vjepa/train.py``), on whose code SALT is built, do with
  ``F.layer_norm(h, (h.size(-1),))``; stable-pretraining's SALT uses the final-norm tokens as they are
  (``target_layer_norm=False``). For
  ``global_pool='avg'`` timm applies that LayerNorm (``fc_norm``) only after pooling, so it is applied per
  token here (:func:`methods.vit.per_token_norm`), for the targets and for the student's context tokens that
  enter the predictor;
* I-JEPA multi-block masks (Assran et al., CVPR 2023): one context set ``C`` and ``T`` target blocks
  ``B_1..B_T`` disjoint from it (:mod:`methods.masks`); ``mask_style="vjepa"``: V-JEPA's two mask sets per batch
  (8 blocks at scale 0.15, 2 at 0.7, each context the complement of its blocks' union), the loss averaged over them
  (``loss /= len(masks_pred)``);
* student ``f_S`` (a freshly initialised ViT of the same architecture, not a copy of the teacher) encodes only
  the context patches ``x_C``;
* predictor ``g`` (narrow timm transformer of width ``predictor_embed_dim``) runs the sequence
  ``[W f_S(x_C) + pos(C); m + pos(U)]`` (prefix tokens projected without a position, ``m`` a learned mask
  token, ``pos`` fixed 2-D sin-cos) through its blocks and projects the outputs at the mask tokens back to
  ``D``; its blocks' output projections (``attn.proj``, ``mlp.fc2``) start divided by ``sqrt(2 l)`` for block ``l = 1..depth``
  (I-JEPA's ``fix_init_weight``). ``target_layout="union"`` (default) is SALT's layout: SALT is built on V-JEPA, whose multi-block
  collator merges a sample's target blocks into one mask and whose predictor runs ONE sequence per sample
  holding the context and that union ``U = B_1 u ... u B_T`` (a patch covered by several blocks is predicted
  once). Union sizes differ between samples: the query tokens are padded to the batch maximum and the padding
  is masked out of every attention (as keys) and of the loss, so each sample's prediction is exactly that of its
  own unpadded sequence (V-JEPA instead truncates every union to the batch minimum). The padding costs no per-token
  work: norms, qkv, projections and MLPs run on the real rows only, the padded layout exists only inside the
  attention (:func:`methods.vit.packed_block`; ~13% of the predictor's rows at the seed defaults). ``target_layout="blocks"``
  is I-JEPA's layout: one sequence ``[context; B_t]`` per target block (the context repeated ``T`` times, a
  patch in two blocks predicted twice): ~2x the predictor tokens of the union at the seed defaults;
* loss: L1 at target positions only, averaged over the predicted tokens and channels. Union:
  ``L = 1 / sum_b |U_b| * sum_b sum_{i in U_b} mean_d |g(.)_{b,i,d} - z_{b,i,d}|``; blocks:
  ``L = 1 / (B T |B_t|) * sum_b sum_t sum_{i in B_t} mean_d |g(.)_{b,t,i,d} - z_{b,i,d}|``.

Evaluation: the student encodes the full image; the embedding is timm's pooled output (CLS token, or mean
of patches for ``global_pool='avg'``), with zero loss. The exported encoder is the student.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn

from methods import constraints as C
from methods import vit as V
from methods.base import MethodOutput, SSLMethod
from methods.checkpoint_io import check_encoder_config, load_encoder_file, load_state_dict_strict
from methods.health import HealthInputs
from methods.masks import MASK_STYLES, MultiBlockMaskGenerator, MultiBlockMasks

TARGET_LAYOUTS = ("union", "blocks")
# V-JEPA's mask sets (jepa configs/pretrain/vitl16.yaml, spatial part): 8 blocks at scale 0.15, 2 blocks at scale 0.7
VJEPA_MASK_SETS = ({"num_targets": 8, "target_scale": (0.15, 0.15)}, {"num_targets": 2, "target_scale": (0.7, 0.7)})


@dataclass
class SALTOutput(MethodOutput):
    """``loss``; ``embedding`` ``[B, D]``; in training also ``context_idx`` ``[B, Kc]``, ``target_mask`` ``[B, N]``
    (True = in a target block) and, for ``target_layout="union"``, ``predictions`` and ``target`` ``[B, U, D]``,
    ``target_idx`` ``[B, U]`` and ``target_valid`` ``[B, U]`` (False on the padding of a smaller union); for
    ``"blocks"``, ``predictions`` and ``target`` ``[B, T, Kt, D]``, ``target_idx`` ``[B, T, Kt]``."""

    predictions: torch.Tensor | None = None
    target: torch.Tensor | None = None
    context_idx: torch.Tensor | None = None
    target_idx: torch.Tensor | None = None
    target_mask: torch.Tensor | None = None
    target_valid: torch.Tensor | None = None


class SALTPredictor(nn.Module):
    """I-JEPA-style predictor: context tokens + mask tokens at a target block, fixed 2-D sin-cos positions."""

    def __init__(self, embed_dim: int, predictor_embed_dim: int, depth: int, num_heads: int, out_dim: int, fix_init: bool = True):
        super().__init__()
        V.head_dim_ok(predictor_embed_dim, num_heads, "SALT predictor")
        self.predictor_embed_dim = predictor_embed_dim
        self.embed = nn.Linear(embed_dim, predictor_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, predictor_embed_dim))
        self.blocks = nn.ModuleList(
            Block(predictor_embed_dim, num_heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(predictor_embed_dim)
        self.proj = nn.Linear(predictor_embed_dim, out_dim)
        self.apply(V.trunc_normal_init)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        if fix_init:
            self.fix_init_weight()

    @torch.no_grad()
    def fix_init_weight(self) -> None:
        """I-JEPA's ``VisionTransformerPredictor.fix_init_weight``: block ``l`` (1-based) has its ``attn.proj`` and
        ``mlp.fc2`` weights divided by ``sqrt(2 l)``."""
        for layer_id, block in enumerate(self.blocks, start=1):
            block.attn.proj.weight.div_(math.sqrt(2.0 * layer_id))
            block.mlp.fc2.weight.div_(math.sqrt(2.0 * layer_id))

    def forward(
        self,
        context_tokens: torch.Tensor,
        context_idx: torch.Tensor,
        target_idx: torch.Tensor,
        grid: tuple[int, int],
        n_prefix: int,
        target_valid: torch.Tensor | None = None,
        n_valid: int | None = None,
    ) -> torch.Tensor:
        """``context_tokens`` ``[B, P + Kc, D]``, ``context_idx`` ``[B, Kc]``, ``target_idx`` ``[B, T, Kt]`` (one
        sequence ``[context; queries at target_idx[:, t]]`` per ``t``) -> predictions ``[B, T, Kt, out_dim]``.

        ``target_valid`` ``[B, T, Kt]`` (optional, False = padding; ``n_valid`` its count of True if known): padded
        queries are hidden from every token as attention keys, so the other outputs equal those of the unpadded
        sequence; they are not computed at all (:meth:`_packed`) and their predictions are zero."""
        b, t, kt = target_idx.shape
        x = self.embed(context_tokens)
        pos = V.sincos_pos_embed_2d(self.predictor_embed_dim, grid, device=x.device).to(x.dtype)  # [N, Dp]
        prefix, ctx = x[:, :n_prefix], x[:, n_prefix:] + pos[context_idx]
        queries = self.mask_token.to(x.dtype) + pos[target_idx]  # [B, T, Kt, Dp]
        if t > 1:
            prefix, ctx = prefix.repeat_interleave(t, dim=0), ctx.repeat_interleave(t, dim=0)
        seq = torch.cat([prefix, ctx, queries.reshape(b * t, kt, -1)], dim=1)
        if target_valid is None:
            for block in self.blocks:
                seq = block(seq)
            return self.proj(self.norm(seq[:, -kt:])).reshape(b, t, kt, -1)
        # [B*T, L] True = a real token (context or a valid query)
        keys = torch.cat([target_valid.new_ones(b * t, seq.shape[1] - kt), target_valid.reshape(b * t, kt)], dim=1)
        if all(V.split_block_supported(block) for block in self.blocks):
            n_valid = int(target_valid.sum()) if n_valid is None else int(n_valid)
            return self._packed(seq, keys, n_valid, kt).reshape(b, t, kt, -1)
        for block in self.blocks:
            seq = block(seq, attn_mask=keys[:, None, None, :])
        return self.proj(self.norm(seq[:, -kt:])).reshape(b, t, kt, -1)

    def _packed(self, seq: torch.Tensor, keys: torch.Tensor, n_valid: int, kt: int) -> torch.Tensor:
        """The padded batch ``seq`` ``[S, L, Dp]`` (``keys`` ``[S, L]``, True = real; the last ``kt`` tokens are
        queries, ``n_valid`` of them real) with every per-token computation on its real rows only
        (:func:`methods.vit.packed_block`), the final norm and projection on the real queries only -> ``[S, kt, out]``,
        zero at the padding. ``M = S (L - kt) + n_valid`` rows instead of ``S L``; same outputs (tested)."""
        s, length, _ = seq.shape
        n_rows = s * (length - kt) + n_valid
        flat = keys.reshape(-1)
        ar = torch.arange(flat.numel(), device=flat.device)
        rows = torch.where(flat, ar, ar + flat.numel()).argsort()[:n_rows]  # real rows, ascending (no host sync)
        x = seq.reshape(s * length, -1).index_select(0, rows)
        mask = keys[:, None, None, :]
        for block in self.blocks:
            x = V.packed_block(block, x, rows, (s, length), mask)
        col = rows % length
        is_query = col >= length - kt
        order = torch.arange(n_rows, device=x.device)
        at = torch.where(is_query, order, order + n_rows).argsort()[:n_valid]  # packed positions of real queries
        dest = (rows[at] // length) * kt + col[at] - (length - kt)  # their flat index into [S * kt]
        out = self.proj(self.norm(x.index_select(0, at)))
        return out.new_zeros(s * kt, out.shape[-1]).index_copy(0, dest, out).reshape(s, kt, -1)


class SALT(SSLMethod):
    """SALT stage 2 with a frozen teacher and a fresh student (timm ViTs of the same architecture).

    :param encoder_name: timm ViT name of teacher and student (default ``"vit_tiny_patch16_224"``).
    :param predictor_embed_dim: predictor width (default 384).
    :param predictor_depth: predictor blocks (default 12).
    :param predictor_num_heads: predictor attention heads (default 16).
    :param num_targets: target blocks per image (default 4).
    :param context_scale: (min, max) grid fraction of the context block.
    :param target_scale: (min, max) grid fraction of each target block.
    :param context_aspect_ratio: (min, max) height / width of the context block.
    :param target_aspect_ratio: (min, max) height / width of the target blocks.
    :param teacher_state_dict: state dict loaded (strictly) into the teacher.
    :param pretrained: load pretrained timm weights into the TEACHER (the student always starts at random).
    :param encoder_kwargs: extension: kwargs for ``timm.create_model`` (``img_size``, ``patch_size``, ...).
        ``None`` with ``teacher`` set means "as in the checkpoint".
    :param teacher: extension: path of a stage-1 checkpoint (directory or ``encoder.pt``, see
        :mod:`methods.checkpoint_io`) loaded into the teacher, as :meth:`from_checkpoint` does.
    :param target_layout: extension: ``"union"`` (default; SALT / V-JEPA: one predictor sequence per sample with
        the context and the union of its target blocks) or ``"blocks"`` (I-JEPA: one sequence per target block,
        kept to reproduce runs made with it and to compare the two); see the module docstring.
    :param target_layer_norm: extension: True (default; I-JEPA / V-JEPA) re-normalises the teacher's final-norm tokens
        with a non-affine layer norm; False uses them as they are (stable-pretraining's SALT).
    :param mask_style: extension: ``"ijepa"`` (default: the seed's context block minus 4 targets) or ``"vjepa"`` (V-JEPA's
        two mask sets, :data:`VJEPA_MASK_SETS`, aspect ``target_aspect_ratio``; ``num_targets``, ``target_scale`` and the
        context settings are then unused).
    :param min_keep: extension: a context keeps more than this many patches (I-JEPA's configs: 10).
    :param predictor_fix_init: extension: I-JEPA's ``fix_init_weight`` of the predictor (default True).
    """

    method_name = "salt"

    # masked prediction: the scale of its regression targets and predictions (methods/health.py)
    health_metrics = ("rank_fraction", "normalized_std", "target_scale", "prediction_scale")
    constraints = (
        C.positive_int("predictor_embed_dim"),
        C.positive_int("predictor_depth"),
        C.positive_int("predictor_num_heads"),
        C.positive_int("num_targets"),
        C.RangePair("context_scale", 0.0, 1.0),
        C.RangePair("target_scale", 0.0, 1.0),
        C.RangePair("context_aspect_ratio", 0.01, 100.0),
        C.RangePair("target_aspect_ratio", 0.01, 100.0),
        C.OneOf("mask_style", MASK_STYLES),
        C.InRange("min_keep", 0, integer=True),
        # a training run needs a trained teacher: against a random one the student learns nothing useful
        # (the constructor still accepts none, for tests of the mechanics)
        C.RequiresAny(("teacher", "teacher_state_dict", "pretrained"),
                      "a stage-1 checkpoint (local path or s3:// URI) for method salt "
                      "(or {prefix}teacher_state_dict / {prefix}pretrained=true)"),
    )
    checkpoint_params = ("teacher",)

    def __init__(
        self,
        encoder_name: str = "vit_tiny_patch16_224",
        predictor_embed_dim: int = 384,
        predictor_depth: int = 12,
        predictor_num_heads: int = 16,
        num_targets: int = 4,
        context_scale: tuple[float, float] = (0.85, 1.0),
        target_scale: tuple[float, float] = (0.15, 0.2),
        context_aspect_ratio: tuple[float, float] = (1.0, 1.0),
        target_aspect_ratio: tuple[float, float] = (0.75, 1.5),
        teacher_state_dict: dict | None = None,
        pretrained: bool = False,
        encoder_kwargs: dict[str, Any] | None = None,
        teacher: str | os.PathLike | None = None,
        target_layout: str = "union",
        target_layer_norm: bool = True,
        mask_style: str = "ijepa",
        min_keep: int = 10,
        predictor_fix_init: bool = True,
    ):
        super().__init__()
        if mask_style not in MASK_STYLES:
            raise ValueError(f"SALT: mask_style must be one of {MASK_STYLES}, got {mask_style!r}")
        if target_layout not in TARGET_LAYOUTS:
            raise ValueError(f"SALT: target_layout must be one of {TARGET_LAYOUTS}, got {target_layout!r}")
        self.target_layout = target_layout
        encoder_kwargs, teacher_state_dict = self._teacher_weights(teacher, teacher_state_dict, encoder_name, encoder_kwargs, pretrained)
        self.encoder_name = encoder_name
        self.encoder_kwargs = dict(encoder_kwargs or {})
        self.mask_config = {
            "num_targets": num_targets,
            "context_scale": tuple(context_scale),
            "target_scale": tuple(target_scale),
            "context_aspect_ratio": tuple(context_aspect_ratio),
            "target_aspect_ratio": tuple(target_aspect_ratio),
            "min_keep": int(min_keep),
        }
        self.mask_style = mask_style
        self.target_layer_norm = bool(target_layer_norm)
        self.mask_step: int | None = None  # the training step (seeds the block sizes, as I-JEPA's collator)

        self.teacher = V.create_vit(encoder_name, self.encoder_kwargs, pretrained)
        if teacher_state_dict is not None:
            load_state_dict_strict(self.teacher, teacher_state_dict, f"SALT teacher ({encoder_name})")
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        self.student = V.create_vit(encoder_name, self.encoder_kwargs, pretrained=False)

        dim = self.student.embed_dim
        self.predictor = SALTPredictor(
            dim, predictor_embed_dim, predictor_depth, predictor_num_heads, self.teacher.embed_dim, predictor_fix_init
        )
        self._mask_generators: list[MultiBlockMaskGenerator] = []

    def _teacher_weights(self, teacher, teacher_state_dict, encoder_name, encoder_kwargs, pretrained):
        """``(encoder_kwargs, teacher_state_dict)`` from a stage-1 checkpoint path ``teacher`` (checked against the
        architecture), or as given; sets ``teacher_source``."""
        if teacher is not None and teacher_state_dict is not None:
            raise ValueError("SALT: give either teacher (a checkpoint path) or teacher_state_dict, not both")
        if teacher is None:
            self.teacher_source = "state_dict" if teacher_state_dict is not None else ("pretrained" if pretrained else "random")
            return encoder_kwargs, teacher_state_dict
        payload = load_encoder_file(teacher)
        check_encoder_config(payload, encoder_name, encoder_kwargs, f"SALT teacher checkpoint {str(teacher)!r}")
        self.teacher_source = str(teacher)
        return (payload["encoder_kwargs"] if encoder_kwargs is None else encoder_kwargs), payload["state_dict"]

    @classmethod
    def from_checkpoint(cls, ckpt_path: str | os.PathLike, encoder_name: str = "vit_tiny_patch16_224", **kwargs) -> SALT:
        """SALT stage 2 whose frozen teacher is the encoder of a stage-1 (MAE / V-Pixel) checkpoint.

        ``ckpt_path`` is a checkpoint directory (with ``manifest.json``) or its ``encoder.pt``. The checkpoint's
        ``encoder_name`` must equal ``encoder_name`` and, if given in ``kwargs``, its ``encoder_kwargs`` too;
        otherwise a :class:`methods.checkpoint_io.CheckpointMismatchError` names the difference.
        """
        if "teacher" in kwargs or "teacher_state_dict" in kwargs:
            raise ValueError("SALT.from_checkpoint: the teacher comes from ckpt_path; do not pass teacher/teacher_state_dict")
        return cls(encoder_name=encoder_name, teacher=ckpt_path, **kwargs)

    @classmethod
    def check_checkpoint(cls, param: str, path: str, kwargs: Mapping[str, Any], label: str) -> None:
        """The teacher checkpoint holds an encoder of the architecture ``encoder_name`` / ``encoder_kwargs`` ask for."""
        full = {**cls.constructor_defaults(), **kwargs}
        check_encoder_config(load_encoder_file(path), full["encoder_name"], full["encoder_kwargs"], label)

    def train(self, mode: bool = True) -> SALT:
        """Switch student and predictor; the teacher always stays in eval mode."""
        super().train(mode)
        self.teacher.eval()
        return self

    # ---- masking / teacher ----------------------------------------------------------------------------
    def mask_generators(self, grid: tuple[int, int]) -> list[MultiBlockMaskGenerator]:
        """One generator (``ijepa``) or V-JEPA's two (``vjepa``) for the patch grid."""
        if not self._mask_generators or self._mask_generators[0].grid != tuple(grid):
            if self.mask_style == "vjepa":
                keep = {k: v for k, v in self.mask_config.items() if k not in ("num_targets", "target_scale")}
                self._mask_generators = [MultiBlockMaskGenerator(grid, **keep, **m, style="vjepa") for m in VJEPA_MASK_SETS]
            else:
                self._mask_generators = [MultiBlockMaskGenerator(grid, **self.mask_config)]
        return self._mask_generators

    def mask_generator(self, grid: tuple[int, int]) -> MultiBlockMaskGenerator:
        """The (first) mask generator for the patch grid."""
        return self.mask_generators(grid)[0]

    def on_train_step(self, step: int, total_steps: int, epoch: float) -> None:
        self.mask_step = int(step)

    @torch.no_grad()
    def teacher_latents(self, images: torch.Tensor) -> torch.Tensor:
        """The frozen teacher's final-norm patch tokens of the full image, re-normalised (non-affine layer norm over
        channels) with ``target_layer_norm``: ``[B, N, D]``."""
        tokens = V.per_token_norm(self.teacher, V.encode_full(self.teacher, images))
        tokens = tokens[:, V.num_prefix_tokens(self.teacher) :]
        if self.target_layer_norm:
            tokens = F.layer_norm(tokens.float(), (tokens.shape[-1],)).to(tokens.dtype)
        return tokens.detach()

    # ---- forward --------------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, masks: MultiBlockMasks | list[MultiBlockMasks] | None = None) -> SALTOutput:
        """Training: L1 between predicted and teacher latents at target blocks. Eval: student embedding.

        ``masks`` (optional) fixes the context/target masks (one set, or one per mask set of ``mask_style="vjepa"``);
        by default they are drawn per batch. With several sets the loss is their mean and the other outputs are those
        of the first set.
        """
        if not self.training:
            with torch.no_grad():
                tokens = V.encode_full(self.student, images)
                emb = V.pooled_embedding(self.student, tokens)
            return SALTOutput(loss=torch.zeros((), device=images.device), embedding=emb)

        grid = V.grid_shape(self.student, images)
        if masks is None:
            masks = [gen(images.shape[0], device=images.device, step=self.mask_step) for gen in self.mask_generators(grid)]
        mask_sets = [masks] if isinstance(masks, MultiBlockMasks) else list(masks)
        z = self.teacher_latents(images)  # [B, N, D]
        outputs = [self._masked_prediction(images, m, z, grid) for m in mask_sets]
        out = outputs[0]
        out.loss = torch.stack([o.loss for o in outputs]).mean()  # V-JEPA: loss /= len(masks_pred)
        return out

    def _masked_prediction(self, images: torch.Tensor, masks: MultiBlockMasks, z: torch.Tensor, grid: tuple[int, int]) -> SALTOutput:
        """Student on the context, predictor at the targets, L1 against the teacher latents ``z`` of one mask set."""
        n_valid = None
        if self.target_layout == "union":
            target_idx, valid = masks.union_target_idx()  # [B, U] each
            query_idx, query_valid = target_idx[:, None], valid[:, None]
            n_valid = int(valid.sum())  # a host sync next to union_target_idx's own
        else:
            target_idx, valid = masks.target_idx, None  # [B, T, Kt]
            query_idx, query_valid = target_idx, None
        # context and target sizes change every step: keep cuDNN attention from planning each new length
        with V.variable_length_attention():
            latent = V.encode_visible(self.student, images, masks.context_idx)  # [B, P + Kc, D]
            pred = self.predictor(
                V.per_token_norm(self.student, latent), masks.context_idx, query_idx, grid,
                V.num_prefix_tokens(self.student), query_valid, n_valid,
            )  # fmt: skip
        pred = pred.reshape(*target_idx.shape, -1)
        b = z.shape[0]
        target = torch.gather(z, 1, target_idx.reshape(b, -1, 1).expand(-1, -1, z.shape[-1])).reshape(pred.shape)
        err = (pred.float() - target.float()).abs()
        if valid is None:
            loss = err.mean()
        else:  # mean over the valid (sample, patch) pairs and channels
            loss = (err.mean(dim=-1) * valid).sum() / valid.sum()
        emb = V.pooled_embedding(self.student, latent).detach()
        return SALTOutput(
            loss=loss,
            embedding=emb,
            health=HealthInputs(targets=target.detach(), predictions=pred.detach(), token_mask=valid),
            predictions=pred,
            target=target,
            context_idx=masks.context_idx,
            target_idx=target_idx,
            target_mask=masks.target_mask,
            target_valid=valid,
        )

    # ---- export ---------------------------------------------------------------------------------------
    def export_encoder(self) -> nn.Module:
        return self.student

    def encoder_config(self) -> dict[str, Any]:
        return {"encoder_name": self.encoder_name, "encoder_kwargs": dict(self.encoder_kwargs)}
