"""BYOL: Bootstrap Your Own Latent (Grill et al., NeurIPS 2020, arXiv 2006.07733).

Two views ``v1, v2`` of an image (:func:`methods.views.byol_recipes`: blur 1.0 / 0.1, solarisation 0 / 0.2). The
online network is a backbone ``f``, a projector ``g`` and a predictor ``q``; the target network is ``(f', g')``, an
exponential moving average of ``(f, g)`` (:class:`methods.teacher_student.TeacherStudent`) that gets no gradient:

    p_i = q(g(f(v_i))),   z'_i = g'(f'(v_i)),   l(p, z) = || p / ||p|| - z / ||z|| ||^2 = 2 - 2 cos(p, z)
    L = mean_batch [ l(p_1, sg(z'_2)) + l(p_2, sg(z'_1)) ]                                  (paper, Eq. 2 and 4)

as google-deepmind/deepmind-research ``byol/byol_experiment.py`` (``regression_loss`` of both pairs summed, then the
batch mean; stable-pretraining halves that sum). After each optimizer step ``theta' <- tau theta' + (1 - tau) theta``
with ``tau = 1 - (1 - tau_0) (cos(pi k / K) + 1) / 2`` over the ``K`` training steps (paper, Sec. 3.2).

Projector and predictor are the reference's ``networks.MLP``: Linear(hidden) - BatchNorm - ReLU - Linear(output,
no bias), 4096 -> 256 by default. Each view goes through the networks on its own (BatchNorm statistics per view,
as the reference's ``apply_once_fn``); the target's BatchNorm normalises with batch statistics, as the reference
applies the target with ``is_training=True``. Evaluation and export use the online backbone (the paper's linear
evaluation uses the online encoder ``f``). Backbones: timm ViTs and ResNets (:mod:`methods.joint_embedding`).

Constructor names and defaults follow stable-pretraining's ``BYOL`` (``ema_decay_start`` 0.99, its default and the
reference's 100/300-epoch preset; the 1000-epoch ImageNet run uses 0.996), plus ``encoder_kwargs``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from methods import constraints as C
from methods.joint_embedding import JointEmbeddingMethod, JointEmbeddingOutput
from methods.teacher_student import TeacherStudent

NORMALIZE_EPS = 1e-6  # the reference's l2_normalize: rsqrt(max(sum x^2, 1e-12)) = 1 / max(||x||, 1e-6)


@dataclass
class BYOLOutput(JointEmbeddingOutput):
    """``loss`` (0 in eval); ``embedding`` the online backbone's ``[B, D]`` of ``view1`` (detached in training);
    ``projection`` the online projection of ``view1``; ``prediction`` ``[2B, P]`` the online predictions of both
    views and ``target`` ``[2B, P]`` the target projections of both views (view 1 rows first; None in eval)."""

    prediction: torch.Tensor | None = None
    target: torch.Tensor | None = None


def byol_mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """BYOL's projector / predictor (deepmind-research ``byol/utils/networks.py`` ``MLP``):
    ``Linear(in, hidden) -> BatchNorm1d -> ReLU -> Linear(hidden, out, bias=False)``."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim, bias=False),
    )


def regression_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample ``|| p / ||p|| - z / ||z|| ||^2 = 2 - 2 cos(p, z)`` over the last dimension, in float32."""
    p = F.normalize(prediction.float(), dim=-1, eps=NORMALIZE_EPS)
    z = F.normalize(target.float(), dim=-1, eps=NORMALIZE_EPS)
    return (p - z).pow(2).sum(dim=-1)


def byol_loss(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """``mean_b [l(p1, sg(z2)) + l(p2, sg(z1))]``: each view's prediction regresses the other view's target."""
    return (regression_loss(p1, z2.detach()) + regression_loss(p2, z1.detach())).mean()


@dataclass(frozen=True)
class SameOutputDim(C.Constraint):
    """``param[-1] == other[-1]``: the prediction regresses the target projection, so their widths match."""

    param: str
    other: str

    @property
    def params(self) -> tuple[str, ...]:
        return (self.param, self.other)

    def check(self, kwargs: Mapping[str, Any], prefix: str = "") -> None:
        value, other = kwargs.get(self.param), kwargs.get(self.other)
        if not (isinstance(value, Sequence) and isinstance(other, Sequence) and value and other):
            return  # the shapes are ListOf's to refuse
        if value[-1] != other[-1]:
            expected = f"an output size equal to {prefix}{self.other}'s ({other[-1]})"
            raise C.ConstraintError(prefix + self.param, expected, list(value))


def _dims(param: str) -> C.ListOf:
    return C.ListOf(param, 2, C.positive_int(param), "[hidden, output]: two integers >= 1")


class BYOL(JointEmbeddingMethod):
    """BYOL (see the module docstring). Modules as stable-pretraining's: ``backbone`` and ``projector`` are
    :class:`methods.teacher_student.TeacherStudent` pairs (online ``.student``, target ``.teacher``), ``predictor``
    is online only.

    :param encoder_name: timm ViT or ResNet name (or a built ``nn.Module`` whose forward gives ``[B, D]``).
    :param projector_dims: ``(hidden, output)`` of the projector (paper: 4096, 256).
    :param predictor_dims: ``(hidden, output)`` of the predictor; its output equals the projector's.
    :param ema_decay_start: target momentum ``tau_0`` at step 0 (paper: 0.996 for 1000 epochs, 0.99 for 300).
    :param ema_decay_end: momentum at the last step (paper: 1).
    :param low_resolution: ResNet small-image stem (3x3 stride 1, no max-pool).
    :param pretrained: start from timm's pretrained weights.
    :param encoder_kwargs: passed to timm (e.g. a small ViT's ``img_size``, ``patch_size``, ``embed_dim``).
    """

    method_name: ClassVar[str] = "byol"
    output_class: ClassVar[type[JointEmbeddingOutput]] = BYOLOutput
    constraints = (
        _dims("projector_dims"),
        _dims("predictor_dims"),
        SameOutputDim("predictor_dims", "projector_dims"),
        C.unit_interval("ema_decay_start"),
        C.unit_interval("ema_decay_end"),
        C.NotBelow("ema_decay_end", "ema_decay_start"),
    )

    def __init__(
        self,
        encoder_name: str | nn.Module = "vit_small_patch16_224",
        projector_dims: tuple[int, ...] = (4096, 256),
        predictor_dims: tuple[int, ...] = (4096, 256),
        ema_decay_start: float = 0.99,
        ema_decay_end: float = 1.0,
        low_resolution: bool = False,
        pretrained: bool = False,
        encoder_kwargs: dict[str, Any] | None = None,
    ):
        kwargs = dict(projector_dims=list(projector_dims), predictor_dims=list(predictor_dims),
                      ema_decay_start=ema_decay_start, ema_decay_end=ema_decay_end)
        self.check_kwargs(kwargs if isinstance(encoder_name, nn.Module) else {**kwargs, "encoder_name": encoder_name})
        super().__init__(encoder_name, encoder_kwargs, low_resolution, pretrained)
        (proj_hidden, proj_out), (pred_hidden, pred_out) = projector_dims, predictor_dims
        # online networks f, g (student) and their targets f', g' (teacher: EMA copies, no gradient)
        self.backbone = TeacherStudent(self.backbone, ema_decay_start, ema_decay_end)
        self.projector = TeacherStudent(byol_mlp(self.embed_dim, int(proj_hidden), int(proj_out)),
                                        ema_decay_start, ema_decay_end)
        self.predictor = byol_mlp(int(proj_out), int(pred_hidden), int(pred_out))
        self.ema_momentum = float(ema_decay_start)

    # ---- training -------------------------------------------------------------------------------------------
    def joint_loss(self, view1: torch.Tensor, view2: torch.Tensor) -> BYOLOutput:
        """The symmetric loss of the module docstring for a batch of view pairs ``[B, C, H, W]``."""
        h1, h2 = self.backbone(view1), self.backbone(view2)
        z1, z2 = self.projector(h1), self.projector(h2)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        with torch.no_grad():
            t1 = self.projector.forward_teacher(self.backbone.forward_teacher(view1))
            t2 = self.projector.forward_teacher(self.backbone.forward_teacher(view2))
        return BYOLOutput(
            loss=byol_loss(p1, p2, t1, t2), embedding=h1.detach(), projection=z1.detach(),
            prediction=torch.cat([p1, p2]).detach(), target=torch.cat([t1, t2]),
        )

    def on_train_step(self, step: int, total_steps: int, epoch: float) -> None:
        """``tau = 1 - (1 - tau_0) (cos(pi k / K) + 1) / 2`` (with ``ema_decay_end`` in place of 1)."""
        self.ema_momentum = self.backbone.momentum_at(step, total_steps)

    def after_optimizer_step(self) -> None:
        """``theta' <- tau theta' + (1 - tau) theta`` for the target backbone and projector."""
        self.backbone.update_teacher(self.ema_momentum)
        self.projector.update_teacher(self.ema_momentum)

    def schedule_state(self) -> dict[str, float]:
        return {"ema_momentum": float(self.ema_momentum)}

    # ---- export ---------------------------------------------------------------------------------------------
    def export_encoder(self) -> nn.Module:
        """The online backbone ``f`` (the paper evaluates the online encoder)."""
        return self.backbone.student
