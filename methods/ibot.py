"""iBOT: Image BERT Pre-Training with Online Tokenizer (Zhou et al., ICLR 2022, arXiv 2111.07832).

DINO self-distillation on the CLS token plus masked image modelling with an online tokenizer (the EMA
teacher). For each global view ``v`` the student encodes the view with a random fraction ``mask_ratio`` of
its patch embeddings replaced by a learned mask token; the teacher encodes the unmasked view. With CLS head
outputs ``g^cls`` and patch head outputs ``g^patch`` (each head with its own prototypes and centre):

    L_cls   = 1 / |pairs| * sum_{t != s} H(softmax((g^cls_t - c) / tau_t), softmax(g^cls_s / tau_s))   (DINO, cross-view)
    L_patch = mean_v mean_b [ sum_n m_bn H(softmax((g^patch_t,bn - c') / tau_t), softmax(g^patch_s,bn / tau_s))
                              / sum_n m_bn ]                                                        (same view, masked patches)
    L       = L_cls + patch_loss_weight * L_patch

Teacher = EMA of the student (backbone, mask token and both heads) with the cosine momentum schedule, teacher
temperature warmed up linearly in epochs, heads frozen-prototype during the first epoch, as in DINO. As in the
reference interface (two prototype heads) the CLS and patch heads are separate DINO heads.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from methods import vit as V
from methods.base import MethodOutput
from methods.heads import DINOHead
from methods.losses import DINOLoss, iBOTPatchLoss
from methods.registry import register
from methods.teacher_student import SelfDistillationMethod, TeacherStudent


@dataclass
class iBOTOutput(MethodOutput):
    """``loss``; ``embedding`` ``[B, D]`` (teacher CLS); ``loss_cls``; ``loss_patch``; ``teacher_temperature``;
    ``ema_momentum``; ``masks`` (per global view ``[B, N]``, True = masked)."""

    loss_cls: torch.Tensor | None = None
    loss_patch: torch.Tensor | None = None
    teacher_temperature: torch.Tensor | None = None
    ema_momentum: torch.Tensor | None = None
    masks: list[torch.Tensor] | None = None


class iBOTNet(nn.Module):
    """ViT backbone + learned mask token + CLS head + patch head (the module that is EMA-copied)."""

    def __init__(self, backbone: nn.Module, cls_head: nn.Module, patch_head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.cls_head = cls_head
        self.patch_head = patch_head
        self.mask_token = nn.Parameter(torch.zeros(1, 1, backbone.embed_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def forward(
        self, images: torch.Tensor, mask: torch.Tensor | None = None, patch_rows: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(cls embedding [B, D], cls logits [B, K], patch logits [B, N, K'])``; ``mask`` ``[B, N]`` (1 = masked).

        ``patch_rows`` ``[B, N]`` (bool, optional): the patch head runs only on these tokens and the patch logits
        are ``[M, K']``, the rows in ``patch_rows.nonzero()`` order (the student: only masked patches enter the loss).
        """
        x = V.embed_patches(self.backbone, images, mask, self.mask_token if mask is not None else None)
        tokens = V.run_blocks(self.backbone, x)
        emb = V.pooled_embedding(self.backbone, tokens)
        patches = tokens[:, V.num_prefix_tokens(self.backbone) :]
        if patch_rows is not None:
            patches = patches[patch_rows.bool()]
        return emb, self.cls_head(emb), self.patch_head(patches)


@register("ibot")
class iBOT(SelfDistillationMethod):
    """iBOT with a timm ViT backbone and an EMA teacher (global views only).

    :param encoder_name: timm ViT name (default ``"vit_small_patch16_224"``).
    :param projector_hidden_dim: hidden dim of both heads (default 2048).
    :param projector_bottleneck_dim: bottleneck dim before the prototypes (default 256).
    :param n_cls_prototypes: CLS prototypes (default 65536).
    :param n_patch_prototypes: patch prototypes (default 8192).
    :param mask_ratio: fraction of the student's patches replaced by the mask token (default 0.3).
    :param patch_loss_weight: weight of the patch loss (default 1.0).
    :param temperature_student: student temperature (default 0.1).
    :param temperature_teacher_warmup: teacher temperature at epoch 0 (default 0.04).
    :param temperature_teacher: teacher temperature after the warm-up (default 0.07).
    :param warmup_epochs_temperature_teacher: warm-up length in epochs (default 30).
    :param ema_decay_start: teacher EMA momentum at step 0 (default 0.996).
    :param ema_decay_end: teacher EMA momentum at the last step (default 1.0).
    :param image_size: input size, passed to timm as ``img_size`` (default 224).
    :param pretrained: load pretrained timm weights.
    :param encoder_kwargs: platform extension (not in the reference signature): extra kwargs for
        ``timm.create_model`` (e.g. ``patch_size``, ``embed_dim``, ``depth``); an ``img_size`` here must
        equal ``image_size``.
    :param norm_last_layer: extension (DINO/iBOT's ``--norm_last_layer``): True (default) fixes the prototypes'
        norm; False trains the weight-norm gain (DINO's choice for small ViTs).
    """

    view_kind = "global_views"
    #: EMA momentum of the CLS and patch centres (iBOT: 0.9 for both).
    center_momentum: float = 0.9

    def __init__(
        self,
        encoder_name: str | nn.Module = "vit_small_patch16_224",
        projector_hidden_dim: int = 2048,
        projector_bottleneck_dim: int = 256,
        n_cls_prototypes: int = 65536,
        n_patch_prototypes: int = 8192,
        mask_ratio: float = 0.3,
        patch_loss_weight: float = 1.0,
        temperature_student: float = 0.1,
        temperature_teacher_warmup: float = 0.04,
        temperature_teacher: float = 0.07,
        warmup_epochs_temperature_teacher: int = 30,
        ema_decay_start: float = 0.996,
        ema_decay_end: float = 1.0,
        image_size: int = 224,
        pretrained: bool = False,
        encoder_kwargs: dict | None = None,
        norm_last_layer: bool = True,
        use_bn_in_head: bool = False,
    ):
        super().__init__()
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        if patch_loss_weight < 0:
            raise ValueError(f"patch_loss_weight must be >= 0, got {patch_loss_weight}")
        for name, value in (
            ("temperature_student", temperature_student),
            ("temperature_teacher_warmup", temperature_teacher_warmup),
            ("temperature_teacher", temperature_teacher),
        ):
            if value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        self.encoder_kwargs = dict(encoder_kwargs or {})
        if "img_size" in self.encoder_kwargs and self.encoder_kwargs["img_size"] != image_size:
            raise ValueError(
                f"encoder_kwargs.img_size={self.encoder_kwargs['img_size']!r} differs from image_size={image_size}"
            )
        self.encoder_kwargs["img_size"] = image_size
        if isinstance(encoder_name, nn.Module):
            backbone = encoder_name
            self.encoder_name = type(encoder_name).__name__
            self._rebuildable = False
        else:
            backbone = V.create_vit(encoder_name, self.encoder_kwargs, pretrained)
            self.encoder_name = encoder_name
            self._rebuildable = True
        dim = int(backbone.embed_dim)
        net = iBOTNet(
            backbone,
            DINOHead(dim, n_cls_prototypes, projector_hidden_dim, projector_bottleneck_dim, norm_last_layer=norm_last_layer, use_bn=use_bn_in_head),
            DINOHead(dim, n_patch_prototypes, projector_hidden_dim, projector_bottleneck_dim, norm_last_layer=norm_last_layer, use_bn=use_bn_in_head),
        )
        self.ts = TeacherStudent(net, ema_decay_start, ema_decay_end)
        # The student's patch logits enter the loss only at masked patches: its patch head runs on those rows only
        # (exact: other rows get no gradient). Not with BatchNorm in the head, whose statistics span all patches.
        self.student_head_on_masked_only = not any(isinstance(mod, nn.modules.batchnorm._BatchNorm) for mod in net.patch_head.modules())
        self.cls_loss_fn = DINOLoss(n_cls_prototypes, self.center_momentum)
        self.patch_loss_fn = iBOTPatchLoss(n_patch_prototypes, self.center_momentum)

        self.image_size = image_size
        self.mask_ratio = float(mask_ratio)
        self.patch_loss_weight = float(patch_loss_weight)
        self._init_schedules(
            temperature_student, temperature_teacher_warmup, temperature_teacher,
            warmup_epochs_temperature_teacher, ema_decay_start,
        )

    @property
    def student(self) -> iBOTNet:
        return self.ts.student

    @property
    def teacher(self) -> iBOTNet:
        return self.ts.teacher

    def last_layer_heads(self) -> list[nn.Module]:
        return [self.student.cls_head, self.student.patch_head]

    # ---- masking ----------------------------------------------------------------------------------------
    def sample_masks(self, views: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """One uniform random mask ``[B, N]`` (bool, True = masked) per view, ``round(N * mask_ratio)`` masked."""
        masks = []
        for v in views:
            gh, gw = V.grid_shape(self.student.backbone, v)
            _, mask = V.random_masking(v.shape[0], gh * gw, self.mask_ratio, v.device)
            masks.append(mask)
        return masks

    # ---- forward ----------------------------------------------------------------------------------------
    def forward(
        self,
        global_views: Sequence[torch.Tensor] | None = None,
        images: torch.Tensor | None = None,
        masks: Sequence[torch.Tensor] | None = None,
    ) -> iBOTOutput:
        """Training: ``global_views`` (>= 2 tensors ``[B, C, H, W]``); ``masks`` optional (sampled if None).

        Eval (``images=`` or eval mode): teacher CLS embedding, zero loss.
        """
        if images is not None or not self.training:
            x = images if images is not None else (global_views[0] if global_views else None)
            if x is None:
                raise ValueError("iBOT.forward in eval mode needs images= (or global_views)")
            with torch.no_grad():
                emb = self.teacher.backbone(x)
            return iBOTOutput(loss=torch.zeros((), device=x.device), embedding=emb)

        if not global_views or len(global_views) < 2:
            raise ValueError("iBOT.forward in training mode needs at least 2 global_views")
        views = list(global_views)
        n = len(views)
        masks = list(masks) if masks is not None else self.sample_masks(views)
        if len(masks) != n:
            raise ValueError(f"iBOT.forward: got {len(masks)} masks for {n} global views")

        x = torch.cat(views, dim=0)
        m = torch.cat([mk.reshape(mk.shape[0], -1) for mk in masks], dim=0)
        rows = m if self.student_head_on_masked_only else None
        _, s_cls, s_patch = self.ts.forward_student(x, m, rows)
        t_emb, t_cls, t_patch = self.ts.forward_teacher(x)

        s_cls_v, t_cls_v = list(s_cls.chunk(n)), list(t_cls.chunk(n))
        m_v, t_patch_v = list(m.chunk(n)), list(t_patch.chunk(n))
        # student rows of view v: its masked patches (the rows of m are ordered view by view)
        s_patch_v = list(s_patch.split([int(c) for c in m.reshape(n, -1).sum(dim=1).tolist()])) if rows is not None else list(s_patch.chunk(n))
        temp_s, temp_t = self.temperature_student, self.current_teacher_temperature
        loss_cls = self.cls_loss_fn(s_cls_v, t_cls_v, temp_s, temp_t)
        loss_patch = self.patch_loss_fn(s_patch_v, t_patch_v, m_v, temp_s, temp_t, student_masked_only=rows is not None)
        loss = loss_cls + self.patch_loss_weight * loss_patch
        device = loss.device
        return iBOTOutput(
            loss=loss,
            embedding=t_emb.chunk(n)[0].detach(),
            loss_cls=loss_cls.detach(),
            loss_patch=loss_patch.detach(),
            teacher_temperature=torch.tensor(temp_t, device=device),
            ema_momentum=torch.tensor(self.ema_momentum, device=device),
            masks=[mk.bool() for mk in m.chunk(n)],
        )

    # ---- export -----------------------------------------------------------------------------------------
    def export_encoder(self) -> nn.Module:
        return self.teacher.backbone

    def encoder_config(self) -> dict[str, Any]:
        if not self._rebuildable:
            raise ValueError("iBOT was built from a module instance; its encoder cannot be rebuilt by name")
        return {"encoder_name": self.encoder_name, "encoder_kwargs": copy.deepcopy(self.encoder_kwargs)}
