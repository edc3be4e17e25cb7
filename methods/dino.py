"""DINO: Emerging Properties in Self-Supervised Vision Transformers (Caron et al., ICCV 2021, arXiv 2104.14294).

Self-distillation without labels: a student ViT + head sees every multi-crop view (2 global + N local
crops), an EMA teacher (same architecture) sees only the global crops, and the student is trained to match
the teacher's centred, sharpened distribution over ``n_prototypes``:

    L = 1 / |pairs| * sum_{t in globals} sum_{s in views, s != t} H(softmax((g_t - c) / tau_t), softmax(g_s / tau_s))

with the centre ``c <- m_c c + (1 - m_c) mean(g_t)`` (:class:`methods.losses.DINOLoss`), the teacher
temperature ``tau_t`` read per epoch from DINO's warm-up table (:func:`methods.schedules.teacher_temperature`),
and the teacher weights an EMA of the student with a cosine momentum schedule (:class:`methods.teacher_student.TeacherStudent`). The prototype layer is frozen
during the first epoch. The exported encoder is the teacher backbone (DINO evaluates the teacher).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from methods.base import MethodOutput
from methods.heads import DINOHead
from methods.losses import DINOLoss
from methods.teacher_student import SelfDistillationMethod, TeacherStudent
from methods.views import TrainingViews, multicrop_views
from methods.vit import cls_embedding


@dataclass
class DINOOutput(MethodOutput):
    """``loss``; ``embedding`` ``[B, D]`` (teacher CLS of the first global view, or of ``images`` in eval);
    ``loss_dino`` (same as ``loss``); ``teacher_temperature``; ``ema_momentum``; ``student_views`` (number of
    views the student saw: globals + locals)."""

    loss_dino: torch.Tensor | None = None
    teacher_temperature: torch.Tensor | None = None
    ema_momentum: torch.Tensor | None = None
    student_views: torch.Tensor | None = None


class BackboneHead(nn.Module):
    """``backbone(x) -> [B, D]`` (CLS embedding) followed by a DINO head ``-> [B, K]``."""

    def __init__(self, backbone: nn.Module, head: nn.Module, pos_embed_antialias: bool = False):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.pos_embed_antialias = pos_embed_antialias  # local crops' positions: timm's antialiased resampling

    def forward(self, views: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Runs the backbone once per group of consecutive same-resolution views (as DINO's MultiCropWrapper),
        its last block for the CLS token only (:func:`methods.vit.cls_embedding`: the same output).

        Returns per-view embeddings ``[B, D]`` and head outputs ``[B, K]``.
        """
        embeddings: list[torch.Tensor] = []
        start = 0
        while start < len(views):
            end = start + 1
            while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
                end += 1
            out = cls_embedding(self.backbone, torch.cat(list(views[start:end]), dim=0), self.pos_embed_antialias)
            embeddings.extend(out.chunk(end - start, dim=0))
            start = end
        logits = self.head(torch.cat(embeddings, dim=0)).chunk(len(views), dim=0)
        return embeddings, list(logits)


class DINO(SelfDistillationMethod):
    """DINO with a timm ViT backbone, multi-crop views and an EMA teacher.

    :param encoder_name: timm ViT name (default ``"vit_small_patch16_224"``) or a pre-built ViT module.
    :param projector_hidden_dim: hidden dim of the 3-layer head MLP (default 2048).
    :param projector_bottleneck_dim: bottleneck dim before the prototypes (default 256).
    :param n_prototypes: number of prototypes / output dim (default 65536).
    :param temperature_student: student softmax temperature (default 0.1).
    :param temperature_teacher_warmup: teacher temperature at epoch 0 (default 0.04).
    :param temperature_teacher: teacher temperature after the warm-up (default 0.07).
    :param warmup_epochs_temperature_teacher: warm-up length W in epochs (default 30): the temperature of epoch
        ``e`` is ``np.linspace(warmup, final, W)[e]``, then ``final``.
    :param center_momentum: EMA momentum of the centre (default 0.9).
    :param ema_decay_start: teacher EMA momentum at step 0 (default 0.996).
    :param ema_decay_end: teacher EMA momentum at the last step (default 1.0).
    :param encoder_kwargs: extra kwargs for ``timm.create_model``; ``dynamic_img_size=True`` is always set so
        that global and local crops of different sizes go through the same ViT.
    :param pretrained: load pretrained timm weights for the encoder.
    :param norm_last_layer: extension (DINO's ``--norm_last_layer``): True (default) fixes the prototypes' norm;
        False trains the weight-norm gain, which DINO uses for ViT-S/small models.
    :param pos_embed_antialias: extension: False (default, DINO's ``interpolate_pos_encoding``) resamples the position
        embeddings for local crops with plain bicubic interpolation (:func:`methods.vit.resample_patch_pos_embed`);
        True uses timm's ``resample_abs_pos_embed`` (bicubic with antialiasing when shrinking).
    """

    method_name = "dino"

    @classmethod
    def training_views(cls, data: Mapping[str, Any]) -> TrainingViews:
        """2 global views + ``data.multicrop.n_local`` local crops (:func:`methods.views.multicrop_views`)."""
        return multicrop_views(data)

    def __init__(
        self,
        encoder_name: str | nn.Module = "vit_small_patch16_224",
        projector_hidden_dim: int = 2048,
        projector_bottleneck_dim: int = 256,
        n_prototypes: int = 65536,
        temperature_student: float = 0.1,
        temperature_teacher_warmup: float = 0.04,
        temperature_teacher: float = 0.07,
        warmup_epochs_temperature_teacher: int = 30,
        center_momentum: float = 0.9,
        ema_decay_start: float = 0.996,
        ema_decay_end: float = 1.0,
        encoder_kwargs: dict | None = None,
        pretrained: bool = False,
        norm_last_layer: bool = True,
        use_bn_in_head: bool = False,
        pos_embed_antialias: bool = False,
    ):
        super().__init__()
        encoder_kwargs = dict(encoder_kwargs or {})
        encoder_kwargs["dynamic_img_size"] = True
        backbone = self._build_backbone(encoder_name, encoder_kwargs, pretrained)
        embed_dim = int(getattr(backbone, "num_features", getattr(backbone, "embed_dim", 0)))
        head = DINOHead(
            embed_dim, n_prototypes, projector_hidden_dim, projector_bottleneck_dim, norm_last_layer=norm_last_layer,
            use_bn=use_bn_in_head,
        )
        self.pos_embed_antialias = bool(pos_embed_antialias)
        self.ts = TeacherStudent(BackboneHead(backbone, head, self.pos_embed_antialias), ema_decay_start, ema_decay_end)
        self.loss_fn = DINOLoss(n_prototypes, center_momentum)
        self._init_schedules(
            temperature_student, temperature_teacher_warmup, temperature_teacher,
            warmup_epochs_temperature_teacher, ema_decay_start,
        )

    def last_layer_heads(self) -> list[nn.Module]:
        return [self.student.head]

    # ---- forward ----------------------------------------------------------------------------------------
    def forward(
        self,
        global_views: Sequence[torch.Tensor] | None = None,
        local_views: Sequence[torch.Tensor] | None = None,
        images: torch.Tensor | None = None,
    ) -> DINOOutput:
        if self.is_eval_call(images):
            emb = self.teacher_embedding(images, global_views)
            return DINOOutput(loss=torch.zeros((), device=emb.device), embedding=emb)

        if not global_views:
            raise ValueError("DINO.forward in training mode needs global_views (a list of [B, C, H, W])")
        global_views = list(global_views)
        local_views = list(local_views or [])
        _, student_logits = self.ts.forward_student(global_views + local_views)
        teacher_emb, teacher_logits = self.ts.forward_teacher(global_views)
        health = self.cls_health(student_logits, teacher_logits, self.loss_fn.center.clone())
        loss = self.loss_fn(
            student_logits, teacher_logits, self.temperature_student, self.current_teacher_temperature
        )
        device = loss.device
        return DINOOutput(
            loss=loss,
            embedding=teacher_emb[0].detach(),
            health=health,
            loss_dino=loss.detach(),
            teacher_temperature=torch.tensor(self.current_teacher_temperature, device=device),
            ema_momentum=torch.tensor(self.ema_momentum, device=device),
            student_views=torch.tensor(float(len(global_views) + len(local_views)), device=device),
        )
