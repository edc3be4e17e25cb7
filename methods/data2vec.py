"""data2vec for images (Baevski et al., "data2vec: A General Framework for Self-supervised Learning in Speech,
Vision and Language", ICML 2022, arXiv 2202.03555).

A student ViT sees the image with a fraction ``mask_ratio`` of its patch embeddings replaced by a learned
mask token (before positions are added); an EMA teacher (the same ViT, weights ``theta_T <- m theta_T +
(1 - m) theta_S`` after every optimizer step) sees the unmasked image. With ``a_l`` the teacher's output of
block ``l`` at the patch tokens (prefix tokens dropped) and ``L`` blocks, the regression target is

    y = LayerNorm_no_affine( (1 / K) * sum_{l = L - K + 1}^{L} a_l ),     K = top_k_blocks

and the student's final tokens go through a linear head ``r``; the loss is smooth-L1 (beta 2), SUMMED over channels,
scaled by ``loss_scale`` (default ``1 / sqrt(D)``) and averaged over the masked positions only, as fairseq's
``data2vec_vision.py`` (``loss.sum(dim=-1) * self.loss_scale``, ``loss_scale = 1 / math.sqrt(cfg.embed_dim)`` when unset;
the trainer divides by ``sample_size``, the number of masked tokens):

    loss = s * sum_i m_i * sum_d smoothL1_2(r(h_i)_d - y_{i,d}) / sum_i m_i,     s = loss_scale or 1 / sqrt(D).

(``loss_scale = 1 / D`` is the per-channel mean, ``sqrt(D)`` times smaller: about 28x for ViT-B.)

Only the masked rows enter the loss and only the CLS row the (detached) embedding, so with a CLS-pooled timm ViT and
the same number of masked patches in every sample (the default masking) the student's last block computes queries,
projection and MLP for those rows alone (keys and values of every token), and the final norm, head and loss too
(:func:`methods.vit.block_rows`): the same loss and gradients as the full computation, ``(1 - mask_ratio) * 5/6`` of
one block's FLOPs less.

The encoder is BEiT's as data2vec uses it: LayerScale on both residual branches initialised at ``layer_scale_init``
(default 1e-4; timm's ``init_values``) and, with ``shared_rel_pos_bias=True``, one relative position bias shared by
all blocks and no absolute positions (fairseq ``shared_rel_pos_bias: True``): the encoder is then a timm ``Beit``
(``encoder_name`` ``beit_*``; ``use_shared_rel_pos_bias=True, use_rel_pos_bias=False, use_abs_pos_emb=False``), whose
exported weights load with ``timm.create_model(name, **encoder_kwargs)``.

The momentum follows a cosine from ``ema_decay_start`` to ``ema_decay_end`` over the training steps:
``m(t) = m_end - (m_end - m_start) * (1 + cos(pi t / T)) / 2``. The teacher runs in eval mode. Block outputs
are captured by running the blocks one by one (no hooks), and prefix tokens (CLS and register tokens, or
none) are dropped by count, so ViTs without a CLS token work. Evaluation returns the teacher's pooled
embedding with zero loss; the exported encoder is the teacher.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from methods import constraints as C
from methods import vit as V
from methods.base import MethodOutput
from methods.health import HealthInputs
from methods.teacher_student import EMATeacherMethod, TeacherStudent


@dataclass
class Data2VecOutput(MethodOutput):
    """``loss``; ``embedding`` ``[B, D]``; ``predictions`` / ``target`` ``[B, N, D]``; ``mask`` ``[B, N]`` (1 = masked)."""

    predictions: torch.Tensor | None = None
    target: torch.Tensor | None = None
    mask: torch.Tensor | None = None


@dataclass(frozen=True)
class BeitForSharedBias(C.Constraint):
    """``shared_rel_pos_bias`` is set only with a timm Beit encoder (``encoder_name`` ``beit_*``)."""

    param: str = "shared_rel_pos_bias"

    @property
    def params(self) -> tuple[str, ...]:
        return (self.param, "encoder_name")

    def check(self, kwargs, prefix: str = "") -> None:
        name = kwargs.get("encoder_name")
        if kwargs.get(self.param) and not (isinstance(name, str) and name.startswith("beit")):
            raise C.ConstraintError(prefix + self.param, f"false unless {prefix}encoder_name is a timm Beit (beit_*)", True)


class Data2Vec(EMATeacherMethod):
    """data2vec: predict the EMA teacher's top-K block average at masked patches.

    :param encoder_name: timm ViT name (default ``"vit_small_patch16_224"``).
    :param top_k_blocks: teacher blocks averaged into the target (default 6; at most the encoder depth).
    :param mask_ratio: fraction of patch tokens replaced by the mask token (default 0.6).
    :param ema_decay_start: teacher momentum at step 0 (default 0.999).
    :param ema_decay_end: teacher momentum at the last step (default 0.9999).
    :param image_size: input size, passed as timm's ``img_size`` unless ``encoder_kwargs`` sets it.
    :param pretrained: load pretrained timm weights.
    :param encoder_kwargs: extension: kwargs for ``timm.create_model`` (``patch_size``, ``class_token``, ...).
    :param loss_scale: extension: factor on the channel-summed loss; None (default) is fairseq's ``1 / sqrt(D)``.
    :param layer_scale_init: extension: BEiT LayerScale init (fairseq ``layer_scale_init_value``, default 1e-4), passed
        as timm's ``init_values`` unless ``encoder_kwargs`` sets it; 0 disables it.
    :param shared_rel_pos_bias: extension: BEiT's shared relative position bias instead of absolute positions (needs a
        timm ``beit_*`` encoder; default False, as the seed's default encoder is a plain ViT; the ImageNet recipe sets it).
    """

    method_name = "data2vec"

    # fairseq examples/data2vec/data/mae_image_dataset.py: RandomResizedCrop(input_size, interpolation=3), bicubic
    view_interpolation = "bicubic"
    # masked prediction: the scale of its regression targets and predictions (methods/health.py)
    health_metrics = ("rank_fraction", "normalized_std", "target_scale", "prediction_scale")
    constraints = (
        C.open_unit_interval("mask_ratio"),
        C.positive_int("top_k_blocks"),
        C.InRange("loss_scale", 0.0, low_open=True, optional=True, note="or unset: 1 / sqrt(embed dim)"),
        C.InRange("layer_scale_init", 0.0, note="0 disables LayerScale"),
        BeitForSharedBias(),
    )  # + EMA decays (base)

    def __init__(
        self,
        encoder_name: str = "vit_small_patch16_224",
        top_k_blocks: int = 6,
        mask_ratio: float = 0.6,
        ema_decay_start: float = 0.999,
        ema_decay_end: float = 0.9999,
        image_size: int = 224,
        pretrained: bool = False,
        encoder_kwargs: dict[str, Any] | None = None,
        loss_scale: float | None = None,
        layer_scale_init: float = 1e-4,
        shared_rel_pos_bias: bool = False,
    ):
        super().__init__()
        self.check_kwargs({"mask_ratio": mask_ratio, "top_k_blocks": top_k_blocks, "loss_scale": loss_scale,
                           "layer_scale_init": layer_scale_init, "shared_rel_pos_bias": shared_rel_pos_bias,
                           "encoder_name": encoder_name,
                           "ema_decay_start": ema_decay_start, "ema_decay_end": ema_decay_end})
        self.encoder_name = encoder_name
        self.encoder_kwargs = dict(encoder_kwargs or {})
        self.encoder_kwargs.setdefault("img_size", image_size)
        if layer_scale_init > 0:
            self.encoder_kwargs.setdefault("init_values", float(layer_scale_init))
        if shared_rel_pos_bias:
            self.encoder_kwargs.update(use_shared_rel_pos_bias=True, use_rel_pos_bias=False, use_abs_pos_emb=False)
        self.image_size = int(self.encoder_kwargs["img_size"])
        self.mask_ratio = mask_ratio
        self.ema_decay_start = ema_decay_start
        self.ema_decay_end = ema_decay_end
        self.ema_momentum = float(ema_decay_start)

        student = V.create_vit(encoder_name, self.encoder_kwargs, pretrained)
        depth = len(student.blocks)
        if not 1 <= top_k_blocks <= depth:
            raise ValueError(f"top_k_blocks must be in [1, {depth}] (encoder depth), got {top_k_blocks}")
        self.top_k_blocks = top_k_blocks
        self.ts = TeacherStudent(student, ema_decay_start, ema_decay_end)  # the shared EMA teacher-student
        dim = student.embed_dim
        self.embed_dim = dim
        self.loss_scale = float(loss_scale) if loss_scale is not None else 1.0 / math.sqrt(dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.regressor = nn.Linear(dim, dim)

    # ---- targets ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def teacher_targets(self, images: torch.Tensor) -> torch.Tensor:
        """``LayerNorm(mean of the teacher's last top_k_blocks block outputs)`` at the patch tokens: ``[B, N, D]``."""
        vit = self.teacher
        outputs = V.block_outputs(vit, V.embed_patches(vit, images))  # explicit loop: no hooks that could outlive this call
        n_prefix = V.num_prefix_tokens(vit)
        top = torch.stack([o[:, n_prefix:] for o in outputs[-self.top_k_blocks :]]).mean(dim=0)
        return F.layer_norm(top.float(), top.shape[-1:]).to(top.dtype)

    # ---- forward ------------------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> Data2VecOutput:
        """Training: masked smooth-L1 regression of the teacher targets. Eval: teacher pooled embedding.

        ``mask`` (optional, ``[B, N]``, True = masked) fixes the mask; by default ``mask_ratio`` of the patches
        are drawn uniformly per sample.
        """
        if not self.training:
            with torch.no_grad():
                emb = V.pooled_embedding(self.teacher, V.encode_full(self.teacher, images))
            return Data2VecOutput(loss=torch.zeros((), device=images.device), embedding=emb)

        gh, gw = V.grid_shape(self.student, images)
        n_masked = None  # masked patches per sample, when the same in every sample
        if mask is None:
            keep, mask = V.random_masking(images.shape[0], gh * gw, self.mask_ratio, images.device)
            n_masked = gh * gw - keep.shape[1]
        elif V._cls_row_supported(self.student):
            lo, hi = mask.sum(dim=1).aminmax()
            n_masked = int(lo) if int(lo) == int(hi) else None  # one host sync, for a mask given by the caller
        x = V.embed_patches(self.student, images, mask, self.mask_token)
        if n_masked is not None and V._cls_row_supported(self.student):
            return self._masked_rows_loss(images, x, mask.bool(), n_masked)
        tokens = V.run_blocks(self.student, x)
        predictions = self.regressor(V.per_token_norm(self.student, tokens)[:, V.num_prefix_tokens(self.student) :])
        target = self.teacher_targets(images)
        per_token = F.smooth_l1_loss(predictions.float(), target.float(), beta=2.0, reduction="none").sum(dim=-1)
        m = mask.float()
        loss = self.loss_scale * (per_token * m).sum() / m.sum().clamp(min=1.0)
        emb = V.pooled_embedding(self.student, tokens).detach()
        health = HealthInputs(targets=target.detach(), predictions=predictions.detach(), token_mask=m)
        return Data2VecOutput(loss=loss, embedding=emb, predictions=predictions, target=target, mask=m, health=health)

    def _masked_rows_loss(self, images: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, k: int) -> Data2VecOutput:
        """The loss of :meth:`forward` with the student's last block, final norm, regression head and loss computed
        only at the rows they are read at: the ``k`` masked patches of each sample (in raster order, ``idx``) and the
        CLS token (the pooled embedding), :func:`methods.vit.block_rows`. Same loss, embedding and gradients as the
        full computation (tested); ``predictions`` is zero at the unmasked patches, which the loss does not read."""
        vit, n_prefix = self.student, V.num_prefix_tokens(self.student)
        b, n = mask.shape
        ar = torch.arange(n, device=mask.device)
        idx = torch.where(mask, ar, ar + n).argsort(dim=1)[:, :k]  # [B, k] masked patches, raster order
        x = vit.norm_pre(x)
        for block in vit.blocks[:-1]:
            x = block(x)
        rows = torch.cat([idx.new_zeros(b, 1), idx + n_prefix], dim=1)  # CLS, then the masked patches
        out = vit.norm(V.block_rows(vit.blocks[-1], x, rows))  # [B, 1 + k, D]
        pred = self.regressor(out[:, 1:])
        target = self.teacher_targets(images)
        at = idx[..., None].expand(-1, -1, target.shape[-1])
        per_token = F.smooth_l1_loss(pred.float(), torch.gather(target, 1, at).float(), beta=2.0, reduction="none")
        loss = self.loss_scale * per_token.sum() / max(b * k, 1)
        emb = V.pooled_embedding(vit, out).detach()  # global_pool='token': row 0
        predictions = pred.new_zeros(b, n, pred.shape[-1]).scatter(1, at, pred)
        m = mask.float()
        health = HealthInputs(targets=target.detach(), predictions=predictions.detach(), token_mask=m)
        return Data2VecOutput(loss=loss, embedding=emb, predictions=predictions, target=target, mask=m, health=health)

    # ---- export -------------------------------------------------------------------------------------------
    def export_encoder(self) -> nn.Module:
        return self.teacher

    def encoder_config(self) -> dict[str, Any]:
        return {"encoder_name": self.encoder_name, "encoder_kwargs": dict(self.encoder_kwargs)}
