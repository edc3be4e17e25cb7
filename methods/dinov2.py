"""DINOv2: Learning Robust Visual Features without Supervision (Oquab et al., TMLR 2024, arXiv 2304.07193).

DINO's CLS self-distillation over global + local crops and iBOT's masked patch self-distillation on the global crops
(the iBOT step of :mod:`methods.ibot`, shared, not copied), with the teacher normalised by Sinkhorn-Knopp and a KoLeo
regulariser on the student's CLS tokens, as facebookresearch/dinov2 ``dinov2/train/ssl_meta_arch.py``
(``forward_backward``). With teacher targets ``P_t`` (:func:`methods.losses.sinkhorn_knopp`: 3 iterations over the
step's teacher rows, ``centering="sinkhorn_knopp"``; or DINO's centred softmax, ``centering="centering"``), student
``log P_s = log_softmax(g_s / tau_s)``, ``n_g = 2`` global and ``n_l`` local crops and masks ``m`` on the globals:

    L_dino  = 1 / (n_g (n_g - 1) + n_g n_l) * sum_{t in globals} sum_{s in views, s != t} mean_b H(P_t, P_s)
    L_ibot  = 1 / (n_g B) * sum_{v, b} sum_n m_vbn H(P_t[v, b, n], P_s[v, b, n]) / max(sum_n m_vbn, 1)
    L_koleo = sum_{v in globals} -mean_b log(||x_vb - x_v,nn(b)||_2 + eps),  x = student CLS / ||student CLS||
    L       = w_dino L_dino + w_ibot L_ibot + w_koleo L_koleo        (reference: 1.0, 1.0, 0.1)

(Without local crops the reference divides ``L_dino`` by ``n_g (n_g - 1) + 1``, its ``max(n_l n_g, 1)``; here by
``n_g (n_g - 1)``.) KoLeo runs per global crop (two crops of one image are not each other's neighbours;
``ssl_meta_arch.py`` l. 313-316) on the student's final-norm CLS tokens of the masked global crops. The teacher temperature rises linearly per STEP
from ``temperature_teacher_warmup`` to ``temperature_teacher`` over ``warmup_epochs_temperature_teacher`` epochs
(:func:`methods.schedules.linear_warmup`, DINOv2's ``teacher_temp_schedule``), for both losses; EMA momentum cosine
from ``ema_decay_start`` to ``ema_decay_end``; the prototypes frozen for ``freeze_last_layer_epochs``.

Masks (``collate_data_and_cast``, ``dinov2/data/collate.py``): of the ``n_g B`` global crops of a step,
``int(n_g B * mask_sample_probability)`` are masked, the i-th of them with ``int(N * U(r_i, r_{i+1}))`` patches for
``r = linspace(mask_ratio - mask_ratio_var, mask_ratio + mask_ratio_var, count + 1)`` (reference: ``mask_ratio_min_max
(0.1, 0.5)`` = 0.3 +- 0.2), the rest unmasked, shuffled; each mask BEiT block-wise (:func:`methods.masks.block_masks`,
whose smallest block is iBOT's ``(min(H, W) // 3)^2`` patches where DINOv2's ``MaskingGenerator`` allows 4: the same on
an 8x8 grid, 16 vs 4 on 14x14) or, ``mask_shape="random"``, uniformly random patches. The exported (and evaluated) encoder is the teacher backbone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from methods import constraints as C
from methods import vit as V
from methods.health import HealthInputs
from methods.ibot import iBOT, iBOTOutput
from methods.losses import CENTERINGS, KoLeoLoss
from methods.masks import block_masks
from methods.schedules import linear_warmup


@dataclass
class DINOv2Output(iBOTOutput):
    """:class:`methods.ibot.iBOTOutput` (``loss_cls``: the DINO loss, ``loss_patch``: the iBOT loss, both unweighted)
    plus ``loss_koleo``: the KoLeo term summed over the global crops, unweighted (0 when its weight is 0)."""

    loss_koleo: torch.Tensor | None = None


def _check_dinov2_options(dino_loss_weight: float, koleo_loss_weight: float, centering: str,
                          mask_sample_probability: float, freeze_last_layer_epochs: int) -> None:
    """Raise ``ValueError`` on a loss weight, centring, mask probability or freeze length out of range."""
    if dino_loss_weight < 0 or koleo_loss_weight < 0:
        raise ValueError(f"loss weights must be >= 0, got dino_loss_weight={dino_loss_weight}, "
                         f"koleo_loss_weight={koleo_loss_weight}")
    if centering not in CENTERINGS:
        raise ValueError(f"centering must be one of {CENTERINGS}, got {centering!r}")
    if not 0.0 < mask_sample_probability <= 1.0:
        raise ValueError(f"mask_sample_probability must be in (0, 1], got {mask_sample_probability}")
    if freeze_last_layer_epochs < 0:
        raise ValueError(f"freeze_last_layer_epochs must be >= 0, got {freeze_last_layer_epochs}")


class DINOv2(iBOT):
    """DINOv2 on a timm ViT: iBOT's networks and step (:class:`methods.ibot.iBOT`) with Sinkhorn-Knopp, KoLeo and
    DINOv2's masks and temperature schedule (see the module docstring).

    The seed's arguments (stable-pretraining ``DINOv2``: names, order and defaults):

    :param encoder_name: timm ViT name (default ``"vit_small_patch16_224"``).
    :param projector_hidden_dim: hidden dim of both heads (default 2048).
    :param projector_bottleneck_dim: bottleneck dim (default 256).
    :param n_cls_prototypes: DINO (CLS) prototypes (default 65536).
    :param n_patch_prototypes: iBOT (patch) prototypes (default 8192; the reference configs use 65536 or 131072).
    :param mask_ratio: centre of the per-image mask ratio range (default 0.3: with ``mask_ratio_var`` 0.2, the
        reference's ``mask_ratio_min_max (0.1, 0.5)``).
    :param patch_loss_weight: iBOT loss weight (reference ``ibot.loss_weight``: 1.0).
    :param temperature_student: student temperature (default 0.1).
    :param temperature_teacher: teacher temperature after the warm-up (default 0.07).
    :param ema_decay_start: teacher EMA momentum at step 0 (default 0.996; reference ViT-L/16 config 0.992).
    :param ema_decay_end: teacher EMA momentum at the last step (default 1.0).
    :param image_size: global crop size, timm's ``img_size`` (default 224).
    :param pretrained: load pretrained timm weights.

    Extensions, with the reference's defaults (``dinov2/configs/ssl_default_config.yaml`` and the ViT-L/14 / ViT-g/14
    configs ``vitl14.yaml`` / ``vitg14.yaml`` for ``centering`` and the separate heads, the paper's choice):

    :param encoder_kwargs: extra ``timm.create_model`` kwargs (``patch_size``, ``drop_path_rate``, ``init_values``...).
    :param temperature_teacher_warmup: teacher temperature at step 0 (``warmup_teacher_temp``: 0.04).
    :param warmup_epochs_temperature_teacher: epochs of the per-step linear warm-up (``warmup_teacher_temp_epochs``: 30).
    :param dino_loss_weight: DINO loss weight (``dino.loss_weight``: 1.0).
    :param koleo_loss_weight: KoLeo weight (``dino.koleo_loss_weight``: 0.1; 0 skips it).
    :param centering: ``"sinkhorn_knopp"`` (``train.centering`` of the ViT-L/14 and ViT-g/14 runs) or ``"centering"``
        (DINO/iBOT's EMA centres, momentum 0.9: ``ssl_default_config``, the ImageNet-1k ViT-L/16 run).
    :param head_sharing: ``"none"`` (``ibot.separate_head: true``: a DINO and an iBOT head), ``"all"`` (``false``:
        the DINO head, prototypes included, on the patches too; ``n_patch_prototypes`` must equal
        ``n_cls_prototypes``) or ``"mlp"`` (iBOT's shared MLP, separate prototypes).
    :param norm_last_layer: fix the prototypes' weight-norm gain (default False: DINOv2's ``DINOHead`` trains it).
    :param use_bn_in_head: BatchNorm in the heads' MLPs (default False).
    :param mask_shape: ``"block"`` (``MaskingGenerator``, default) or ``"random"``.
    :param mask_ratio_var: half-width of the mask ratio range (default 0.2).
    :param mask_sample_probability: share of the global crops masked (``ibot.mask_sample_probability``: 0.5).
    :param freeze_last_layer_epochs: epochs with the prototypes frozen (``optim.freeze_last_layer_epochs``: 1).
    """

    method_name = "dinov2"
    constraints = (
        C.InRange("dino_loss_weight", 0.0),
        C.InRange("koleo_loss_weight", 0.0),
        C.OneOf("centering", CENTERINGS),
        C.InRange("mask_sample_probability", 0.0, 1.0, low_open=True),
        C.InRange("freeze_last_layer_epochs", 0, integer=True),
    )

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
        temperature_teacher: float = 0.07,
        ema_decay_start: float = 0.996,
        ema_decay_end: float = 1.0,
        image_size: int = 224,
        pretrained: bool = False,
        encoder_kwargs: dict | None = None,
        temperature_teacher_warmup: float = 0.04,
        warmup_epochs_temperature_teacher: int = 30,
        dino_loss_weight: float = 1.0,
        koleo_loss_weight: float = 0.1,
        centering: str = "sinkhorn_knopp",
        head_sharing: str = "none",
        norm_last_layer: bool = False,
        use_bn_in_head: bool = False,
        mask_shape: str = "block",
        mask_ratio_var: float = 0.2,
        mask_sample_probability: float = 0.5,
        freeze_last_layer_epochs: int = 1,
    ):
        _check_dinov2_options(dino_loss_weight, koleo_loss_weight, centering, mask_sample_probability,
                              freeze_last_layer_epochs)
        super().__init__(
            encoder_name=encoder_name, projector_hidden_dim=projector_hidden_dim,
            projector_bottleneck_dim=projector_bottleneck_dim, n_cls_prototypes=n_cls_prototypes,
            n_patch_prototypes=n_patch_prototypes, mask_ratio=mask_ratio, patch_loss_weight=patch_loss_weight,
            temperature_student=temperature_student, temperature_teacher_warmup=temperature_teacher_warmup,
            temperature_teacher=temperature_teacher, warmup_epochs_temperature_teacher=warmup_epochs_temperature_teacher,
            ema_decay_start=ema_decay_start, ema_decay_end=ema_decay_end, image_size=image_size, pretrained=pretrained,
            encoder_kwargs=encoder_kwargs, norm_last_layer=norm_last_layer, use_bn_in_head=use_bn_in_head,
            mask_shape=mask_shape, mask_ratio_var=mask_ratio_var, head_sharing=head_sharing,
        )
        self._init_losses(self.student, n_cls_prototypes, n_patch_prototypes, centering)  # iBOT's, with the centring
        self.centering = centering
        self.dino_loss_weight = float(dino_loss_weight)
        self.koleo_loss_weight = float(koleo_loss_weight)
        self.koleo_loss = KoLeoLoss()
        self.mask_sample_probability = float(mask_sample_probability)
        self.freeze_last_layer_epochs = int(freeze_last_layer_epochs)

    # ---- schedules --------------------------------------------------------------------------------------
    def on_train_step(self, step: int, total_steps: int, epoch: float) -> None:
        """EMA momentum as iBOT; both teacher temperatures from DINOv2's per-step linear warm-up over
        ``warmup_epochs_temperature_teacher * steps_per_epoch`` steps (``steps_per_epoch = step / epoch``)."""
        super().on_train_step(step, total_steps, epoch)
        w = self.warmup_epochs_temperature_teacher
        warmup_steps = round(w * step / epoch) if epoch > 0 else int(w > 0)  # step 0: the start value
        tau = linear_warmup(step, warmup_steps, self.temperature_teacher_warmup, self.temperature_teacher)
        self.current_teacher_temperature = self.current_patch_teacher_temperature = tau

    # ---- masking ----------------------------------------------------------------------------------------
    def masked_patch_counts(self, n_crops: int, n_patches: int, device: torch.device | str) -> torch.Tensor:
        """Masked patches per global crop ``[n_crops]`` (long), as ``collate_data_and_cast``: stratified ratios over
        ``mask_ratio +- mask_ratio_var`` for ``int(n_crops * mask_sample_probability)`` crops, 0 for the rest, shuffled."""
        n_masked = int(n_crops * self.mask_sample_probability)
        edges = torch.linspace(self.mask_ratio - self.mask_ratio_var, self.mask_ratio + self.mask_ratio_var, n_masked + 1)
        u = torch.rand(n_masked, dtype=torch.float64)
        ratios = edges[:-1].double() + u * (edges[1:] - edges[:-1]).double()
        counts = torch.zeros(n_crops, dtype=torch.long)
        counts[:n_masked] = (n_patches * ratios).long()  # int(N * random.uniform(prob_min, prob_max))
        return counts[torch.randperm(n_crops)].to(device)

    def sample_masks(self, views: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """One mask ``[B, N]`` (bool, True = masked) per global view; the crops of all views drawn together (the
        reference's collated global crops, view by view)."""
        n, b = len(views), views[0].shape[0]
        gh, gw = V.grid_shape(self.student.backbone, views[0])
        counts = self.masked_patch_counts(n * b, gh * gw, views[0].device)
        if self.mask_shape == "block":  # block_masks masks int(ratio * N) patches: ratio = count / N exactly
            masks = block_masks((gh, gw), counts.double() / (gh * gw), self.mask_aspect_ratio).reshape(n * b, -1)
        else:
            rank = torch.rand(n * b, gh * gw, device=counts.device).argsort(dim=1).argsort(dim=1)
            masks = rank < counts[:, None]
        return list(masks.reshape(n, b, gh * gw))

    # ---- losses -----------------------------------------------------------------------------------------
    def cls_health_and_loss(
        self, student_cls: Sequence[torch.Tensor], teacher_cls: Sequence[torch.Tensor]
    ) -> tuple[HealthInputs, torch.Tensor]:
        """The DINO loss; with Sinkhorn-Knopp its health inputs are the targets themselves (log-probabilities at
        temperature 1, no centre), the targets computed once for both."""
        if self.centering != "sinkhorn_knopp":
            return super().cls_health_and_loss(student_cls, teacher_cls)
        probs = self.cls_loss_fn.teacher_probabilities(teacher_cls, self.current_teacher_temperature)
        log_probs = [probs[0].clamp_min(torch.finfo(probs[0].dtype).tiny).log()]
        health = self.cls_health(student_cls, log_probs, None, teacher_temperature=1.0)
        loss = self.cls_loss_fn(student_cls, teacher_cls, self.temperature_student, self.current_teacher_temperature,
                                teacher_probs=probs)
        return health, loss

    def patch_center_mean(self, teacher_patch_rows: torch.Tensor, teacher_mean: torch.Tensor) -> torch.Tensor:
        """DINOv2's patch centre (``centering="centering"``) moves to the teacher's mean over the MASKED patches
        (``ssl_meta_arch.py`` l. 210, ``ibot_patch_loss.py`` l. 136); a step without masked patches leaves it."""
        if teacher_patch_rows.shape[0] == 0:
            return self.patch_loss_fn.center.reshape(-1)
        return teacher_patch_rows.float().mean(dim=0)

    # ---- forward ----------------------------------------------------------------------------------------
    def forward(
        self,
        global_views: Sequence[torch.Tensor] | None = None,
        local_views: Sequence[torch.Tensor] | None = None,
        images: torch.Tensor | None = None,
        masks: Sequence[torch.Tensor] | None = None,
    ) -> DINOv2Output:
        """Training: 2 (or more) ``global_views`` ``[B, C, H, W]``, ``local_views`` (DINO loss only), ``masks``
        optional (sampled if None). Eval (``images=`` or eval mode): teacher CLS embedding ``[B, D]``, zero loss."""
        if self.is_eval_call(images):
            emb = self.teacher_embedding(images, global_views)
            return DINOv2Output(loss=torch.zeros((), device=emb.device), embedding=emb)
        terms = self.distillation_terms(global_views, local_views, masks)
        loss = self.dino_loss_weight * terms.loss_cls + self.patch_loss_weight * terms.loss_patch
        loss_koleo = terms.loss_cls.new_zeros(())
        if self.koleo_loss_weight > 0:
            loss_koleo = sum(self.koleo_loss(e) for e in terms.student_embedding.chunk(terms.n_global))
            loss = loss + self.koleo_loss_weight * loss_koleo
        fields: dict[str, Any] = self.output_fields(terms, loss)
        return DINOv2Output(**fields, loss_koleo=loss_koleo.detach())
