"""I-JEPA: Image-based Joint-Embedding Predictive Architecture (Assran et al., "Self-Supervised Learning from Images
with a Joint-Embedding Predictive Architecture", CVPR 2023, arXiv 2301.08243; code: facebookresearch/ijepa).

From one crop ``x`` of an image (no other augmentation), with multi-block masks (:mod:`methods.masks`, shared with
SALT: one context block ``C`` of scale 0.85-1.0 minus ``T = 4`` target blocks ``B_1..B_T`` of scale 0.15-0.2 and
aspect 0.75-1.5, sizes drawn per batch, a context keeping more than ``min_keep`` patches):

* the target encoder ``f_bar`` (an EMA copy of the context encoder, no gradient) encodes the FULL image; its
  final-norm tokens are re-normalised over channels without affine parameters and cut at each target block,
  ``h_t = LN(f_bar(x))[B_t]`` (``src/train.py`` ``forward_target``: ``F.layer_norm(h, (h.size(-1),))``);
* the context encoder ``f`` (the student) encodes only the context patches ``x_C``;
* the predictor ``g`` (a narrow ViT, :class:`methods.salt.SALTPredictor`, I-JEPA's ``VisionTransformerPredictor``,
  shared with SALT) runs, per target block, ``[W f(x_C) + pos(C); m + pos(B_t)]`` (``m`` a learned mask token,
  ``pos`` fixed 2-D sin-cos) and projects the outputs at the mask tokens back to the encoder width:
  ``z_t = g(f(x_C), C, B_t)``;
* loss: smooth L1 (Huber, ``beta = 1``), averaged over blocks, tokens and channels (``src/train.py`` ``loss_fn``:
  ``F.smooth_l1_loss(z, h)``):  ``L = mean_{b,t,i,d} l(z_{b,t,i,d} - h_{b,t,i,d})``,
  ``l(u) = u^2 / 2`` for ``|u| < 1``, ``|u| - 1/2`` otherwise.

The target encoder follows ``f_bar <- m f_bar + (1 - m) f`` after every optimizer step with the momentum LINEAR
in the step (``src/train.py``: ``ema[0] + i * (ema[1] - ema[0]) / (ipe * num_epochs * ipe_scale)`` for update
``i = 0, 1, ...``; the released configs set ``ipe_scale: 1.0``): ``m_i = m_0 + i (m_1 - m_0) / T_total``
(:func:`linear_ema_momentum`), 0.996 -> 1.0. The weight decay's cosine 0.04 -> 0.4 (``src/utils/schedulers.py``
``CosineWDSchedule``; the paper's text says linear) is the platform's ``optim.weight_decay_end`` (biases and 1-D
parameters exempt, as ``src/helper.py`` ``init_opt``).

Encoder as the reference's ``VisionTransformer``: no CLS token, fixed 2-D sin-cos positions (``encoder_pos_embed=
"sincos"``), LayerNorm on every output token; as a timm ViT that is ``class_token=False, global_pool="avg",
fc_norm=False`` (:data:`ENCODER_DEFAULTS`, applied unless ``encoder_kwargs`` sets them), so the exported timm
model's forward is the average of the final-norm tokens, the representation I-JEPA probes (Appendix A.1: "We use the
target-encoder for evaluation and average pool its output"). Evaluation and export use the target encoder.

Initialisation as the reference trains: every Linear truncated-normal (std 0.02, zero bias), LayerNorms (1, 0), the
patch embedding truncated-normal. ``src/helper.py`` ``init_model`` (lines 86-99) re-initialises every Linear after
the constructors' ``fix_init_weight``, which undoes that rescaling, so ``predictor_fix_init`` defaults to False
(True: the rescaling, as stable-pretraining's I-JEPA applies). The predictor's LayerNorms use eps 1e-6
(``vit_predictor``'s ``partial(nn.LayerNorm, eps=1e-6)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from methods import constraints as C
from methods import vit as V
from methods.base import MethodOutput
from methods.health import HealthInputs
from methods.masks import MultiBlockMaskGenerator, MultiBlockMasks
from methods.salt import SALTPredictor
from methods.teacher_student import EMATeacherMethod, TeacherStudent

#: timm settings that make its ViT I-JEPA's encoder: no CLS token, per-token final LayerNorm, average pooling
ENCODER_DEFAULTS: dict[str, Any] = {"class_token": False, "global_pool": "avg", "fc_norm": False}
PREDICTOR_NORM_EPS = 1e-6  # ijepa src/models/vision_transformer.py vit_predictor: partial(nn.LayerNorm, eps=1e-6)


def linear_ema_momentum(step: int, total_steps: int, start: float, end: float) -> float:
    """I-JEPA's momentum for the EMA update after step ``step`` (0-based) of ``total_steps``:
    ``start + step * (end - start) / total_steps`` (``src/train.py`` ``momentum_scheduler``, ``ipe_scale = 1``)."""
    if total_steps <= 0:
        return float(start)
    t = min(max(step, 0), total_steps)
    return float(start + t * (end - start) / total_steps)


@dataclass
class IJEPAOutput(MethodOutput):
    """``loss``; ``embedding`` ``[B, D]`` (target encoder, average-pooled); in training also ``predictions`` and
    ``targets`` ``[B, T, Kt, D]``, ``context_idx`` ``[B, Kc]`` and ``target_idx`` ``[B, T, Kt]``."""

    predictions: torch.Tensor | None = None
    targets: torch.Tensor | None = None
    context_idx: torch.Tensor | None = None
    target_idx: torch.Tensor | None = None


class IJEPA(EMATeacherMethod):
    """I-JEPA with timm ViT context / target encoders and I-JEPA's predictor (see the module docstring).

    :param encoder_name: timm ViT name (default ``"vit_base_patch16_224"``, as stable-pretraining).
    :param predictor_embed_dim: predictor width (default 384).
    :param predictor_depth: predictor blocks (default 6; the paper's ViT-H/14 uses 12).
    :param num_targets: target blocks per image (default 4).
    :param target_scale: (min, max) grid fraction of each target block.
    :param target_aspect_ratio: (min, max) height / width of the target blocks.
    :param context_scale: (min, max) grid fraction of the context block.
    :param ema_decay_start: target-encoder momentum at the first step (default 0.996).
    :param ema_decay_end: momentum the linear schedule reaches at the end (default 1.0).
    :param pretrained: load pretrained timm weights into the context encoder (the target encoder copies it).
    :param encoder_kwargs: extension: kwargs for ``timm.create_model`` over :data:`ENCODER_DEFAULTS`.
    :param predictor_num_heads: extension: predictor heads; ``None`` (default) takes the encoder's, as
        ``src/helper.py`` ``init_model`` (``num_heads=encoder.num_heads``).
    :param context_aspect_ratio: extension: (min, max) height / width of the context block (I-JEPA: 1.0).
    :param min_keep: extension: a context keeps more than this many patches (I-JEPA's configs: 10).
    :param encoder_pos_embed: extension: ``"sincos"`` (default: I-JEPA's fixed 2-D sin-cos positions) or
        ``"learned"`` (timm's trainable positions).
    :param predictor_fix_init: extension: divide the predictor blocks' output projections by ``sqrt(2 l)``
        (default False: the reference's effective initialisation, see the module docstring).
    """

    method_name = "ijepa"

    # masked prediction: the scale of its regression targets and predictions (methods/health.py)
    health_metrics = ("rank_fraction", "normalized_std", "target_scale", "prediction_scale")
    constraints = (
        C.positive_int("predictor_embed_dim"),
        C.positive_int("predictor_depth"),
        C.positive_int("predictor_num_heads", optional=True),
        C.positive_int("num_targets"),
        C.RangePair("context_scale", 0.0, 1.0),
        C.RangePair("target_scale", 0.0, 1.0),
        C.RangePair("context_aspect_ratio", 0.01, 100.0),
        C.RangePair("target_aspect_ratio", 0.01, 100.0),
        C.InRange("min_keep", 0, integer=True),
        C.OneOf("encoder_pos_embed", ("learned", "sincos")),
    )

    def __init__(
        self,
        encoder_name: str = "vit_base_patch16_224",
        predictor_embed_dim: int = 384,
        predictor_depth: int = 6,
        num_targets: int = 4,
        target_scale: tuple[float, float] = (0.15, 0.2),
        target_aspect_ratio: tuple[float, float] = (0.75, 1.5),
        context_scale: tuple[float, float] = (0.85, 1.0),
        ema_decay_start: float = 0.996,
        ema_decay_end: float = 1.0,
        pretrained: bool = False,
        encoder_kwargs: dict[str, Any] | None = None,
        predictor_num_heads: int | None = None,
        context_aspect_ratio: tuple[float, float] = (1.0, 1.0),
        min_keep: int = 10,
        encoder_pos_embed: str = "sincos",
        predictor_fix_init: bool = False,
    ):
        super().__init__()
        self.check_kwargs({k: v for k, v in locals().items() if k not in ("self", "__class__")})
        if pretrained and encoder_pos_embed == "sincos":
            raise ValueError("IJEPA: encoder_pos_embed='sincos' would overwrite the pretrained positions; "
                             "use encoder_pos_embed='learned' with pretrained=True")
        self.encoder_name = encoder_name
        self.encoder_kwargs = {**ENCODER_DEFAULTS, **(encoder_kwargs or {})}
        self.mask_config = {
            "num_targets": int(num_targets),
            "context_scale": tuple(context_scale),
            "target_scale": tuple(target_scale),
            "context_aspect_ratio": tuple(context_aspect_ratio),
            "target_aspect_ratio": tuple(target_aspect_ratio),
            "min_keep": int(min_keep),
        }
        self.mask_step: int | None = None  # the training step (seeds the block sizes, as I-JEPA's collator)
        self._mask_generator: MultiBlockMaskGenerator | None = None
        self.ema_momentum = float(ema_decay_start)

        encoder = self._build_encoder(encoder_name, pretrained, encoder_pos_embed)
        # target_encoder = copy.deepcopy(encoder) (src/train.py), then only EMA updates
        self.ts = TeacherStudent(encoder, ema_decay_start, ema_decay_end)
        heads = predictor_num_heads if predictor_num_heads is not None else int(encoder.blocks[0].attn.num_heads)
        self.predictor = SALTPredictor(encoder.embed_dim, predictor_embed_dim, predictor_depth, heads, encoder.embed_dim,
                                       predictor_fix_init)
        for module in self.predictor.modules():
            if isinstance(module, nn.LayerNorm):
                module.eps = PREDICTOR_NORM_EPS

    def _build_encoder(self, encoder_name: str, pretrained: bool, encoder_pos_embed: str) -> nn.Module:
        """The context encoder: a timm ViT with I-JEPA's positions and, unless pretrained, the reference's init of the
        patch embedding (truncated normal, std 0.02, zero bias; timm leaves PyTorch's default there)."""
        encoder = V.create_vit(encoder_name, self.encoder_kwargs, pretrained)
        if not pretrained:
            nn.init.trunc_normal_(encoder.patch_embed.proj.weight, std=0.02)
            if encoder.patch_embed.proj.bias is not None:
                nn.init.zeros_(encoder.patch_embed.proj.bias)
        if encoder_pos_embed == "sincos":
            V.fix_sincos_pos_embed_(encoder)
        return encoder

    # ---- masks / schedules ------------------------------------------------------------------------------
    def mask_generator(self, grid: tuple[int, int]) -> MultiBlockMaskGenerator:
        """I-JEPA's multi-block mask generator (:mod:`methods.masks`) for the patch grid."""
        if self._mask_generator is None or self._mask_generator.grid != tuple(grid):
            self._mask_generator = MultiBlockMaskGenerator(grid, **self.mask_config)
        return self._mask_generator

    def on_train_step(self, step: int, total_steps: int, epoch: float) -> None:
        """Mask seed and the momentum of the EMA update that follows this step (:func:`linear_ema_momentum`)."""
        self.mask_step = int(step)
        self.ema_momentum = linear_ema_momentum(step, total_steps, self.ts.ema_decay_start, self.ts.ema_decay_end)

    # ---- forward ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def target_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The target encoder on the full image: patch tokens after a non-affine layer norm ``[B, N, D]`` (the
        regression targets) and its average-pooled embedding ``[B, D]``."""
        tokens = V.encode_full(self.teacher, images)
        embedding = V.pooled_embedding(self.teacher, tokens)
        h = V.per_token_norm(self.teacher, tokens)[:, V.num_prefix_tokens(self.teacher):]
        h = F.layer_norm(h.float(), (h.shape[-1],)).to(h.dtype)  # normalize over feature-dim
        return h, embedding

    def forward(self, images: torch.Tensor, masks: MultiBlockMasks | None = None) -> IJEPAOutput:
        """Training: smooth L1 between predicted and target-encoder tokens at the target blocks. Eval: the target
        encoder's average-pooled embedding and a zero loss. ``masks`` fixes the masks (default: drawn per batch)."""
        if not self.training:
            with torch.no_grad():
                emb = V.pooled_embedding(self.teacher, V.encode_full(self.teacher, images))
            return IJEPAOutput(loss=torch.zeros((), device=images.device), embedding=emb)
        grid = V.grid_shape(self.student, images)
        if masks is None:
            masks = self.mask_generator(grid)(images.shape[0], device=images.device, step=self.mask_step)
        h, embedding = self.target_tokens(images)  # [B, N, D], [B, D]
        with V.variable_length_attention():  # context / target sizes change every step
            z = V.encode_visible(self.student, images, masks.context_idx)  # [B, P + Kc, D]
            pred = self.predictor(V.per_token_norm(self.student, z), masks.context_idx, masks.target_idx, grid,
                                  V.num_prefix_tokens(self.student))  # [B, T, Kt, D]
        b, d = h.shape[0], h.shape[-1]
        target = torch.gather(h, 1, masks.target_idx.reshape(b, -1, 1).expand(-1, -1, d)).reshape(pred.shape)
        loss = F.smooth_l1_loss(pred.float(), target.float())
        flat = (b, -1, d)
        return IJEPAOutput(
            loss=loss,
            embedding=embedding,
            health=HealthInputs(targets=target.reshape(flat), predictions=pred.detach().reshape(flat)),
            predictions=pred,
            targets=target,
            context_idx=masks.context_idx,
            target_idx=masks.target_idx,
        )

    # ---- export -------------------------------------------------------------------------------------------
    def export_encoder(self) -> nn.Module:
        """The target encoder (I-JEPA evaluates it)."""
        return self.teacher

    def encoder_config(self) -> dict[str, Any]:
        return {"encoder_name": self.encoder_name, "encoder_kwargs": dict(self.encoder_kwargs)}
