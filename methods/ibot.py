"""iBOT: Image BERT Pre-Training with Online Tokenizer (Zhou et al., ICLR 2022, arXiv 2111.07832).

DINO self-distillation on the CLS token plus masked image modelling with an online tokenizer (the EMA
teacher). For each global view ``v`` the student encodes the view with a random fraction ``mask_ratio`` of
its patch embeddings replaced by a learned mask token; the teacher encodes the unmasked view. With CLS head
outputs ``g^cls`` and patch head outputs ``g^patch`` (each head with its own prototypes and centre):

    L_cls   = 1 / |pairs| * sum_{t != s} H(softmax((g^cls_t - c) / tau_t), softmax(g^cls_s / tau_s))   (DINO, cross-view)
    L_patch = mean_v mean_b [ sum_n m_bn H(softmax((g^patch_t,bn - c') / tau'_t), softmax(g^patch_s,bn / tau_s))
                              / sum_n m_bn ]                                                        (same view, masked patches)
    L       = L_cls + patch_loss_weight * L_patch

Multi-crop (iBOT's ``--local_crops_number``, 10 at 96 px for the headline ViT-S/16): the student also encodes the
``local_views`` (unmasked, CLS only); they enter ``L_cls`` as student views ``s`` against every teacher global view
``t``, so ``|pairs| = n_g (n_g + n_l) - n_g``, and not ``L_patch`` (``main_ibot.py`` ``iBOTLoss.forward``). The
teacher sees the global views only.

Teacher = EMA of the student (backbone, mask token and both heads) with the cosine momentum schedule, teacher
temperature warmed up linearly in epochs, heads frozen-prototype during the first epoch, as in DINO. The patch
temperature ``tau'_t`` follows the same warm-up shifted by ``mask_start_epoch`` (``iBOTLoss.teacher_temp2_schedule``:
``warmup`` until the masking starts, then the warm-up). As in the
seed's interface (two prototype heads) the CLS and patch heads are separate DINO heads by default;
``head_sharing="mlp"`` is the official ``iBOTHead`` (one MLP, separate prototypes) and ``"all"`` adds iBOT's
``--shared_head`` (one set of prototypes too).

Masks: by default ``round(N * mask_ratio)`` patches uniformly at random per view (the seed). The official recipe
draws BEiT block-wise masks (``mask_shape="block"``, aspect ratio ``e^U(log 0.3, log 1/0.3)``) with a per-image
ratio ``U(mask_ratio - mask_ratio_var, mask_ratio + mask_ratio_var)``, leaves a share ``unmasked_fraction`` of the
images unmasked (iBOT's ``--pred_ratio 0 0.3 --pred_ratio_var 0 0.2``: 0.5, 0.3, 0.2) and masks nothing before
``mask_start_epoch`` (``--pred_start_epoch``) (:func:`methods.masks.block_masks`). The patch tokens entering the
patch head are final-norm tokens also under ``global_pool='avg'`` (:func:`methods.vit.per_token_norm`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from methods import vit as V
from methods.base import MethodOutput
from methods.heads import DINOHead, iBOTHead
from methods.heads import _project as project_and_normalize
from methods.health import HealthInputs
from methods.losses import DINOLoss, iBOTPatchLoss
from methods.masks import block_masks, sample_mask_ratios
from methods.schedules import teacher_temperature
from methods.teacher_student import SelfDistillationMethod, TeacherStudent
from methods.views import TrainingViews, multicrop_views


@dataclass
class iBOTOutput(MethodOutput):
    """``loss``; ``embedding`` ``[B, D]`` (teacher CLS); ``loss_cls``; ``loss_patch``; ``teacher_temperature``;
    ``teacher_patch_temperature``; ``ema_momentum``; ``masks`` (per global view ``[B, N]``, True = masked);
    ``student_views`` (global + local views the student saw)."""

    loss_cls: torch.Tensor | None = None
    loss_patch: torch.Tensor | None = None
    teacher_temperature: torch.Tensor | None = None
    teacher_patch_temperature: torch.Tensor | None = None
    student_views: torch.Tensor | None = None
    ema_momentum: torch.Tensor | None = None
    masks: list[torch.Tensor] | None = None


@dataclass
class DistillationTerms:
    """One training step of :meth:`iBOT.distillation_terms` (shared with DINOv2): the unweighted CLS and patch losses,
    the student's and teacher's CLS embeddings of the global views ``[n B, D]`` (view by view; the student's of the
    masked views), the CLS health inputs, the masks ``[n B, N]`` (True = masked), and the numbers of views."""

    loss_cls: torch.Tensor
    loss_patch: torch.Tensor
    student_embedding: torch.Tensor
    teacher_embedding: torch.Tensor
    health: HealthInputs
    masks: torch.Tensor
    n_global: int
    n_local: int


HEAD_SHARING = ("none", "mlp", "all")
MASK_SHAPES = ("random", "block")


class iBOTNet(nn.Module):
    """ViT backbone + learned mask token + heads (the module that is EMA-copied).

    ``head`` is an :class:`methods.heads.iBOTHead` (shared MLP) or ``None`` with separate ``cls_head`` and
    ``patch_head`` DINO heads.
    """

    def __init__(self, backbone: nn.Module, cls_head: nn.Module | None, patch_head: nn.Module | None, head: iBOTHead | None = None):
        super().__init__()
        self.backbone = backbone
        self.cls_head = cls_head
        self.patch_head = patch_head
        self.head = head
        self.mask_token = nn.Parameter(torch.zeros(1, 1, backbone.embed_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def heads(self) -> list[nn.Module]:
        return [self.head] if self.head is not None else [self.cls_head, self.patch_head]

    def forward(
        self, images: torch.Tensor, mask: torch.Tensor | None = None, patch_rows: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(cls embedding [B, D], cls logits [B, K], patch logits [B, N, K'])``; ``mask`` ``[B, N]`` (1 = masked).

        ``patch_rows`` ``[B, N]`` (bool, optional): the patch head runs only on these tokens and the patch logits
        are ``[M, K']``, the rows in ``patch_rows.nonzero()`` order (the student: only masked patches enter the loss).
        """
        emb, patches = self._embedding_and_patches(images, mask)
        if patch_rows is not None:
            patches = patches[patch_rows.bool()]
        if self.head is not None:
            cls_logits, patch_logits = self.head(emb, patches)
            return emb, cls_logits, patch_logits
        return emb, self.cls_head(emb), self.patch_head(patches)

    def forward_patch_rows_and_mean(
        self, images: torch.Tensor, patch_rows: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The teacher's pass: ``(cls embedding, cls logits, patch logits at patch_rows [M, K'], mean patch logits [K'])``.

        The patch head's MLP runs on every patch, its prototypes (a bias-free linear map ``W``) only on
        ``patch_rows`` and on the mean bottleneck: ``mean_{b,n} W z_bn = W mean_{b,n} z_bn``, the mean over all
        patches that the patch centre needs (equal up to float rounding).
        """
        emb, patches = self._embedding_and_patches(images, None)
        if self.head is not None:
            cls_logits, z = self.head.cls_logits_and_patch_bottleneck(emb, patches)
            prototypes = self.head.last_layer2
        else:
            cls_logits, z = self.cls_head(emb), self.patch_head.bottleneck(patches)
            prototypes = self.patch_head.last_layer
        return emb, cls_logits, prototypes(z[patch_rows.bool()]), prototypes(z.mean(dim=(0, 1)))

    def cls_logits(self, images: torch.Tensor) -> torch.Tensor:
        """CLS logits ``[B, K]`` of unmasked views (the student's local crops: ``main_ibot.py`` runs them with
        ``masked_im_modeling = False`` and keeps the CLS output ``[0]``); the CLS head only."""
        emb = V.cls_embedding(self.backbone, images)
        if self.head is not None:
            return self.head.last_layer(project_and_normalize(self.head.mlp, emb))  # the MLP on CLS rows alone
        return self.cls_head(emb)

    def _embedding_and_patches(self, images: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        x = V.embed_patches(self.backbone, images, mask, self.mask_token if mask is not None else None)
        tokens = V.run_blocks(self.backbone, x)
        emb = V.pooled_embedding(self.backbone, tokens)
        return emb, V.per_token_norm(self.backbone, tokens)[:, V.num_prefix_tokens(self.backbone) :]


def _check_options(
    mask_ratio: float,
    patch_loss_weight: float,
    mask_shape: str,
    head_sharing: str,
    mask_ratio_var: float,
    unmasked_fraction: float,
    mask_aspect_ratio: tuple[float, float],
    mask_start_epoch: int,
) -> None:
    """Raise ``ValueError`` on a masking, loss-weight or head-sharing option out of range."""
    if not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
    if patch_loss_weight < 0:
        raise ValueError(f"patch_loss_weight must be >= 0, got {patch_loss_weight}")
    if mask_shape not in MASK_SHAPES:
        raise ValueError(f"mask_shape must be one of {MASK_SHAPES}, got {mask_shape!r}")
    if head_sharing not in HEAD_SHARING:
        raise ValueError(f"head_sharing must be one of {HEAD_SHARING}, got {head_sharing!r}")
    if not 0.0 <= mask_ratio_var <= min(mask_ratio, 1.0 - mask_ratio):
        raise ValueError(f"mask_ratio_var must be in [0, min(mask_ratio, 1 - mask_ratio)], got {mask_ratio_var}")
    if not 0.0 <= unmasked_fraction < 1.0:
        raise ValueError(f"unmasked_fraction must be in [0, 1), got {unmasked_fraction}")
    if len(mask_aspect_ratio) != 2 or not 0.0 < mask_aspect_ratio[0] <= mask_aspect_ratio[1]:
        raise ValueError(f"mask_aspect_ratio must be (min, max) with 0 < min <= max, got {mask_aspect_ratio}")
    if mask_start_epoch < 0:
        raise ValueError(f"mask_start_epoch must be >= 0, got {mask_start_epoch}")


def _encoder_kwargs_at_image_size(encoder_kwargs: dict | None, image_size: int) -> dict:
    """A copy of ``encoder_kwargs`` with ``img_size = image_size`` (a different ``img_size`` there is an error) and
    ``dynamic_img_size=True`` (local crops of another size go through the same ViT, positions interpolated, as DINO)."""
    encoder_kwargs = dict(encoder_kwargs or {})
    if "img_size" in encoder_kwargs and encoder_kwargs["img_size"] != image_size:
        raise ValueError(f"encoder_kwargs.img_size={encoder_kwargs['img_size']!r} differs from image_size={image_size}")
    encoder_kwargs["img_size"] = image_size
    encoder_kwargs["dynamic_img_size"] = True
    return encoder_kwargs


def _build_net(
    backbone: nn.Module, head_sharing: str, n_cls_prototypes: int, n_patch_prototypes: int, head_args: dict
) -> iBOTNet:
    """The student network: two DINO heads (``"none"``) or one :class:`iBOTHead` (``"mlp"``/``"all"``).

    Heads are created before the mask token (the initialisation order under a seed).
    """
    dim = int(backbone.embed_dim)
    if head_sharing == "none":
        return iBOTNet(backbone, DINOHead(dim, n_cls_prototypes, **head_args), DINOHead(dim, n_patch_prototypes, **head_args))
    shared = iBOTHead(dim, n_cls_prototypes, n_patch_prototypes, shared_last_layer=head_sharing == "all", **head_args)
    return iBOTNet(backbone, None, None, shared)


class iBOT(SelfDistillationMethod):
    """iBOT with a timm ViT backbone, an EMA teacher, global views and optional local crops (``data.multicrop``).

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
    :param use_bn_in_head: extension (``--use_bn_in_head``): BatchNorm in the head MLPs.
    :param mask_shape: extension (``--pred_shape``): ``"random"`` (default, the seed) or ``"block"`` (BEiT
        block-wise, iBOT's default).
    :param mask_ratio_var: extension (``--pred_ratio_var``): per-image ratio ``U(mask_ratio +- var)`` (default 0).
    :param unmasked_fraction: extension: share of images left unmasked (iBOT's ``--pred_ratio 0 0.3``: 0.5).
    :param mask_aspect_ratio: extension (``--pred_aspect_ratio``): block aspect-ratio range (default (0.3, 1/0.3)).
    :param mask_start_epoch: extension (``--pred_start_epoch``): no masking before this epoch, and the patch
        temperature's warm-up starts there (default 0).
    :param head_sharing: extension: ``"none"`` (default: two DINO heads), ``"mlp"`` (iBOTHead: one MLP, CLS and
        patch prototypes apart) or ``"all"`` (``--shared_head``: one MLP and one set of prototypes).
    """

    method_name = "ibot"

    @classmethod
    def training_views(cls, data: Mapping[str, Any]) -> TrainingViews:
        """2 global views + ``data.multicrop.n_local`` local crops (:func:`methods.views.multicrop_views`)."""
        return multicrop_views(data)

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
        mask_shape: str = "random",
        mask_ratio_var: float = 0.0,
        unmasked_fraction: float = 0.0,
        mask_aspect_ratio: tuple[float, float] = (0.3, 1 / 0.3),
        mask_start_epoch: int = 0,
        head_sharing: str = "none",
    ):
        super().__init__()
        _check_options(mask_ratio, patch_loss_weight, mask_shape, head_sharing, mask_ratio_var, unmasked_fraction,
                       mask_aspect_ratio, mask_start_epoch)
        encoder_kwargs = _encoder_kwargs_at_image_size(encoder_kwargs, image_size)
        backbone = self._build_backbone(encoder_name, encoder_kwargs, pretrained)
        head_args = dict(hidden_dim=projector_hidden_dim, bottleneck_dim=projector_bottleneck_dim,
                         norm_last_layer=norm_last_layer, use_bn=use_bn_in_head)
        net = _build_net(backbone, head_sharing, n_cls_prototypes, n_patch_prototypes, head_args)
        self.ts = TeacherStudent(net, ema_decay_start, ema_decay_end)
        self._init_losses(net, n_cls_prototypes, n_patch_prototypes)

        self.image_size = image_size
        self._set_masking(mask_ratio, mask_shape, mask_ratio_var, unmasked_fraction, mask_aspect_ratio, mask_start_epoch)
        self.patch_loss_weight = float(patch_loss_weight)
        self._init_schedules(
            temperature_student, temperature_teacher_warmup, temperature_teacher,
            warmup_epochs_temperature_teacher, ema_decay_start,
        )
        self.current_patch_teacher_temperature = float(temperature_teacher_warmup)

    def _init_losses(
        self, net: iBOTNet, n_cls_prototypes: int, n_patch_prototypes: int, centering: str = "centering"
    ) -> None:
        """The masked-rows-only switches and the CLS and patch losses (each with its centre buffer), the teacher
        normalised by ``centering`` (:data:`methods.losses.CENTERINGS`: iBOT's centre, or DINOv2's Sinkhorn-Knopp)."""
        # The student's patch logits enter the loss only at masked patches: its patch head runs on those rows only
        # (exact: other rows get no gradient). Not with BatchNorm in the head, whose statistics span all patches.
        self.student_head_on_masked_only = not any(
            isinstance(mod, nn.modules.batchnorm._BatchNorm) for head in net.heads() for mod in head.modules()
        )
        # The teacher's patch logits enter the loss only at masked patches too, and its patch centre needs only
        # their mean: its prototypes run on those rows and on the mean bottleneck (the MLP still sees every patch).
        self.teacher_prototypes_on_masked_only = True
        self.cls_loss_fn = DINOLoss(n_cls_prototypes, self.center_momentum, centering)
        self.patch_loss_fn = iBOTPatchLoss(n_patch_prototypes, self.center_momentum, centering)

    def _set_masking(
        self,
        mask_ratio: float,
        mask_shape: str,
        mask_ratio_var: float,
        unmasked_fraction: float,
        mask_aspect_ratio: tuple[float, float],
        mask_start_epoch: int,
    ) -> None:
        """Store the (checked) masking options read by :meth:`sample_masks`."""
        self.mask_ratio = float(mask_ratio)
        self.mask_shape = mask_shape
        self.mask_ratio_var = float(mask_ratio_var)
        self.unmasked_fraction = float(unmasked_fraction)
        self.mask_aspect_ratio = (float(mask_aspect_ratio[0]), float(mask_aspect_ratio[1]))
        self.mask_start_epoch = int(mask_start_epoch)

    def last_layer_heads(self) -> list[nn.Module]:
        return self.student.heads()

    # ---- schedules --------------------------------------------------------------------------------------
    def patch_teacher_temperature(self, epoch: float) -> float:
        """The patch loss's teacher temperature at ``epoch``: ``main_ibot.py``'s ``teacher_temp2_schedule``, the CLS
        warm-up (:func:`methods.schedules.teacher_temperature`) delayed by ``mask_start_epoch`` (``--pred_start_epoch``),
        ``temperature_teacher_warmup`` before it."""
        if epoch < self.mask_start_epoch:
            return float(self.temperature_teacher_warmup)
        return teacher_temperature(epoch - self.mask_start_epoch, self.temperature_teacher_warmup,
                                   self.temperature_teacher, self.warmup_epochs_temperature_teacher)

    def on_train_step(self, step: int, total_steps: int, epoch: float) -> None:
        super().on_train_step(step, total_steps, epoch)
        self.current_patch_teacher_temperature = self.patch_teacher_temperature(epoch)

    def schedule_state(self) -> dict[str, float]:
        return {**super().schedule_state(), "teacher_patch_temperature": self.current_patch_teacher_temperature}

    # ---- masking ----------------------------------------------------------------------------------------
    def sample_masks(self, views: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """One mask ``[B, N]`` (bool, True = masked) per view (see the module docstring).

        Seed defaults: ``round(N * mask_ratio)`` patches uniformly at random. With a per-image ratio ``r``
        (``mask_ratio_var`` / ``unmasked_fraction``): ``int(r N)`` random patches (iBOT's ``'rand'``) or BEiT blocks.
        """
        masks = []
        for v in views:
            b, (gh, gw) = v.shape[0], V.grid_shape(self.student.backbone, v)
            if self.current_epoch < self.mask_start_epoch:
                masks.append(torch.zeros(b, gh * gw, dtype=torch.bool, device=v.device))
                continue
            if self.mask_shape == "random" and self.mask_ratio_var == 0 and self.unmasked_fraction == 0:
                masks.append(V.random_masking(b, gh * gw, self.mask_ratio, v.device)[1])
                continue
            ratios = sample_mask_ratios((b,), self.mask_ratio, self.mask_ratio_var, self.unmasked_fraction, v.device)
            if self.mask_shape == "block":
                masks.append(block_masks((gh, gw), ratios, self.mask_aspect_ratio).reshape(b, gh * gw))
            else:
                rank = torch.rand(b, gh * gw, device=v.device).argsort(dim=1).argsort(dim=1)
                masks.append(rank < (ratios * gh * gw).long()[:, None])
        return masks

    # ---- forward ----------------------------------------------------------------------------------------
    def forward(
        self,
        global_views: Sequence[torch.Tensor] | None = None,
        local_views: Sequence[torch.Tensor] | None = None,
        images: torch.Tensor | None = None,
        masks: Sequence[torch.Tensor] | None = None,
    ) -> iBOTOutput:
        """Training: ``global_views`` (>= 2 tensors ``[B, C, H, W]``), optional ``local_views`` (CLS loss only);
        ``masks`` optional (sampled if None). Eval (``images=`` or eval mode): teacher CLS embedding, zero loss.
        """
        if self.is_eval_call(images):
            emb = self.teacher_embedding(images, global_views)
            return iBOTOutput(loss=torch.zeros((), device=emb.device), embedding=emb)
        terms = self.distillation_terms(global_views, local_views, masks)
        loss = terms.loss_cls + self.patch_loss_weight * terms.loss_patch
        return iBOTOutput(**self.output_fields(terms, loss))

    def distillation_terms(
        self,
        global_views: Sequence[torch.Tensor] | None,
        local_views: Sequence[torch.Tensor] | None,
        masks: Sequence[torch.Tensor] | None,
    ) -> DistillationTerms:
        """One training step's CLS and patch losses (unweighted) and what the outputs report (see the module docstring)."""
        if not global_views or len(global_views) < 2:
            raise ValueError(f"{type(self).__name__}.forward in training mode needs at least 2 global_views")
        views, local_views = list(global_views), list(local_views or [])
        n = len(views)
        masks = list(masks) if masks is not None else self.sample_masks(views)
        if len(masks) != n:
            raise ValueError(f"{type(self).__name__}.forward: got {len(masks)} masks for {n} global views")

        x = torch.cat(views, dim=0)
        m = torch.cat([mk.reshape(mk.shape[0], -1) for mk in masks], dim=0)
        rows = m if self.student_head_on_masked_only else None
        s_emb, s_cls, s_patch = self.ts.forward_student(x, m, rows)
        s_local = self.student.cls_logits(torch.cat(local_views, dim=0)) if local_views else None
        t_mean = None
        if self.teacher_prototypes_on_masked_only:
            with torch.no_grad():
                t_emb, t_cls, t_patch, t_mean = self.ts.teacher.forward_patch_rows_and_mean(x, m)
            t_mean = self.patch_center_mean(t_patch, t_mean)
        else:
            t_emb, t_cls, t_patch = self.ts.forward_teacher(x)

        # student CLS views: the globals (view i is teacher view i's crop), then the locals (iBOTLoss's ncrops)
        s_cls_v = list(s_cls.chunk(n)) + (list(s_local.chunk(len(local_views))) if s_local is not None else [])
        t_cls_v, m_v = list(t_cls.chunk(n)), list(m.chunk(n))
        # rows of view v at its masked patches only (the rows of m are ordered view by view)
        per_view = [int(c) for c in m.reshape(n, -1).sum(dim=1).tolist()] if rows is not None or t_mean is not None else []
        s_patch_v = list(s_patch.split(per_view)) if rows is not None else list(s_patch.chunk(n))
        t_patch_v = list(t_patch.split(per_view)) if t_mean is not None else list(t_patch.chunk(n))
        health, loss_cls = self.cls_health_and_loss(s_cls_v, t_cls_v)
        loss_patch = self.patch_loss_fn(s_patch_v, t_patch_v, m_v, self.temperature_student,
                                        self.current_patch_teacher_temperature, student_masked_only=rows is not None,
                                        teacher_mean=t_mean)
        return DistillationTerms(loss_cls=loss_cls, loss_patch=loss_patch, student_embedding=s_emb,
                                 teacher_embedding=t_emb, health=health, masks=m, n_global=n, n_local=len(local_views))

    def cls_health_and_loss(
        self, student_cls: Sequence[torch.Tensor], teacher_cls: Sequence[torch.Tensor]
    ) -> tuple[HealthInputs, torch.Tensor]:
        """The CLS loss over the student views (globals, then locals) and the teacher's global views, and its health
        inputs (the centre as the loss uses it, taken before the loss updates it)."""
        health = self.cls_health(student_cls, teacher_cls, self.cls_loss_fn.center.clone())
        loss = self.cls_loss_fn(student_cls, teacher_cls, self.temperature_student, self.current_teacher_temperature)
        return health, loss

    def patch_center_mean(self, teacher_patch_rows: torch.Tensor, teacher_mean: torch.Tensor) -> torch.Tensor:
        """The mean teacher patch logits ``[K']`` the patch centre moves to: iBOT's, over every patch of every view."""
        return teacher_mean

    def output_fields(self, terms: DistillationTerms, loss: torch.Tensor) -> dict[str, Any]:
        """The :class:`iBOTOutput` fields of a training step with total ``loss``."""
        device, n = loss.device, terms.n_global
        return dict(
            loss=loss,
            embedding=terms.teacher_embedding.chunk(n)[0].detach(),
            health=terms.health,
            loss_cls=terms.loss_cls.detach(),
            loss_patch=terms.loss_patch.detach(),
            teacher_temperature=torch.tensor(self.current_teacher_temperature, device=device),
            teacher_patch_temperature=torch.tensor(self.current_patch_teacher_temperature, device=device),
            ema_momentum=torch.tensor(self.ema_momentum, device=device),
            masks=[mk.bool() for mk in terms.masks.chunk(n)],
            student_views=torch.tensor(float(n + terms.n_local), device=device),
        )
