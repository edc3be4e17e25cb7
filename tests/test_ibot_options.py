"""iBOT's paper options against the reference (bytedance/ibot loader.py ImageFolderMask, models/head.py iBOTHead),
and DINO's student drop-path."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from methods.dino import DINO
from methods.heads import iBOTHead
from methods.ibot import iBOT
from methods.losses import iBOTPatchLoss
from methods.masks import block_masks, sample_mask_ratios
from tests.conftest import layer_norm_reference, randomize_layer_norm_

TINY = {"patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2}


def tiny_ibot(**kw) -> iBOT:
    torch.manual_seed(0)
    args = dict(image_size=32, encoder_kwargs=dict(TINY), n_cls_prototypes=64, n_patch_prototypes=32,
                projector_hidden_dim=32, projector_bottleneck_dim=16)
    args.update(kw)
    return iBOT(**args)


def reference_block_mask(h_grid: int, w_grid: int, pred_ratio: float, log_aspect_ratio, rng: random.Random) -> np.ndarray:
    """ImageFolderMask.__getitem__'s 'block' branch (iBOT, after BEiT's masking_generator), written out."""
    high = pred_ratio * h_grid * w_grid
    mask = np.zeros((h_grid, w_grid), dtype=bool)
    mask_count = 0
    while mask_count < high:
        max_mask_patches = high - mask_count
        delta = 0
        for _ in range(10):
            low = (min(h_grid, w_grid) // 3) ** 2
            target_area = rng.uniform(low, max_mask_patches)
            aspect_ratio = math.exp(rng.uniform(*log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < w_grid and h < h_grid:
                top = rng.randint(0, h_grid - h)
                left = rng.randint(0, w_grid - w)
                num_masked = mask[top : top + h, left : left + w].sum()
                if 0 < h * w - num_masked <= max_mask_patches:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if mask[i, j] == 0:
                                mask[i, j] = 1
                                delta += 1
            if delta > 0:
                break
        if delta == 0:
            break
        mask_count += delta
    return mask


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5])
def test_block_masks_match_the_reference_distribution(ratio):
    n = 1000
    rng = random.Random(0)
    log_ar = (math.log(0.3), math.log(1 / 0.3))
    ref = np.array([reference_block_mask(14, 14, ratio, log_ar, rng).sum() for _ in range(n)])
    ours_masks = block_masks((14, 14), torch.full((n,), ratio), (0.3, 1 / 0.3), generator=torch.Generator().manual_seed(0))
    ours = ours_masks.sum(dim=(1, 2)).numpy()
    assert ours.max() <= ratio * 196 + 1e-9  # never more than the budget, as the reference
    assert abs(ours.mean() - ref.mean()) < 0.02 * ref.mean() + 0.3
    assert abs(ours.std() - ref.std()) < 0.1 * ref.std() + 0.3
    # blocks, not scattered patches: a masked patch mostly has a masked 4-neighbour
    m = ours_masks.numpy()
    neighbours = np.zeros_like(m)
    neighbours[:, 1:] |= m[:, :-1]
    neighbours[:, :-1] |= m[:, 1:]
    neighbours[:, :, 1:] |= m[:, :, :-1]
    neighbours[:, :, :-1] |= m[:, :, 1:]
    assert (neighbours & m).sum() / m.sum() > 0.95


def test_mask_ratios_as_ibot_pred_ratio_0_03_var_0_02():
    r = sample_mask_ratios((20000,), 0.3, 0.2, 0.5, generator=torch.Generator().manual_seed(1))
    zero = r == 0
    assert abs(zero.float().mean() - 0.5) < 0.02
    assert float(r[~zero].min()) >= 0.1 and float(r[~zero].max()) <= 0.5
    assert abs(float(r[~zero].mean()) - 0.3) < 0.01
    assert torch.equal(sample_mask_ratios((5,), 0.3), torch.full((5,), 0.3))


def test_official_masking_in_ibot_and_start_epoch():
    model = tiny_ibot(mask_shape="block", mask_ratio=0.3, mask_ratio_var=0.2, unmasked_fraction=0.5, mask_start_epoch=2)
    views = [torch.randn(64, 3, 32, 32)] * 2
    model.on_train_step(0, 100, 1.5)
    assert not any(m.any() for m in model.sample_masks(views))  # before pred_start_epoch: nothing masked
    model.on_train_step(50, 100, 2.0)
    masks = model.sample_masks(views)
    per_image = torch.cat(masks).sum(dim=1).float() / 16
    assert 0.3 < float((per_image == 0).float().mean()) < 0.7 and float(per_image.max()) <= 0.5
    model.train()
    out = model(global_views=views, masks=masks)
    out.loss.backward()
    assert torch.isfinite(out.loss)


def test_patch_loss_of_unmasked_images_is_zero_as_in_ibot_loss():
    """iBOTLoss: per image sum(ce * m) / max(sum(m), 1), then the mean over images (an unmasked image adds 0)."""
    torch.manual_seed(3)
    s, t = [torch.randn(4, 6, 5)], [torch.randn(4, 6, 5)]
    m = torch.rand(4, 6) < 0.5
    m[0] = False
    m[1, 0] = True
    fn = iBOTPatchLoss(5)
    got = fn(s, t, [m], 0.1, 0.04, update_center=False)
    q = torch.softmax(t[0] / 0.04, dim=-1)
    ce = torch.sum(-q * torch.log_softmax(s[0] / 0.1, dim=-1), dim=-1)
    expected = (torch.sum(ce * m.float(), dim=-1) / m.sum(dim=-1).clamp(min=1.0)).mean()
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("use_bn", [False, True])
def test_shared_mlp_head_equals_ibot_head_formula(use_bn):
    torch.manual_seed(0)
    head = iBOTHead(12, 10, 7, hidden_dim=16, bottleneck_dim=8, use_bn=use_bn)
    cls, patches = torch.randn(3, 12), torch.randn(3, 5, 12)
    c, p = head(cls, patches)
    x = torch.cat([cls[:, None], patches], dim=1)  # iBOTHead.forward: mlp over [CLS; patches], normalise, split
    z = head.mlp(x.reshape(-1, 12)).reshape(3, 6, -1)
    z = z / z.norm(dim=-1, keepdim=True).clamp(min=1e-6)
    w1 = head.last_layer.weight_v / head.last_layer.weight_v.norm(dim=1, keepdim=True)
    w2 = head.last_layer2.weight_v / head.last_layer2.weight_v.norm(dim=1, keepdim=True)
    torch.testing.assert_close(c, z[:, 0] @ w1.T)
    torch.testing.assert_close(p, z[:, 1:] @ w2.T)
    assert c.shape == (3, 10) and p.shape == (3, 5, 7)


def test_head_sharing_options():
    mlp = tiny_ibot(head_sharing="mlp")
    assert mlp.student.cls_head is None and mlp.student.head.last_layer2 is not mlp.student.head.last_layer
    shared = tiny_ibot(head_sharing="all", n_patch_prototypes=64)
    assert shared.student.head.last_layer2 is shared.student.head.last_layer
    assert shared.teacher.head.last_layer2 is shared.teacher.head.last_layer  # the EMA copy shares too
    with pytest.raises(ValueError, match="as many CLS as patch prototypes"):
        tiny_ibot(head_sharing="all")
    with pytest.raises(ValueError, match="head_sharing"):
        tiny_ibot(head_sharing="both")
    # first-epoch freeze drops both prototype layers' gradients
    mlp.train()
    views = [torch.randn(4, 3, 32, 32)] * 2
    mlp(global_views=views).loss.backward()
    mlp.before_optimizer_step(0.5)
    assert mlp.student.head.last_layer.weight_v.grad is None and mlp.student.head.last_layer2.weight_v.grad is None
    assert mlp.student.head.mlp[0].weight.grad is not None


def test_patch_tokens_are_final_norm_tokens_under_avg_pool():
    from methods import vit as V

    model = tiny_ibot(encoder_kwargs={**TINY, "global_pool": "avg"})
    net = model.student
    randomize_layer_norm_(net.backbone.fc_norm)
    seen = {}
    net.patch_head.register_forward_hook(lambda m, a, o: seen.__setitem__("x", a[0].detach()))
    images = torch.randn(2, 3, 32, 32)
    net(images)
    raw = V.run_blocks(net.backbone, V.embed_patches(net.backbone, images))[:, V.num_prefix_tokens(net.backbone) :]
    torch.testing.assert_close(seen["x"], layer_norm_reference(raw, net.backbone.fc_norm))


def test_dino_student_drop_path_teacher_none():
    torch.manual_seed(0)
    model = DINO("vit_tiny_patch16_224", encoder_kwargs={"img_size": 32, "patch_size": 8, "depth": 2, "drop_path_rate": 0.5},
                 n_prototypes=32, projector_hidden_dim=32, projector_bottleneck_dim=16)
    model.train()
    x = torch.randn(4, 3, 32, 32)
    assert not torch.allclose(model.student.backbone(x), model.student.backbone(x))  # stochastic depth on
    torch.testing.assert_close(model.teacher.backbone(x), model.teacher.backbone(x))  # the teacher has none
    assert model.encoder_config()["encoder_kwargs"]["drop_path_rate"] == 0.5


def reference_teacher_temp2_schedule(warmup_teacher_temp2, teacher_temp2, warmup_teacher_temp_epochs, nepochs,
                                     mim_start_epoch):
    """bytedance/ibot main_ibot.py (commit da316d8), ``iBOTLoss.__init__``, lines 503-512, verbatim."""
    return np.concatenate((
        np.linspace(warmup_teacher_temp2,
                    teacher_temp2, warmup_teacher_temp_epochs),
        np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp2
    )) if mim_start_epoch == 0 else np.concatenate((
        np.ones(mim_start_epoch) * warmup_teacher_temp2,
        np.linspace(warmup_teacher_temp2,
                    teacher_temp2, warmup_teacher_temp_epochs),
        np.ones(nepochs - warmup_teacher_temp_epochs - mim_start_epoch) * teacher_temp2
    ))


@pytest.mark.parametrize("start", [0, 5])
def test_patch_temperature_warmup_starts_at_mask_start_epoch_as_ibot(start):
    model = tiny_ibot(mask_start_epoch=start, temperature_teacher_warmup=0.04, temperature_teacher=0.07,
                      warmup_epochs_temperature_teacher=10)
    table = reference_teacher_temp2_schedule(0.04, 0.07, 10, 40, start)
    for epoch in range(40):
        for frac in (0.0, 0.5):  # the reference reads its table at the integer epoch
            model.on_train_step(0, 100, epoch + frac)
            assert model.current_patch_teacher_temperature == pytest.approx(table[epoch], abs=1e-12), epoch
            assert model.schedule_state()["teacher_patch_temperature"] == model.current_patch_teacher_temperature
    model.on_train_step(0, 100, start + 3.0)
    views = [torch.randn(2, 3, 32, 32)] * 2
    out = model.train()(global_views=views)
    assert float(out.teacher_patch_temperature) == pytest.approx(table[start + 3])
    if start:  # the CLS temperature is not delayed
        assert float(out.teacher_temperature) > float(out.teacher_patch_temperature)
