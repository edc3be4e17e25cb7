"""Schedules, the EMA teacher-student wrapper, the DINO head and the distributed centre of the DINO loss."""

from __future__ import annotations

import math
import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from methods.heads import DINOHead, NormalizedLinear, cancel_gradients_last_layer
from methods.losses import DINOLoss, iBOTPatchLoss
from methods.schedules import cosine_ema_momentum, teacher_temperature
from methods.teacher_student import TeacherStudent


def test_cosine_ema_momentum_start_middle_end():
    start, end, total = 0.996, 1.0, 100
    assert cosine_ema_momentum(0, total, start, end) == pytest.approx(start)
    assert cosine_ema_momentum(total // 2, total, start, end) == pytest.approx((start + end) / 2)
    assert cosine_ema_momentum(total, total, start, end) == pytest.approx(end)
    step = 30
    expected = end - (end - start) * (1 + math.cos(math.pi * step / total)) / 2
    assert cosine_ema_momentum(step, total, start, end) == pytest.approx(expected)
    assert cosine_ema_momentum(10 * total, total, start, end) == pytest.approx(end)  # clamped


def test_teacher_temperature_warmup_then_constant():
    """DINO's per-epoch table (tests/test_dino.py checks it against main_dino.py): constant within an epoch,
    the final value from epoch W - 1 on."""
    assert teacher_temperature(0.0, 0.04, 0.07, 30) == pytest.approx(0.04)
    assert teacher_temperature(0.99, 0.04, 0.07, 30) == pytest.approx(0.04)
    assert teacher_temperature(15.0, 0.04, 0.07, 30) == pytest.approx(0.04 + 0.03 * 15 / 29)
    assert teacher_temperature(7.5, 0.04, 0.07, 30) == pytest.approx(0.04 + 0.03 * 7 / 29)
    assert teacher_temperature(29.0, 0.04, 0.07, 30) == pytest.approx(0.07)
    assert teacher_temperature(100.0, 0.04, 0.07, 30) == pytest.approx(0.07)
    assert teacher_temperature(0.0, 0.04, 0.07, 0) == pytest.approx(0.07)
    assert teacher_temperature(0.5, 0.04, 0.07, 1) == pytest.approx(0.04)  # np.linspace(a, b, 1) == [a]
    assert teacher_temperature(1.0, 0.04, 0.07, 1) == pytest.approx(0.07)


def test_teacher_starts_equal_has_no_grad_and_moves_only_by_ema():
    torch.manual_seed(0)
    ts = TeacherStudent(nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 3)), 0.9, 1.0)
    for (ns, ps), (nt, pt) in zip(ts.student.named_parameters(), ts.teacher.named_parameters()):
        assert ns == nt and torch.equal(ps, pt) and ps.data_ptr() != pt.data_ptr()
        assert not pt.requires_grad
    opt = torch.optim.SGD([p for p in ts.parameters() if p.requires_grad], lr=0.5)
    x = torch.randn(5, 4)
    loss = ts.forward_student(x).pow(2).sum() + ts.forward_teacher(x).sum()
    assert not ts.forward_teacher(x).requires_grad
    loss.backward()
    assert all(p.grad is None for p in ts.teacher.parameters())
    old_teacher = [p.detach().clone() for p in ts.teacher.parameters()]
    opt.step()
    # The optimizer step alone leaves the teacher untouched.
    assert all(torch.equal(o, p) for o, p in zip(old_teacher, ts.teacher.parameters()))
    m = ts.momentum_at(3, 10)
    assert m == pytest.approx(1.0 - 0.1 * (1 + math.cos(math.pi * 0.3)) / 2)
    ts.update_teacher(m)
    for o, pt, ps in zip(old_teacher, ts.teacher.parameters(), ts.student.parameters()):
        torch.testing.assert_close(pt, m * o + (1 - m) * ps.detach())
        assert not torch.equal(pt, o)


def test_teacher_stays_in_eval_mode():
    ts = TeacherStudent(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)))
    ts.train()
    assert ts.student.training and not ts.teacher.training


def test_dino_head_shapes_unit_prototypes_and_gradient_cancel():
    torch.manual_seed(0)
    head = DINOHead(16, 50, hidden_dim=32, bottleneck_dim=8)
    mlp_linears = [m for m in head.mlp if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in mlp_linears] == [(16, 32), (32, 32), (32, 8)]
    assert sum(isinstance(m, nn.GELU) for m in head.mlp) == 2
    x = torch.randn(4, 16)
    out = head(x)
    assert out.shape == (4, 50)
    # Logits are cosine similarities between the unit bottleneck and unit prototypes: |logit| <= 1.
    z = nn.functional.normalize(head.mlp(x), dim=-1)
    w = head.last_layer.weight_v / head.last_layer.weight_v.norm(dim=1, keepdim=True)
    torch.testing.assert_close(out, z @ w.T)
    assert out.abs().max() <= 1.0 + 1e-5
    out.sum().backward()
    assert head.last_layer.weight_v.grad is not None
    cancel_gradients_last_layer(head)
    assert head.last_layer.weight_v.grad is None
    assert all(p.grad is not None for p in head.mlp.parameters())


def test_ibot_patch_loss_center_is_mean_over_patches_and_images():
    loss = iBOTPatchLoss(6, center_momentum=0.8)
    t = [torch.randn(3, 5, 6), torch.randn(3, 5, 6)]
    s = [torch.randn(3, 5, 6), torch.randn(3, 5, 6)]
    masks = [torch.ones(3, 5), torch.ones(3, 5)]
    loss(s, t, masks, 0.1, 0.05)
    expected = 0.2 * torch.stack(t).mean(dim=(0, 1, 2))
    torch.testing.assert_close(loss.center.reshape(-1), expected)


# ---- two-process centre synchronisation -----------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _center_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(100 + rank)  # different data on each rank
        loss_fn = DINOLoss(8, center_momentum=0.9)
        teacher = [torch.randn(4, 8) + rank for _ in range(2)]
        student = [torch.randn(4, 8) for _ in range(3)]
        loss_fn(student, teacher, 0.1, 0.04)
        gathered = [torch.zeros_like(loss_fn.center) for _ in range(world)]
        dist.all_gather(gathered, loss_fn.center)
        local_means = [torch.zeros(1, 8) for _ in range(world)]
        dist.all_gather(local_means, torch.cat(teacher).mean(0, keepdim=True))
        if rank == 0:
            torch.save({"centers": gathered, "local_means": local_means}, os.path.join(out_dir, "result.pt"))
    finally:
        dist.destroy_process_group()


def test_center_identical_across_two_gloo_processes():
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_center_worker, args=(2, _free_port(), out_dir), nprocs=2, join=True)
        result = torch.load(os.path.join(out_dir, "result.pt"))
    c0, c1 = result["centers"]
    assert torch.equal(c0, c1)
    m0, m1 = result["local_means"]
    assert not torch.allclose(m0, m1)  # the ranks did see different data
    torch.testing.assert_close(c0, 0.1 * (m0 + m1) / 2)


@pytest.mark.parametrize("learn_gain", [False, True])
@pytest.mark.parametrize("shape", [(7, 16), (3, 5, 16)])
def test_normalized_linear_scales_outputs_as_normalising_the_weight(learn_gain, shape):
    """``(x V^T) * g / ||V||`` with its closed-form backward equals ``F.linear(x, g * V / ||V||)`` (float64, to
    rounding), passes gradcheck, and keeps autocast's dtype."""
    torch.manual_seed(0)
    layer = NormalizedLinear(16, 33, learn_gain=learn_gain).double()
    if learn_gain:
        with torch.no_grad():
            layer.weight_g.uniform_(0.5, 2.0)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    inputs = (x, layer.weight_v) + ((layer.weight_g,) if learn_gain else ())
    y, ref = layer(x), layer.reference_forward(x)
    torch.testing.assert_close(y, ref, atol=1e-13, rtol=0)
    g = torch.randn_like(y)
    for ours, theirs in zip(torch.autograd.grad(y, inputs, g), torch.autograd.grad(ref, inputs, g)):
        torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=0)
    assert torch.autograd.gradcheck(lambda x, *params: layer(x), inputs)
    layer = layer.float()
    xb = x.detach().float().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, ref = layer(xb), layer.reference_forward(xb)
    assert y.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref.float(), atol=2e-2, rtol=2e-2)
    g = torch.randn_like(y)
    ours = torch.autograd.grad(y, (xb, layer.weight_v), g)
    theirs = torch.autograd.grad(ref, (xb, layer.weight_v), g)
    for a, b in zip(ours, theirs):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, atol=5e-2, rtol=5e-2)


def test_norm_last_layer_false_trains_the_weight_norm_gain():
    """DINO's norm_last_layer=False: w_k = g_k v_k / ||v_k|| with g initialised to 1 and trained."""
    torch.manual_seed(0)
    fixed = DINOHead(8, 5, hidden_dim=16, bottleneck_dim=4)
    learn = DINOHead(8, 5, hidden_dim=16, bottleneck_dim=4, norm_last_layer=False)
    assert fixed.last_layer.weight_g is None
    assert torch.equal(learn.last_layer.weight_g, torch.ones(5, 1))
    z = torch.randn(3, 4)
    with torch.no_grad():
        learn.last_layer.weight_g.fill_(2.0)
    v = learn.last_layer.weight_v
    expected = z @ (2.0 * v / v.norm(dim=1, keepdim=True)).T
    assert torch.allclose(learn.last_layer(z), expected, atol=1e-6)
    learn.last_layer(z).sum().backward()
    assert learn.last_layer.weight_g.grad is not None
    cancel_gradients_last_layer(learn)  # the first-epoch freeze covers the gain too
    assert learn.last_layer.weight_g.grad is None and learn.last_layer.weight_v.grad is None


def test_head_batchnorm_removes_the_shared_component_and_teacher_uses_batch_statistics():
    """use_bn (DINO's --use_bn_in_head): inputs that differ only by a tiny amount around a large shared vector
    give head outputs that still differ clearly; the teacher's BN normalises with batch statistics in training."""
    torch.manual_seed(0)
    shared = torch.randn(1, 8) * 10
    x = shared + 0.01 * torch.randn(16, 8)
    plain = DINOHead(8, 32, hidden_dim=16, bottleneck_dim=4)
    bn = DINOHead(8, 32, hidden_dim=16, bottleneck_dim=4, use_bn=True)
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in bn.modules()) == 2  # after both hidden layers
    spread = lambda out: float(out.std(dim=0).mean())  # noqa: E731 - variation across samples
    assert spread(bn(x)) > 10 * spread(plain(x))
    ts = TeacherStudent(DINOHead(8, 32, hidden_dim=16, bottleneck_dim=4, use_bn=True))
    ts.train()
    bns = [m for m in ts.teacher.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert all(m.training for m in bns) and not ts.teacher.training  # the rest of the teacher stays in eval
    ts.eval()
    assert not any(m.training for m in bns)
    patches = torch.randn(2, 5, 8)  # [B, N, D] patch tokens go through the same head
    assert ts.student(patches).shape == (2, 5, 32)
