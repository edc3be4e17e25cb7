"""BYOL (methods/byol.py): the loss against the official reference's lines, the target network (no gradient, EMA
after each optimizer step, cosine momentum), the evaluation embedding and export, the ResNet path, the constraints."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from methods.base import SSLMethod
from methods.byol import BYOL, byol_loss
from methods.constraints import ConstraintError

VIT = dict(encoder_name="vit_tiny_patch16_224",
           encoder_kwargs=dict(img_size=32, patch_size=8, embed_dim=48, num_heads=3, depth=2))
SMALL_HEADS = dict(projector_dims=(64, 32), predictor_dims=(64, 32))


# ---- the reference, ported from JAX to torch (jnp -> torch, jax.lax.rsqrt -> torch.rsqrt, stop_gradient -> detach) ----
# google-deepmind/deepmind-research @ f5de0ede8430809180254ee957abf36ed62579ef, byol/utils/helpers.py lines 74-82
def _ref_l2_normalize(x, axis=None, epsilon=1e-12):
    square_sum = torch.sum(torch.square(x), dim=axis, keepdim=True)
    x_inv_norm = torch.rsqrt(torch.clamp_min(square_sum, epsilon))
    return x * x_inv_norm


# byol/utils/helpers.py lines 109-112
def _ref_regression_loss(x, y):
    normed_x, normed_y = _ref_l2_normalize(x, axis=-1), _ref_l2_normalize(y, axis=-1)
    return torch.sum((normed_x - normed_y) ** 2, dim=-1)


# byol/byol_experiment.py lines 243-250 (online_network_out / target_network_out as the four tensors)
def _ref_repr_loss(prediction_view1, prediction_view2, projection_view1, projection_view2):
    repr_loss = _ref_regression_loss(prediction_view1, projection_view2.detach())
    repr_loss = repr_loss + _ref_regression_loss(prediction_view2, projection_view1.detach())
    return torch.mean(repr_loss)


# byol/utils/schedules.py lines 20-23 (target_ema) and 46-53 (_cosine_decay)
def _ref_target_ema(global_step, base_ema, max_steps):
    global_step = min(global_step, max_steps)
    decay = 1.0 * 0.5 * (1 + math.cos(math.pi * global_step / max_steps))
    return 1.0 - (1.0 - base_ema) * decay


def _views(batch: int = 6, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, 3, size, size, generator=g), torch.randn(batch, 3, size, size, generator=g)


def _online(model: BYOL) -> list[torch.Tensor]:
    return [*model.backbone.student.parameters(), *model.projector.student.parameters()]


def _target(model: BYOL) -> list[torch.Tensor]:
    return [*model.backbone.teacher.parameters(), *model.projector.teacher.parameters()]


def _vit_byol(**kwargs) -> BYOL:
    torch.manual_seed(0)
    return BYOL(**{**VIT, **SMALL_HEADS, **kwargs})


def test_loss_equals_reference_on_identical_inputs():
    g = torch.Generator().manual_seed(0)
    p1, p2, z1, z2 = (torch.randn(9, 16, generator=g, dtype=torch.float64) * 3 for _ in range(4))
    p1[0] = 0.0  # a zero vector and one below the reference's epsilon: the same clamp
    z2[1] = 1e-9 * z2[1]
    assert torch.allclose(byol_loss(p1, p2, z1, z2).double(), _ref_repr_loss(p1, p2, z1, z2), atol=1e-6)
    same = byol_loss(p1, p2, p2, p1)  # identical directions: 0; opposite: 4 per term
    assert same.item() == pytest.approx(0.0, abs=1e-6)
    assert byol_loss(p1[2:], p2[2:], -p2[2:], -p1[2:]).item() == pytest.approx(8.0, abs=1e-5)


def test_model_loss_equals_reference_on_its_own_networks():
    model = _vit_byol().train()
    v1, v2 = _views()
    out = model(view1=v1, view2=v2)
    with torch.no_grad():  # the online and target networks recomputed outside forward (BatchNorm: batch statistics)
        f, g = model.backbone, model.projector
        s1, s2 = g.student(f.student(v1)), g.student(f.student(v2))
        t1, t2 = g.teacher(f.teacher(v1)), g.teacher(f.teacher(v2))
        expected = _ref_repr_loss(model.predictor(s1), model.predictor(s2), t1, t2)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert out.prediction.shape == (12, 32) and out.target.shape == (12, 32) and out.embedding.shape == (6, 48)
    assert torch.allclose(out.target, torch.cat([t1, t2]), atol=1e-6)


def test_target_gets_no_gradient_and_follows_ema_after_optimizer_step():
    model = _vit_byol(ema_decay_start=0.9).train()
    with torch.no_grad():  # make online and target differ, so that the EMA is visible
        for p in _online(model):
            p.add_(0.01 * torch.randn_like(p))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.on_train_step(3, 10, 0.3)
    tau = model.ema_momentum
    assert tau == pytest.approx(_ref_target_ema(3, 0.9, 10))
    model(view1=_views()[0], view2=_views()[1]).loss.backward()
    assert all(not p.requires_grad and p.grad is None for p in _target(model))
    grads = [p.grad for p in [*_online(model), *model.predictor.parameters()]]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    old_target = [p.detach().clone() for p in _target(model)]
    opt.step()
    model.after_optimizer_step()
    for old, t, s in zip(old_target, _target(model), _online(model)):
        # the reference's update, byol/byol_experiment.py line 342: x + (1 - tau) * (y - x)
        assert torch.allclose(t, old + (1 - tau) * (s.detach() - old), atol=1e-6)
    for ts in (model.backbone, model.projector):
        for tb, sb in zip(ts.teacher.buffers(), ts.student.buffers()):
            assert torch.equal(tb, sb)  # BatchNorm running statistics copied


def test_momentum_schedule_start_middle_end():
    model = _vit_byol(ema_decay_start=0.996, ema_decay_end=1.0)
    total = 1000
    for step, value in ((0, 0.996), (total // 2, 0.998), (total, 1.0), (137, None)):
        model.on_train_step(step, total, step / 10)
        expected = _ref_target_ema(step, 0.996, total)
        assert model.schedule_state()["ema_momentum"] == pytest.approx(expected, abs=1e-12)
        if value is not None:
            assert model.ema_momentum == pytest.approx(value, abs=1e-12)


def test_eval_embedding_is_the_online_backbone_and_exports():
    model = _vit_byol()
    with torch.no_grad():
        for p in model.backbone.student.parameters():
            p.add_(0.05)
    model.eval()
    x = _views(batch=5)[0]
    out = model(images=x)
    assert out.embedding.shape == (5, 48) and out.loss.item() == 0.0 and out.prediction is None
    assert torch.equal(model(view1=x).embedding, out.embedding)  # eval mode: view1 alone is an image batch too
    with torch.no_grad():
        assert torch.allclose(out.embedding, model.backbone.student(x))
        assert not torch.allclose(out.embedding, model.backbone.teacher(x))
    assert model.export_encoder() is model.backbone.student
    encoder, shape = SSLMethod.embedding_encoder(model.encoder_config(), model.encoder_state_dict())
    assert shape == (3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(encoder.eval()(x), out.embedding, atol=1e-6)


def test_resnet_low_resolution_two_optimizer_steps():
    torch.manual_seed(0)
    model = BYOL(encoder_name="resnet18", low_resolution=True, ema_decay_start=0.5, **SMALL_HEADS).train()
    assert model.backbone.student.conv1.stride == (1, 1) and model.embed_dim == 512
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    start = copy.deepcopy(model.state_dict())
    expected_target = [p.detach().clone() for p in _target(model)]
    for step in range(2):
        model.on_train_step(step, 4, step / 2)
        v1, v2 = _views(batch=2)
        loss = model(view1=v1, view2=v2).loss
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.after_optimizer_step()
        tau = model.ema_momentum
        online = _online(model)
        expected_target = [tau * t + (1 - tau) * s.detach() for t, s in zip(expected_target, online)]
    for t, e in zip(_target(model), expected_target):
        assert torch.allclose(t, e, atol=1e-6)
    end = model.state_dict()
    for prefix in ("backbone.student.", "projector.student.", "predictor.", "backbone.teacher.", "projector.teacher."):
        assert any(not torch.equal(start[k], end[k]) for k in start if k.startswith(prefix)), prefix
    model.eval()
    assert model(images=v1).embedding.shape == (2, 512)


def test_constraints_refuse_bad_arguments():
    with pytest.raises(ConstraintError, match="method.predictor_dims"):
        BYOL.check_kwargs({"projector_dims": [64, 32], "predictor_dims": [64, 16]}, prefix="method.")
    with pytest.raises(ConstraintError, match="projector_dims"):
        BYOL(projector_dims=(64, 32, 16), predictor_dims=(64, 16))
    with pytest.raises(ConstraintError, match="ema_decay_end"):
        BYOL.check_kwargs({"ema_decay_start": 0.99, "ema_decay_end": 0.9})
    with pytest.raises(ConstraintError, match="encoder_name"):
        BYOL.check_kwargs({"encoder_name": "convnext_tiny"})
    BYOL.check_kwargs({"encoder_name": "resnet50", "projector_dims": [4096, 256], "predictor_dims": [4096, 256]})


def test_training_views_are_byols_asymmetric_pair():
    views = BYOL.training_views({"image_size": 32, "augment": {"crop_scale": [0.5, 1.0]}})
    assert set(views) == {"view1", "view2"} and all(g.single for g in views.values())
    first, second = views["view1"].recipes[0], views["view2"].recipes[0]
    assert (first.blur_p, first.solarize_p, second.blur_p, second.solarize_p) == (1.0, 0.0, 0.1, 0.2)
    assert first.scale == (0.5, 1.0) and first.size == 32
    digits = BYOL.training_views({"image_size": 32, "multicrop": {"hflip_p": 0.0, "solarize_p": 0.0}})
    assert {(g.recipes[0].hflip_p, g.recipes[0].solarize_p) for g in digits.values()} == {(0.0, 0.0)}
