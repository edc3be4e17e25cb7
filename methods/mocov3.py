"""MoCo v3 (Chen, Xie, He 2021, "An Empirical Study of Training Self-Supervised Vision Transformers", arXiv 2104.02057;
reference facebookresearch/moco-v3 ``moco/builder.py``).

A base encoder (backbone ``f`` + projector ``g``) and a predictor ``p`` give the queries ``q = p(g(f(x)))``; the
momentum encoder, an EMA copy of ``f`` and ``g`` (:class:`methods.teacher_student.TeacherStudent`), gives the keys
``k = g'(f'(x))``. Without a memory queue, the keys of the batch (of every worker) are the candidates
(:func:`methods.contrastive.moco_contrastive`, Algorithm 1):

    ctr(q, k) = 2 T * CE(q_hat k_all_hat^T / T, y),   L = ctr(q1, k2) + ctr(q2, k1)

with ``y_i`` the row of sample ``i``'s own key. The momentum follows moco-v3's ``adjust_moco_momentum``,
``m = 1 - (1 + cos(pi t / T_total)) / 2 * (1 - m_0)`` (from ``ema_decay_start`` 0.99 to ``ema_decay_end`` 1), and
the momentum encoder is updated after each optimizer step (the reference updates it at the start of the next
forward: the same weights, the momentum value one step earlier). Heads (``_build_mlp``): ``Linear(bias=False) -> BN
-> ReLU`` per hidden layer, the last ``Linear(bias=False)`` followed by a BatchNorm without gamma / beta; a ViT's
projector has 3 layers and its predictor ends with that BatchNorm (``MoCo_ViT``), a ResNet's projector 2 layers
(``projector_dims=(4096, 256)``) and its predictor none (``MoCo_ResNet``). ``stop_grad_conv1``: a ViT's patch
projection stays at its random initialisation (moco-v3 ``vits.py``, the paper's Sec. 4.2 "random patch projection").
Views: BYOL's asymmetric pair, as moco-v3's ``augmentation1`` / ``augmentation2`` (:class:`JointEmbeddingMethod`).
Evaluation and export: the base encoder's backbone (moco-v3's ``main_lincls.py`` loads ``module.base_encoder``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from methods import constraints as C
from methods.contrastive import Widths, bn_mlp, moco_contrastive
from methods.joint_embedding import JointEmbeddingMethod, JointEmbeddingOutput
from methods.teacher_student import EMATeacherMethod, TeacherStudent


@dataclass
class MoCoV3Output(JointEmbeddingOutput):
    """``loss``; ``embedding`` the base backbone's ``f(view1)`` (detached); ``projection`` the queries ``q1``
    (detached); ``target`` the momentum keys ``k1`` (None in eval)."""

    target: torch.Tensor | None = None


class MoCoV3(JointEmbeddingMethod, EMATeacherMethod):
    """MoCo v3: base encoder + predictor against a momentum encoder, symmetric contrastive loss (module docstring).

    ``backbone`` and ``projector`` are :class:`TeacherStudent` s (base = student, momentum = teacher) moved by one
    momentum; :attr:`ts` is the backbone's, so :class:`EMATeacherMethod`'s hooks and views (``student``, ``teacher``:
    the two backbones; a released encoder starts both, :func:`methods.pretrained.encoder_init_targets`) apply.

    :param encoder_name: timm ViT or ResNet name (or a module whose forward gives ``[B, D]``).
    :param projector_dims: the projector's hidden and output widths (ViT: ``(4096, 4096, 256)``; ResNet-50:
        ``(4096, 256)``).
    :param predictor_hidden_dim: the 2-layer predictor's hidden width (4096).
    :param temperature: ``T`` of the contrastive loss (ViT: 0.2; moco-v3's ResNet-50 runs: 1.0).
    :param ema_decay_start: momentum ``m_0`` of the momentum encoder (0.99), cosine to ``ema_decay_end`` (1.0).
    :param ema_decay_end: final momentum.
    :param low_resolution: a ResNet's 3x3 stride-1 stem without max-pool (small images).
    :param pretrained: timm's pretrained weights.
    :param encoder_kwargs: passed to timm (e.g. a small ViT's ``img_size``, ``patch_size``).
    :param stop_grad_conv1: freeze a ViT's patch projection at its random initialisation (moco-v3's ViT recipes).
    """

    method_name = "mocov3"
    output_class = MoCoV3Output
    # with EMATeacherMethod's: ema_decay_start, ema_decay_end in [0, 1], end >= start
    constraints = (Widths("projector_dims"), C.positive_int("predictor_hidden_dim"), C.positive("temperature"))

    def __init__(
        self,
        encoder_name: str | nn.Module = "vit_small_patch16_224",
        projector_dims: tuple[int, ...] = (4096, 4096, 256),
        predictor_hidden_dim: int = 4096,
        temperature: float = 0.2,
        ema_decay_start: float = 0.99,
        ema_decay_end: float = 1.0,
        low_resolution: bool = False,
        pretrained: bool = False,
        encoder_kwargs: dict[str, Any] | None = None,
        stop_grad_conv1: bool = False,
    ):
        super().__init__(encoder_name, encoder_kwargs, low_resolution, pretrained)
        base = self.backbone
        is_vit = hasattr(base, "patch_embed")
        if stop_grad_conv1:
            if not is_vit:
                raise ValueError("stop_grad_conv1 freezes a ViT's patch projection; the backbone has no patch_embed")
            base.patch_embed.requires_grad_(False)
        dims = [self.embed_dim, *[int(d) for d in projector_dims]]
        # base and momentum encoders: online backbone / projector (student) and their EMA copies (teacher)
        self.backbone = TeacherStudent(base, ema_decay_start, ema_decay_end)
        self.projector = TeacherStudent(bn_mlp(dims, last_bn="no_affine"), ema_decay_start, ema_decay_end)
        self.predictor = bn_mlp([dims[-1], int(predictor_hidden_dim), dims[-1]], last_bn="no_affine" if is_vit else "none")
        self.temperature = float(temperature)
        self.ema_momentum = float(ema_decay_start)

    # ---- training -------------------------------------------------------------------------------------------
    def joint_loss(self, view1: torch.Tensor, view2: torch.Tensor) -> MoCoV3Output:
        """``ctr(q1, k2) + ctr(q2, k1)``; each view passes the encoders on its own (BatchNorm statistics per view,
        as moco-v3's ``forward``)."""
        h1, h2 = self.backbone(view1), self.backbone(view2)
        q1, q2 = self.predictor(self.projector(h1)), self.predictor(self.projector(h2))
        with torch.no_grad():
            k1 = self.projector.forward_teacher(self.backbone.forward_teacher(view1))
            k2 = self.projector.forward_teacher(self.backbone.forward_teacher(view2))
        loss = moco_contrastive(q1, k2, self.temperature) + moco_contrastive(q2, k1, self.temperature)
        return MoCoV3Output(loss=loss, embedding=h1.detach(), projection=q1.detach(), target=k1)

    @property
    def ts(self) -> TeacherStudent:
        """The backbone's teacher-student pair (:class:`EMATeacherMethod`'s ``ts``; its ``on_train_step`` sets the
        momentum from it: ``adjust_moco_momentum``)."""
        return self.backbone

    def after_optimizer_step(self) -> None:
        """Momentum update of backbone and projector: ``theta_m <- m theta_m + (1 - m) theta_b``."""
        self.backbone.update_teacher(self.ema_momentum)
        self.projector.update_teacher(self.ema_momentum)

    # ---- export ---------------------------------------------------------------------------------------------
    def export_encoder(self) -> nn.Module:
        """The base encoder's backbone (moco-v3 evaluates ``base_encoder``)."""
        return self.backbone.student
