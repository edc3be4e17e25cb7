"""DINO (Caron et al. 2021): loss formula, centring, schedules, multi-crop routing, EMA, last-layer freeze."""

from __future__ import annotations

import inspect

import pytest
import torch

from methods import build_method, get_method_class
from methods.dino import DINO, DINOOutput
from methods.losses import DINOLoss
from methods.vit import create_vit

TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2}


def tiny_dino(**kw) -> DINO:
    torch.manual_seed(0)
    args = dict(
        encoder_kwargs=dict(TINY), n_prototypes=64, projector_hidden_dim=32, projector_bottleneck_dim=16
    )
    args.update(kw)
    return DINO(**args)


def views(b: int = 2, n_local: int = 3, g: int = 32, loc: int = 16):
    return [torch.randn(b, 3, g, g) for _ in range(2)], [torch.randn(b, 3, loc, loc) for _ in range(n_local)]


def test_signature_matches_seed():
    expected = {
        "encoder_name": "vit_small_patch16_224",
        "projector_hidden_dim": 2048,
        "projector_bottleneck_dim": 256,
        "n_prototypes": 65536,
        "temperature_student": 0.1,
        "temperature_teacher_warmup": 0.04,
        "temperature_teacher": 0.07,
        "warmup_epochs_temperature_teacher": 30,
        "center_momentum": 0.9,
        "ema_decay_start": 0.996,
        "ema_decay_end": 1.0,
        "encoder_kwargs": None,
        "pretrained": False,
    }
    params = inspect.signature(DINO.__init__).parameters
    assert list(params)[1 : len(expected) + 1] == list(expected)  # the seed's order, then extensions
    assert {k: params[k].default for k in list(params)[len(expected) + 1 :]} == {"norm_last_layer": True, "use_bn_in_head": False,
                                                                                  "pos_embed_antialias": False}
    assert {k: params[k].default for k in expected} == expected
    assert list(inspect.signature(DINO.forward).parameters)[1:] == ["global_views", "local_views", "images"]
    assert get_method_class("dino") is DINO and set(DINO.training_views({"image_size": 32, "multicrop": {"n_local": 2}})) == {"global_views", "local_views"}


def _direct_dino_loss(student, teacher, center, ts, tt, skip_same=True):
    total, n = 0.0, 0
    for i, t in enumerate(teacher):
        q = torch.exp((t.double() - center.double()) / tt)
        q = q / q.sum(dim=1, keepdim=True)
        for j, s in enumerate(student):
            if skip_same and i == j:
                continue
            z = s.double() / ts
            logp = z - torch.log(torch.exp(z).sum(dim=1, keepdim=True))
            total += float((-(q * logp).sum(dim=1)).mean())
            n += 1
    return total / n


def test_dino_loss_equals_direct_formula_and_center_update():
    torch.manual_seed(1)
    k, b = 10, 4
    loss_fn = DINOLoss(k, center_momentum=0.9)
    loss_fn.center.copy_(torch.randn(1, k) * 0.3)
    center0 = loss_fn.center.clone()
    student = [torch.randn(b, k) for _ in range(5)]  # 2 global + 3 local
    teacher = [torch.randn(b, k) for _ in range(2)]
    loss = loss_fn(student, teacher, 0.1, 0.05)
    assert float(loss) == pytest.approx(_direct_dino_loss(student, teacher, center0, 0.1, 0.05), rel=1e-5)
    # 2 teacher views x 5 student views minus the 2 same-view pairs = 8 pairs (counting them would differ).
    all_pairs = _direct_dino_loss(student, teacher, center0, 0.1, 0.05, skip_same=False)
    assert float(loss) != pytest.approx(all_pairs, rel=1e-5)
    expected_center = 0.9 * center0 + 0.1 * torch.cat(teacher).mean(dim=0, keepdim=True)
    torch.testing.assert_close(loss_fn.center, expected_center)
    # update_center=False leaves it alone.
    loss_fn(student, teacher, 0.1, 0.05, update_center=False)
    torch.testing.assert_close(loss_fn.center, expected_center)


def test_dino_loss_skips_same_view_pairs():
    k = 6
    t = torch.randn(3, k)
    # Student view 0 identical to teacher view 0, student view 1 very different: only the (s1, t0) and
    # (s0, t1) pairs count.
    s = [t.clone(), torch.randn(3, k) * 5]
    teacher = [t, torch.randn(3, k)]
    loss = DINOLoss(k)(s, teacher, 0.1, 0.04)
    assert float(loss) == pytest.approx(_direct_dino_loss(s, teacher, torch.zeros(1, k), 0.1, 0.04), rel=1e-5)


def test_schedules_set_by_on_train_step():
    model = tiny_dino(warmup_epochs_temperature_teacher=10, ema_decay_start=0.99, ema_decay_end=1.0)
    model.on_train_step(0, 100, 0.0)
    assert model.current_teacher_temperature == pytest.approx(0.04)
    assert model.ema_momentum == pytest.approx(0.99)
    model.on_train_step(50, 100, 5.5)  # DINO's table at epoch 5 of a 10-epoch warm-up: linspace(0.04, 0.07, 10)[5]
    assert model.current_teacher_temperature == pytest.approx(0.04 + 0.03 * 5 / 9)
    assert model.ema_momentum == pytest.approx(0.995)
    model.on_train_step(100, 100, 12.5)
    assert model.current_teacher_temperature == pytest.approx(0.07)
    assert model.ema_momentum == pytest.approx(1.0)
    assert model.schedule_state() == {
        "teacher_temperature": pytest.approx(0.07),
        "ema_momentum": pytest.approx(1.0),
    }
    model.train()
    g, loc = views()
    out = model(global_views=g, local_views=loc)
    assert float(out.teacher_temperature) == pytest.approx(0.07)


def test_multicrop_student_sees_all_views_teacher_only_globals():
    model = tiny_dino().train()
    seen = {"student": [], "teacher": []}
    model.student.backbone.patch_embed.register_forward_pre_hook(lambda m, a: seen["student"].append(tuple(a[0].shape)))
    model.teacher.backbone.patch_embed.register_forward_pre_hook(lambda m, a: seen["teacher"].append(tuple(a[0].shape)))
    b, n_local = 2, 4
    g, loc = views(b, n_local, 32, 16)
    model(global_views=g, local_views=loc)
    student_views = sum(s[0] for s in seen["student"]) // b
    assert student_views == 2 + n_local
    assert sorted(seen["student"]) == sorted([(2 * b, 3, 32, 32), (n_local * b, 3, 16, 16)])
    assert seen["teacher"] == [(2 * b, 3, 32, 32)]


def test_training_step_backward_ema_and_last_layer_freeze():
    model = tiny_dino().train()
    for ps, pt in zip(model.student.parameters(), model.teacher.parameters()):
        assert torch.equal(ps, pt) and not pt.requires_grad
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    last = model.student.head.last_layer.weight_v
    mlp_w = model.student.head.mlp[0].weight

    def step(epoch: float, step_idx: int):
        model.on_train_step(step_idx, 10, epoch)
        g, loc = views()
        out = model(global_views=g, local_views=loc)
        assert isinstance(out, DINOOutput) and out.loss.ndim == 0 and torch.isfinite(out.loss)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        assert all(p.grad is None for p in model.teacher.parameters())
        assert last.grad is not None
        model.before_optimizer_step(epoch)
        old_teacher = [p.detach().clone() for p in model.teacher.parameters()]
        opt.step()
        model.after_optimizer_step()
        m = model.ema_momentum
        for o, pt, ps in zip(old_teacher, model.teacher.parameters(), model.student.parameters()):
            torch.testing.assert_close(pt, m * o + (1 - m) * ps.detach())

    last0, mlp0 = last.detach().clone(), mlp_w.detach().clone()
    step(0.5, 0)  # epoch 0: the prototypes are frozen, the rest trains
    assert torch.equal(last, last0)
    assert not torch.equal(mlp_w, mlp0)
    step(1.0, 5)  # epoch 1: the prototypes train
    assert not torch.equal(last, last0)


def test_eval_returns_teacher_embedding_and_zero_loss():
    model = tiny_dino()
    with torch.no_grad():  # make teacher and student differ so we can tell which one is used
        for p in model.student.parameters():
            p.add_(0.1)
    x = torch.randn(3, 3, 32, 32)
    out = model.train()(images=x)
    assert out.embedding.shape == (3, 64) and float(out.loss) == 0.0
    torch.testing.assert_close(out.embedding, model.teacher.backbone(x))
    model.eval()
    assert torch.equal(model(images=x).embedding, out.embedding)
    assert torch.equal(model.embed(x), out.embedding)


def test_export_and_rebuild_encoder():
    from methods.vit import create_vit

    model = build_method(
        "dino",
        encoder_kwargs=dict(TINY),
        n_prototypes=32,
        projector_hidden_dim=16,
        projector_bottleneck_dim=8,
    )
    cfg = model.encoder_config()
    assert (
        cfg["encoder_name"] == "vit_small_patch16_224" and cfg["encoder_kwargs"]["dynamic_img_size"] is True
    )
    rebuilt = create_vit(cfg["encoder_name"], cfg["encoder_kwargs"])
    rebuilt.load_state_dict(model.encoder_state_dict())
    assert model.export_encoder() is model.teacher.backbone
    x = torch.randn(1, 3, 16, 16)  # a local-crop size works thanks to dynamic_img_size
    torch.testing.assert_close(rebuilt(x), model.export_encoder()(x))


@pytest.mark.parametrize("size", [32, 16])
def test_cls_embedding_equals_the_full_forward_values_and_gradients(size):
    """The last block computed for the CLS row only gives the ViT's pooled output and the same gradients (float64:
    equal to rounding); models it does not cover (mean pooling) run their own forward."""
    from methods.vit import _cls_row_supported, cls_embedding

    torch.manual_seed(0)
    vit = create_vit("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 4, "depth": 3, "qkv_bias": True,
                                               "dynamic_img_size": True}).double()  # fmt: skip
    assert _cls_row_supported(vit)
    x = torch.randn(3, 3, size, size, dtype=torch.float64)
    full, cls_only = vit(x), cls_embedding(vit, x, antialias=True)  # timm's own resampling, as vit(x)
    torch.testing.assert_close(cls_only, full, atol=1e-12, rtol=0)
    params = list(vit.parameters())
    g_full = torch.autograd.grad(full.square().sum(), params)
    g_cls = torch.autograd.grad(cls_only.square().sum(), params)
    for a, b in zip(g_full, g_cls):
        torch.testing.assert_close(b, a, atol=1e-12, rtol=1e-9)
    pooled = create_vit("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 4, "depth": 1, "global_pool": "avg",
                                                 "dynamic_img_size": True})  # fmt: skip
    assert not _cls_row_supported(pooled)
    torch.testing.assert_close(cls_embedding(pooled, x.float(), antialias=True), pooled(x.float()), atol=0, rtol=0)


@pytest.mark.parametrize(("warmup_epochs", "nepochs"), [(30, 100), (10, 12), (1, 5), (0, 4)])
def test_teacher_temperature_is_dinos_per_epoch_table(warmup_epochs, nepochs):
    """facebookresearch/dino main_dino.py:374-378 (``DINOLoss.__init__``) builds the table, line 388 reads it at the
    integer epoch; every step of epoch ``e`` (fractional epochs ``e + j / spe``) must use that value."""
    import numpy as np

    warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs = 0.04, 0.07, warmup_epochs
    teacher_temp_schedule = np.concatenate((
        np.linspace(warmup_teacher_temp,
                    teacher_temp, warmup_teacher_temp_epochs),
        np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp
    ))
    model = tiny_dino(warmup_epochs_temperature_teacher=warmup_epochs)
    spe = 4
    for epoch in range(nepochs):
        for j in range(spe):
            model.on_train_step(epoch * spe + j, nepochs * spe, epoch + j / spe)
            assert model.current_teacher_temperature == pytest.approx(teacher_temp_schedule[epoch], rel=1e-12, abs=0)


def dino_interpolate_pos_encoding(pos_embed, patch_size, x, w, h):
    """facebookresearch/dino vision_transformer.py:174-194 ``VisionTransformer.interpolate_pos_encoding``, ported
    (``self.pos_embed`` / ``self.patch_embed.patch_size`` as arguments)."""
    import math

    from torch import nn

    npatch = x.shape[1] - 1
    N = pos_embed.shape[1] - 1
    if npatch == N and w == h:
        return pos_embed
    class_pos_embed = pos_embed[:, 0]
    patch_pos_embed = pos_embed[:, 1:]
    dim = x.shape[-1]
    w0 = w // patch_size
    h0 = h // patch_size
    # we add a small number to avoid floating point error in the interpolation
    # see discussion at https://github.com/facebookresearch/dino/issues/8
    w0, h0 = w0 + 0.1, h0 + 0.1
    patch_pos_embed = nn.functional.interpolate(
        patch_pos_embed.reshape(1, int(math.sqrt(N)), int(math.sqrt(N)), dim).permute(0, 3, 1, 2),
        scale_factor=(w0 / math.sqrt(N), h0 / math.sqrt(N)),
        mode='bicubic',
    )
    assert int(w0) == patch_pos_embed.shape[-2] and int(h0) == patch_pos_embed.shape[-1]
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)


@pytest.mark.parametrize("size", [96, 112, 224])
def test_local_crop_positions_are_dinos_plain_bicubic(size):
    """DINO's default: the tokens entering the blocks for a local crop equal ``prepare_tokens`` (vision_transformer.py
    197-207: CLS concatenated, then ``x + interpolate_pos_encoding(x, w, h)``); timm's antialiased resampling
    (``pos_embed_antialias=True``) differs when shrinking 14x14 to 6x6 or 7x7."""
    from methods.vit import add_pos_embed

    torch.manual_seed(0)
    vit = create_vit("vit_tiny_patch16_224", {"dynamic_img_size": True, "depth": 1})
    with torch.no_grad():
        vit.pos_embed.normal_()
    images = torch.randn(2, 3, size, size)
    patches = vit.patch_embed(images)  # [B, H, W, D]
    flat = patches.reshape(2, -1, patches.shape[-1])
    x = torch.cat((vit.cls_token.expand(2, -1, -1), flat), dim=1)
    expected = x + dino_interpolate_pos_encoding(vit.pos_embed, 16, x, size, size)
    ours = add_pos_embed(vit, patches)
    torch.testing.assert_close(ours, expected, atol=0, rtol=0)
    timm_tokens = add_pos_embed(vit, patches, antialias=True)
    if size < 224:
        assert (timm_tokens - expected).abs().max() > 1e-3
    model = tiny_dino(pos_embed_antialias=True)
    assert model.student.pos_embed_antialias and model.teacher.pos_embed_antialias
