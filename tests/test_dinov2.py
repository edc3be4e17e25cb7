"""DINOv2 (Oquab et al. 2023): Sinkhorn-Knopp, KoLeo and the whole loss against the reference's own lines, masks,
schedules, health inputs, evaluation and export.

The reference functions below are ported from facebookresearch/dinov2 at commit b8931f7 (the files and line numbers
are cited at each); the only changes make them run on tensors in one process: no ``torch.distributed`` calls, no
xFormers (its ``BlockDiagonalMask`` only batches the head over the token groups), no CUDA autocast context.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from methods import get_method_class
from methods.constraints import ConstraintError
from methods.dinov2 import DINOv2, DINOv2Output
from methods.heads import _project
from methods.health import health_metrics
from methods.ibot import iBOT
from methods.losses import DINOLoss, KoLeoLoss, iBOTPatchLoss, sinkhorn_knopp

TINY = {"patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}


def tiny_dinov2(**kw) -> DINOv2:
    torch.manual_seed(0)
    args = dict(image_size=32, encoder_kwargs=dict(TINY), n_cls_prototypes=48, n_patch_prototypes=40,
                projector_hidden_dim=32, projector_bottleneck_dim=16)
    args.update(kw)
    return DINOv2(**args)


# ---- the reference, ported ----------------------------------------------------------------------------------
def ref_sinkhorn_knopp_teacher(teacher_output, teacher_temp, n_iterations=3):
    """dinov2/loss/dino_clstoken_loss.py l. 35-61 (``DINOLoss.sinkhorn_knopp_teacher``), world size 1."""
    teacher_output = teacher_output.float()
    world_size = 1
    Q = torch.exp(teacher_output / teacher_temp).t()  # Q is K-by-B for consistency with notations from our paper
    B = Q.shape[1] * world_size  # number of samples to assign
    K = Q.shape[0]  # how many prototypes
    sum_Q = torch.sum(Q)
    Q /= sum_Q
    for it in range(n_iterations):  # noqa: B007  (verbatim)
        sum_of_rows = torch.sum(Q, dim=1, keepdim=True)
        Q /= sum_of_rows
        Q /= K
        Q /= torch.sum(Q, dim=0, keepdim=True)
        Q /= B
    Q *= B  # the columns must sum to 1 so that Q is an assignment
    return Q.t()


def ref_ibot_sinkhorn_knopp_teacher(teacher_output, teacher_temp, n_masked_patches_tensor, n_iterations=3):
    """dinov2/loss/ibot_patch_loss.py l. 62-90 (``iBOTPatchLoss.sinkhorn_knopp_teacher``), one process."""
    teacher_output = teacher_output.float()
    Q = torch.exp(teacher_output / teacher_temp).t()
    B = n_masked_patches_tensor
    K = Q.shape[0]
    sum_Q = torch.sum(Q)
    Q /= sum_Q
    for it in range(n_iterations):  # noqa: B007  (verbatim)
        sum_of_rows = torch.sum(Q, dim=1, keepdim=True)
        Q /= sum_of_rows
        Q /= K
        Q /= torch.sum(Q, dim=0, keepdim=True)
        Q /= B
    Q *= B
    return Q.t()


class RefKoLeoLoss(nn.Module):
    """dinov2/loss/koleo_loss.py l. 18-48 (the autocast context dropped: float32 inputs)."""

    def __init__(self):
        super().__init__()
        self.pdist = nn.PairwiseDistance(2, eps=1e-8)

    def pairwise_NNs_inner(self, x):
        dots = torch.mm(x, x.t())
        n = x.shape[0]
        dots.view(-1)[:: (n + 1)].fill_(-1)  # Trick to fill diagonal with -1
        _, I = torch.max(dots, dim=1)  # noqa: E741
        return I

    def forward(self, student_output, eps=1e-8):
        student_output = F.normalize(student_output, eps=eps, p=2, dim=-1)
        I = self.pairwise_NNs_inner(student_output)  # noqa: E741
        distances = self.pdist(student_output, student_output[I])  # BxD, BxD -> B
        loss = -torch.log(distances + eps).mean()
        return loss


class RefDINOLoss(nn.Module):
    """dinov2/loss/dino_clstoken_loss.py l. 12-99 (``DINOLoss``: centring, loss, lazy centre update), one process."""

    def __init__(self, out_dim, student_temp=0.1, center_momentum=0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.updated = True

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_output, teacher_temp):
        self.apply_center_update()
        return F.softmax((teacher_output - self.center) / teacher_temp, dim=-1)

    def forward(self, student_output_list, teacher_out_softmaxed_centered_list):
        total_loss = 0
        for s in student_output_list:
            lsm = F.log_softmax(s / self.student_temp, dim=-1)
            for t in teacher_out_softmaxed_centered_list:
                loss = torch.sum(t * lsm, dim=-1)
                total_loss -= loss.mean()
        return total_loss

    @torch.no_grad()
    def update_center(self, teacher_output):
        self.updated = False
        self.len_teacher_output = len(teacher_output)
        self.async_batch_center = torch.sum(teacher_output, dim=0, keepdim=True)

    @torch.no_grad()
    def apply_center_update(self):
        if self.updated is False:
            _t = self.async_batch_center / (self.len_teacher_output * 1)
            self.center = self.center * self.center_momentum + _t * (1 - self.center_momentum)
            self.updated = True


class RefiBOTPatchLoss(RefDINOLoss):
    """dinov2/loss/ibot_patch_loss.py l. 34-151 (``softmax_center_teacher``, ``forward_masked`` with the non-xFormers
    ``lossfunc`` of l. 30-31, ``reduce_center_update``), one process."""

    def __init__(self, patch_out_dim, student_temp=0.1, center_momentum=0.9):
        super().__init__(patch_out_dim, student_temp, center_momentum)
        self.center = torch.zeros(1, 1, patch_out_dim)

    def forward_masked(self, student_patch_tokens_masked, teacher_patch_tokens_masked, student_masks_flat,
                       n_masked_patches=None, masks_weight=None):
        t = teacher_patch_tokens_masked
        s = student_patch_tokens_masked
        loss = torch.sum(t * F.log_softmax(s / self.student_temp, dim=-1), dim=-1)
        if masks_weight is None:
            masks_weight = (
                (1 / student_masks_flat.sum(-1).clamp(min=1.0))
                .unsqueeze(-1)
                .expand_as(student_masks_flat)[student_masks_flat]
            )
        if n_masked_patches is not None:
            loss = loss[:n_masked_patches]
        loss = loss * masks_weight
        return -loss.sum() / student_masks_flat.shape[0]

    @torch.no_grad()
    def update_center(self, teacher_patch_tokens):
        self.updated = False
        self.len_teacher_patch_tokens = self.len_teacher_output = len(teacher_patch_tokens)
        self.async_batch_center = torch.sum(teacher_patch_tokens.mean(1), dim=0, keepdim=True)


def _heads(net, separate: bool):
    """The reference's ``dino_head`` and ``ibot_head`` as the model's modules (the shared head: the DINO head)."""
    if separate:
        return net.cls_head, net.patch_head
    dino_head = lambda x: net.head.last_layer(_project(net.head.mlp, x))  # noqa: E731
    return dino_head, dino_head


def _reference_teacher(model, global_crops, mask_indices_list, n_masked_patches_tensor, teacher_temp, ref_losses, cfg):
    """dinov2/train/ssl_meta_arch.py l. 157-227 (``get_teacher_output``); ``upperbound`` = the masked patches."""
    n_global_crops_teacher, n_masked_patches = 2, mask_indices_list.shape[0]
    with torch.no_grad():
        cls, patches = model.teacher._embedding_and_patches(global_crops, None)  # x_norm_clstoken / x_norm_patchtokens
        dino_head, ibot_head = _heads(model.teacher, cfg["separate_head"])
        teacher_cls_tokens = cls.chunk(n_global_crops_teacher)
        teacher_cls_tokens = torch.cat((teacher_cls_tokens[1], teacher_cls_tokens[0]))
        buffer_tensor_teacher = torch.index_select(patches.flatten(0, 1), dim=0, index=mask_indices_list)
        teacher_cls_tokens_after_head = dino_head(teacher_cls_tokens)
        masked_teacher_patch_tokens_after_head = ibot_head(buffer_tensor_teacher)[:n_masked_patches]
        dino_loss, ibot_patch_loss = ref_losses
        if cfg["centering"] == "centering":
            teacher_dino_softmaxed_centered_list = dino_loss.softmax_center_teacher(
                teacher_cls_tokens_after_head, teacher_temp=teacher_temp
            ).view(n_global_crops_teacher, -1, *teacher_cls_tokens_after_head.shape[1:])
            dino_loss.update_center(teacher_cls_tokens_after_head)
            masked_teacher_patch_tokens_after_head = masked_teacher_patch_tokens_after_head.unsqueeze(0)
            masked_teacher_ibot_softmaxed_centered = ibot_patch_loss.softmax_center_teacher(
                masked_teacher_patch_tokens_after_head[:, :n_masked_patches], teacher_temp=teacher_temp
            )
            masked_teacher_ibot_softmaxed_centered = masked_teacher_ibot_softmaxed_centered.squeeze(0)
            ibot_patch_loss.update_center(masked_teacher_patch_tokens_after_head[:n_masked_patches])
        else:
            teacher_dino_softmaxed_centered_list = ref_sinkhorn_knopp_teacher(
                teacher_cls_tokens_after_head, teacher_temp=teacher_temp
            ).view(n_global_crops_teacher, -1, *teacher_cls_tokens_after_head.shape[1:])
            masked_teacher_ibot_softmaxed_centered = ref_ibot_sinkhorn_knopp_teacher(
                masked_teacher_patch_tokens_after_head, teacher_temp=teacher_temp,
                n_masked_patches_tensor=n_masked_patches_tensor,
            )
    return teacher_dino_softmaxed_centered_list, masked_teacher_ibot_softmaxed_centered


def reference_total_loss(model, global_crops, local_crops, masks, teacher_temp, ref_losses, cfg):
    """dinov2/train/ssl_meta_arch.py l. 133-340 (``forward_backward`` up to the backward), with the collated masks
    of dinov2/data/collate.py l. 36-48; returns the loss the reference back-propagates."""
    n_global_crops, n_local_crops = 2, cfg["n_local_crops"]
    mask_indices_list = masks.flatten().nonzero().flatten()
    n_masked_patches_tensor = torch.full((1,), fill_value=mask_indices_list.shape[0], dtype=torch.long)
    n_masked_patches = mask_indices_list.shape[0]
    masks_weight = (1 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks]
    n_local_crops_loss_terms = max(n_local_crops * n_global_crops, 1)
    n_global_crops_loss_terms = (n_global_crops - 1) * n_global_crops
    ibot_loss_scale = 1.0 / n_global_crops
    teacher_dino_softmaxed_centered_list, masked_teacher_ibot_softmaxed_centered = _reference_teacher(
        model, global_crops, mask_indices_list, n_masked_patches_tensor, teacher_temp, ref_losses, cfg)
    dino_loss, ibot_patch_loss = ref_losses
    loss_accumulator = 0
    student_global_cls_tokens, ibot_student_patch_tokens = model.student._embedding_and_patches(global_crops, masks)
    student_local_cls_tokens, _ = model.student._embedding_and_patches(local_crops, None)
    dino_head, ibot_head = _heads(model.student, cfg["separate_head"])
    buffer_tensor_patch_tokens = torch.index_select(ibot_student_patch_tokens.flatten(0, 1), dim=0, index=mask_indices_list)
    student_local_cls_tokens_after_head = dino_head(student_local_cls_tokens)
    student_global_cls_tokens_after_head = dino_head(student_global_cls_tokens)
    student_global_masked_patch_tokens_after_head = ibot_head(buffer_tensor_patch_tokens)[:n_masked_patches]
    dino_local_crops_loss = dino_loss(
        student_output_list=student_local_cls_tokens_after_head.chunk(n_local_crops),
        teacher_out_softmaxed_centered_list=teacher_dino_softmaxed_centered_list,
    ) / (n_global_crops_loss_terms + n_local_crops_loss_terms)
    loss_accumulator += cfg["dino_loss_weight"] * dino_local_crops_loss
    loss_scales = 2  # this is here since we process global crops together
    dino_global_crops_loss = (
        dino_loss(
            student_output_list=[student_global_cls_tokens_after_head],
            teacher_out_softmaxed_centered_list=[teacher_dino_softmaxed_centered_list.flatten(0, 1)],
        ) * loss_scales / (n_global_crops_loss_terms + n_local_crops_loss_terms)
    )
    loss_accumulator += cfg["dino_loss_weight"] * dino_global_crops_loss
    koleo_loss = cfg["koleo_loss_weight"] * sum(RefKoLeoLoss()(p) for p in student_global_cls_tokens.chunk(2))
    loss_accumulator += koleo_loss
    ibot_patch_loss_value = ibot_patch_loss.forward_masked(
        student_global_masked_patch_tokens_after_head, masked_teacher_ibot_softmaxed_centered,
        student_masks_flat=masks, n_masked_patches=n_masked_patches, masks_weight=masks_weight,
    ) * loss_scales * ibot_loss_scale
    loss_accumulator += cfg["ibot_loss_weight"] * ibot_patch_loss_value
    return loss_accumulator


# ---- tests --------------------------------------------------------------------------------------------------
def test_signature_seed_names_then_reference_defaults():
    seed = {"encoder_name": "vit_small_patch16_224", "projector_hidden_dim": 2048, "projector_bottleneck_dim": 256,
            "n_cls_prototypes": 65536, "n_patch_prototypes": 8192, "mask_ratio": 0.3, "patch_loss_weight": 1.0,
            "temperature_student": 0.1, "temperature_teacher": 0.07, "ema_decay_start": 0.996, "ema_decay_end": 1.0,
            "image_size": 224, "pretrained": False}
    params = inspect.signature(DINOv2.__init__).parameters
    assert list(params)[1 : len(seed) + 1] == list(seed)  # stable-pretraining's order, then the extensions
    assert {k: params[k].default for k in seed} == seed
    assert {k: params[k].default for k in list(params)[len(seed) + 1 :]} == {
        "encoder_kwargs": None, "temperature_teacher_warmup": 0.04, "warmup_epochs_temperature_teacher": 30,
        "dino_loss_weight": 1.0, "koleo_loss_weight": 0.1, "centering": "sinkhorn_knopp", "head_sharing": "none",
        "norm_last_layer": False, "use_bn_in_head": False, "mask_shape": "block", "mask_ratio_var": 0.2,
        "mask_sample_probability": 0.5, "freeze_last_layer_epochs": 1,
    }
    assert get_method_class("dinov2") is DINOv2 and issubclass(DINOv2, iBOT)
    assert set(DINOv2.training_views({"image_size": 32, "multicrop": {"n_local": 2}})) == {"global_views", "local_views"}
    with pytest.raises(ConstraintError, match="centering"):
        DINOv2.check_kwargs({"centering": "softmax"})
    with pytest.raises(ConstraintError, match="mask_sample_probability"):
        DINOv2.check_kwargs({"mask_sample_probability": 0.0})
    with pytest.raises(ValueError, match="koleo_loss_weight"):
        DINOv2(koleo_loss_weight=-1.0)


@pytest.mark.parametrize("rows", [1, 7, 64])
def test_sinkhorn_knopp_equals_the_reference_and_balances_prototypes(rows):
    torch.manual_seed(rows)
    logits = torch.randn(rows, 33) * 0.3
    q = sinkhorn_knopp(logits, 0.05)
    torch.testing.assert_close(q, ref_sinkhorn_knopp_teacher(logits.clone(), 0.05), rtol=0, atol=0)
    n = torch.full((1,), fill_value=rows, dtype=torch.long)
    torch.testing.assert_close(q, ref_ibot_sinkhorn_knopp_teacher(logits.clone(), 0.05, n), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(q.sum(dim=1), torch.ones(rows))  # each row is a distribution
    if rows > 1:  # the last step normalises the rows: prototypes balanced approximately, and better than softmax
        spread = lambda p: float((p.sum(0) / rows - 1 / 33).abs().max())  # noqa: E731
        assert spread(q) < spread(torch.softmax(logits / 0.05, dim=1))


def test_koleo_equals_the_reference_values_and_gradients():
    torch.manual_seed(3)
    x = torch.randn(12, 20, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    loss, ref = KoLeoLoss()(x), RefKoLeoLoss()(x_ref)
    torch.testing.assert_close(loss, ref, rtol=0, atol=0)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=0)
    spread = KoLeoLoss()(torch.eye(12, 20))  # orthonormal rows: every neighbour at sqrt(2)
    torch.testing.assert_close(spread, -torch.log(torch.tensor(2.0).sqrt() + 1e-8))


def test_sinkhorn_losses_keep_their_centres():
    dino, ibot = DINOLoss(8, centering="sinkhorn_knopp"), iBOTPatchLoss(8, centering="sinkhorn_knopp")
    t = [torch.randn(4, 8) for _ in range(2)]
    dino([torch.randn(4, 8) for _ in range(3)], t, 0.1, 0.04)
    ibot([torch.randn(4, 5, 8)], [torch.randn(4, 5, 8)], [torch.rand(4, 5) < 0.5], 0.1, 0.04)
    assert not dino.center.any() and not ibot.center.any()
    with pytest.raises(ValueError, match="centering"):
        DINOLoss(8, centering="sinkhorn")


def _step_inputs(seed: int, n_patches: int = 16):
    g = torch.Generator().manual_seed(seed)
    globals_ = [torch.randn(4, 3, 32, 32, generator=g) for _ in range(2)]
    locals_ = [torch.randn(4, 3, 16, 16, generator=g) for _ in range(3)]
    masks = torch.rand(8, n_patches, generator=g) < 0.4
    masks[0] = False  # an unmasked crop, as half of DINOv2's
    return globals_, locals_, masks


@pytest.mark.parametrize("centering,head_sharing", [("sinkhorn_knopp", "none"), ("centering", "all")])
def test_total_loss_and_gradients_equal_the_reference_step(centering, head_sharing):
    n_proto = {"n_patch_prototypes": 48} if head_sharing == "all" else {}
    model = tiny_dinov2(centering=centering, head_sharing=head_sharing, dino_loss_weight=0.7, patch_loss_weight=1.3,
                        koleo_loss_weight=0.2, **n_proto).train()
    cfg = {"centering": centering, "separate_head": head_sharing == "none", "n_local_crops": 3,
           "dino_loss_weight": 0.7, "ibot_loss_weight": 1.3, "koleo_loss_weight": 0.2}
    ref_losses = (RefDINOLoss(48), RefiBOTPatchLoss(model.patch_loss_fn.center.shape[-1]))
    params = [p for p in model.parameters() if p.requires_grad]
    for step in range(2):  # the second step sees the centres the first one moved
        model.on_train_step(step, 100, step / 10)
        g, loc, m = _step_inputs(step)
        out = model(global_views=g, local_views=loc, masks=list(m.chunk(2)))
        assert isinstance(out, DINOv2Output)
        ours = torch.autograd.grad(out.loss, params)
        ref = reference_total_loss(model, torch.cat(g), torch.cat(loc), m, model.current_teacher_temperature,
                                   ref_losses, cfg)
        torch.testing.assert_close(out.loss, ref, rtol=2e-5, atol=1e-6)
        for a, b in zip(ours, torch.autograd.grad(ref, params, allow_unused=True)):
            torch.testing.assert_close(a, b if b is not None else torch.zeros_like(a), rtol=1e-3, atol=1e-5)
    ref_losses[0].apply_center_update()
    ref_losses[1].apply_center_update()
    torch.testing.assert_close(model.cls_loss_fn.center, ref_losses[0].center, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(model.patch_loss_fn.center, ref_losses[1].center, rtol=1e-5, atol=1e-7)
    assert bool(model.cls_loss_fn.center.any()) == (centering == "centering")


def test_loss_is_the_weighted_sum_of_its_terms_and_koleo_can_be_off():
    g, loc, m = _step_inputs(7)
    out = tiny_dinov2(dino_loss_weight=0.5, patch_loss_weight=2.0, koleo_loss_weight=0.3).train()(
        global_views=g, local_views=loc, masks=list(m.chunk(2)))
    torch.testing.assert_close(out.loss.detach(), 0.5 * out.loss_cls + 2.0 * out.loss_patch + 0.3 * out.loss_koleo)
    assert float(out.loss_koleo) != 0.0
    off = tiny_dinov2(koleo_loss_weight=0.0).train()(global_views=g, local_views=loc, masks=list(m.chunk(2)))
    assert float(off.loss_koleo) == 0.0
    torch.testing.assert_close(off.loss.detach(), off.loss_cls + off.loss_patch)


@pytest.mark.parametrize("mask_shape", ["block", "random"])
def test_masks_follow_the_reference_collate(mask_shape):
    model = tiny_dinov2(mask_shape=mask_shape, image_size=64, mask_sample_probability=0.5)  # 8x8 patches
    torch.manual_seed(1)
    counts = model.masked_patch_counts(24, 64, "cpu")
    n_masked = int(24 * 0.5)
    assert int((counts > 0).sum()) == n_masked
    edges = torch.linspace(0.1, 0.5, n_masked + 1)  # collate.py l. 22-30: one ratio per stratum, int(N * ratio)
    ordered = counts.sort().values[-n_masked:]
    assert ((ordered >= (64 * edges[:-1]).long()) & (ordered <= (64 * edges[1:]).long())).all()
    masks = model.sample_masks([torch.zeros(12, 3, 64, 64), torch.zeros(12, 3, 64, 64)])
    assert len(masks) == 2 and all(mk.shape == (12, 64) and mk.dtype == torch.bool for mk in masks)
    sums = torch.cat(masks).sum(dim=1)
    assert int((sums > 0).sum()) <= n_masked and int((sums > 0).sum()) >= n_masked - 2  # blocks may fall short
    assert int(sums.max()) <= 32 and int((sums == 0).sum()) >= 12
    if mask_shape == "random":
        assert int((sums > 0).sum()) == n_masked


def test_teacher_temperature_warms_up_per_step_as_the_reference_schedule():
    model = tiny_dinov2(temperature_teacher_warmup=0.04, temperature_teacher=0.07, warmup_epochs_temperature_teacher=3)
    steps_per_epoch = 10  # dinov2/utils/utils.py CosineScheduler(0.07, 0.07, 30, warmup_iters=30, start_warmup_value=0.04)
    expected = np.concatenate([np.linspace(0.04, 0.07, 30), np.full(10, 0.07)])
    for step in range(40):
        model.on_train_step(step, 40, step / steps_per_epoch)
        assert model.current_teacher_temperature == pytest.approx(expected[step], abs=1e-12)
        assert model.current_patch_teacher_temperature == model.current_teacher_temperature
    assert model.schedule_state()["teacher_temperature"] == pytest.approx(0.07)


def test_health_inputs_are_the_sinkhorn_targets():
    model = tiny_dinov2().train()
    g, loc, m = _step_inputs(2)
    out = model(global_views=g, local_views=loc, masks=list(m.chunk(2)))
    metrics = health_metrics(out.health, DINOv2.health_metrics)
    assert {"teacher_entropy", "student_teacher_kl"} <= set(metrics)
    with torch.no_grad():
        _, t_cls, _ = model.teacher(torch.cat(g))
    q = ref_sinkhorn_knopp_teacher(t_cls, model.current_teacher_temperature)[:4]
    entropy = -(q * q.clamp_min(1e-30).log()).sum(-1).mean() / np.log(48)
    torch.testing.assert_close(metrics["teacher_entropy"], entropy, rtol=1e-4, atol=1e-6)
    assert all(torch.isfinite(v) for v in metrics.values())


def test_eval_embedding_export_and_last_layer_freeze():
    model = tiny_dinov2(freeze_last_layer_epochs=2).train()
    g, loc, m = _step_inputs(4)
    model(global_views=g, local_views=loc, masks=list(m.chunk(2))).loss.backward()
    model.before_optimizer_step(1.5)  # inside the 2 frozen epochs
    assert all(p.grad is None for n, p in model.student.named_parameters() if ".last_layer" in n)
    assert model.student.backbone.patch_embed.proj.weight.grad is not None
    x = torch.randn(5, 3, 32, 32)
    out = model(images=x)
    assert out.embedding.shape == (5, 32) and float(out.loss) == 0.0
    torch.testing.assert_close(out.embedding, model.teacher.backbone(x))
    assert model.export_encoder() is model.teacher.backbone
    assert model.encoder_config()["encoder_kwargs"]["patch_size"] == 8
