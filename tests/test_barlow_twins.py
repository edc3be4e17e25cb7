"""Barlow Twins (Zbontar et al. 2021): the loss against the reference code (one process and two gloo processes), the
projector and its normalising BatchNorm, gradients, views, evaluation, export and a ResNet backbone."""

from __future__ import annotations

import inspect
import os
import socket
import tempfile
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from methods import get_method_class
from methods.barlow_twins import BarlowTwins, BarlowTwinsOutput
from methods.constraints import ConstraintError
from methods.redundancy import barlow_twins_loss, cross_correlation, redundancy_projector

TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 1, "num_heads": 2}


# ---- the reference, ported verbatim ----------------------------------------------------------------------------
# facebookresearch/barlowtwins @ 8e8d284ca0bc02f88b92328e53f9b901e86b4a3c, main.py: BarlowTwins.forward lines
# 211-221 (after the projector of lines 208-209: z1, z2 are the projections; self.bn is line 205's
# nn.BatchNorm1d(sizes[-1], affine=False), passed as ``bn``; self.args -> args), off_diagonal lines 180-184.
def reference_barlow_twins_loss(args, bn, z1, z2):
    # empirical cross-correlation matrix
    c = bn(z1).T @ bn(z2)

    # sum the cross-correlation matrix between all gpus
    c.div_(args.batch_size)
    torch.distributed.all_reduce(c)

    on_diag = torch.diagonal(c).add_(-1).pow_(2).sum()
    off_diag = off_diagonal_ref(c).pow_(2).sum()
    loss = on_diag + args.lambd * off_diag
    return loss


def off_diagonal_ref(x):
    # return a flattened view of the off-diagonal elements of a square matrix
    n, m = x.shape
    assert n == m
    return x.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()
# ---- end of the reference ----------------------------------------------------------------------------------------


@pytest.fixture
def one_process_group(tmp_path):
    """A gloo group of one process: the reference's ``all_reduce`` runs as in a one-GPU job."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def tiny_barlow(**kw) -> BarlowTwins:
    torch.manual_seed(0)
    args = dict(encoder_name="vit_tiny_patch16_224", encoder_kwargs=dict(TINY), projector_dims=(64, 64, 32))
    args.update(kw)
    return BarlowTwins(**args)


def views(b: int = 8, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(b, 3, size, size), torch.randn(b, 3, size, size)


def test_signature_matches_seed_and_registry():
    expected = {  # stable-pretraining 0.1.8, methods/barlow_twins.py BarlowTwins.__init__
        "encoder_name": "vit_small_patch16_224", "projector_dims": (8192, 8192, 8192), "lambd": 5.1e-3,
        "low_resolution": False, "pretrained": False,
    }
    params = inspect.signature(BarlowTwins.__init__).parameters
    assert list(params)[1:] == [*expected, "encoder_kwargs"]  # the seed's order, then the extension
    assert {k: params[k].default for k in expected} == expected
    assert get_method_class("barlow_twins") is BarlowTwins and BarlowTwins.backbones == ("vit", "resnet")
    with pytest.raises(ConstraintError, match="method.projector_dims"):
        BarlowTwins.check_kwargs({"projector_dims": [64, 0]}, prefix="method.")
    with pytest.raises(ConstraintError, match="method.lambd"):
        BarlowTwins.check_kwargs({"lambd": -0.1}, prefix="method.")


def test_views_are_byols_asymmetric_pair():
    groups = BarlowTwins.training_views({"image_size": 32, "augment": {"crop_scale": [0.5, 1.0]}})
    first, second = groups["view1"].recipes[0], groups["view2"].recipes[0]
    assert (first.blur_p, first.solarize_p, second.blur_p, second.solarize_p) == (1.0, 0.0, 0.1, 0.2)


# the reference backpropagates through its in-place all_reduce, which torch warns about (an identity gradient)
ALLREDUCE_WARNING = "ignore:.*allreduce_.*an autograd kernel was not registered:UserWarning"


@pytest.mark.filterwarnings(ALLREDUCE_WARNING)
@pytest.mark.parametrize("lambd", [0.0051, 0.1])
def test_loss_equals_reference_with_one_process(one_process_group, lambd):
    torch.manual_seed(1)
    z1, z2 = torch.randn(16, 24) * 2 + 1, torch.randn(16, 24)
    bn = nn.BatchNorm1d(24, affine=False)
    a1, a2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    b1, b2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    ours = barlow_twins_loss(bn(a1), bn(a2), lambd)
    ref = reference_barlow_twins_loss(SimpleNamespace(batch_size=16, lambd=lambd), bn, b1, b2)
    torch.testing.assert_close(ours.loss, ref)
    ours.loss.backward()
    ref.backward()
    torch.testing.assert_close(a1.grad, b1.grad)
    torch.testing.assert_close(a2.grad, b2.grad)
    torch.testing.assert_close(ours.on_diagonal + lambd * ours.off_diagonal, ours.loss.detach())


def test_loss_by_hand_identity_correlation_is_zero():
    """Identical, batch-normalised, uncorrelated columns: C = I, loss 0; opposite views: C = -I, on-diagonal 4 d."""
    a = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])  # mean 0, biased variance 1
    torch.testing.assert_close(cross_correlation(a, a), torch.eye(2))
    assert float(barlow_twins_loss(a, a).loss) == 0.0
    opposite = barlow_twins_loss(a, -a)
    assert float(opposite.on_diagonal) == 8.0 and float(opposite.off_diagonal) == 0.0


def test_loss_runs_in_float32_under_autocast():
    torch.manual_seed(2)
    a, b = torch.randn(16, 64).bfloat16(), torch.randn(16, 64).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = barlow_twins_loss(a, b)
    assert terms.loss.dtype == torch.float32
    torch.testing.assert_close(terms.loss, barlow_twins_loss(a.float(), b.float()).loss)


@pytest.mark.filterwarnings(ALLREDUCE_WARNING)
def test_method_loss_equals_reference_forward(one_process_group):
    model = tiny_barlow(lambd=0.02).train()
    v1, v2 = views()
    out = model(view1=v1, view2=v2)
    assert isinstance(out, BarlowTwinsOutput) and out.embedding.shape == (8, 48) and out.projection.shape == (8, 32)
    assert not out.embedding.requires_grad
    assert not model.bn.affine and model.bn.num_features == 32
    z1, z2 = model.projector(model.backbone(v1)), model.projector(model.backbone(v2))  # reference lines 208-209
    ref = reference_barlow_twins_loss(SimpleNamespace(batch_size=8, lambd=0.02), model.bn, z1, z2)
    torch.testing.assert_close(out.loss, ref)
    assert set(out.metrics()) == {"on_diagonal", "off_diagonal"}


def test_gradients_reach_backbone_and_projector_and_eval_embeds():
    model = tiny_barlow().train()
    model(*views()).loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    model.eval()
    x = torch.randn(5, 3, 32, 32)
    ev = model(images=x)
    assert ev.embedding.shape == (5, 48) and float(ev.loss) == 0.0 and ev.projection is None
    encoder, shape = BarlowTwins.embedding_encoder(model.encoder_config(), model.encoder_state_dict())
    assert shape == (3, 32, 32)
    torch.testing.assert_close(encoder.eval()(x), ev.embedding)


def test_projector_is_bias_free_linear_bn_relu_twice_then_linear():
    mlp = redundancy_projector(16, (32, 32, 8), hidden_bias=False)
    assert [type(m) for m in mlp] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert all(m.bias is None for m in mlp if isinstance(m, nn.Linear))
    assert [m.out_features for m in tiny_barlow(projector_dims=(40, 20)).projector if isinstance(m, nn.Linear)] == [40, 20]


def test_resnet_low_resolution_two_optimizer_steps():
    torch.manual_seed(0)
    model = BarlowTwins(encoder_name="resnet18", low_resolution=True, projector_dims=(64, 64, 32)).train()
    assert model.backbone.conv1.stride == (1, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(2):
        out = model(*views(b=4))
        assert torch.isfinite(out.loss)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters())
    assert model.eval()(images=torch.randn(2, 3, 32, 32)).embedding.shape == (2, 512)


# ---- two gloo processes: the summed cross-correlation ----------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def full_batch(n: int = 6, d: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Two views' projections, batch-normalised over the whole (global) batch as SyncBatchNorm would."""
    g = torch.Generator().manual_seed(3)
    z1, z2 = torch.randn(2 * n, d, generator=g), torch.randn(2 * n, d, generator=g) + 0.3
    bn = nn.BatchNorm1d(d, affine=False)
    return bn(z1).detach(), bn(z2).detach()


def _reduce_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        a1, a2 = (z.chunk(world)[rank] for z in full_batch())
        result = {}
        ref_args = SimpleNamespace(batch_size=12, lambd=0.0051)
        for key, fn in (("ours", lambda a, b: barlow_twins_loss(a, b).loss),
                        ("ref", lambda a, b: reference_barlow_twins_loss(ref_args, nn.Identity(), a, b))):
            a, b = a1.clone().requires_grad_(), a2.clone().requires_grad_()
            loss = fn(a, b)
            loss.backward()
            result[key] = (loss.detach(), a.grad, b.grad)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_processes_sum_the_cross_correlation_as_the_reference():
    with tempfile.TemporaryDirectory() as out_dir:
        # fork: the children need nothing re-imported (each sets one intra-op thread before any torch work)
        mp.start_processes(_reduce_worker, args=(2, _free_port(), out_dir), nprocs=2, join=True, start_method="fork")
        results = [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(2)]
    a1, a2 = full_batch()
    a, b = a1.clone().requires_grad_(), a2.clone().requires_grad_()
    full = barlow_twins_loss(a, b).loss  # one process, the whole batch
    full.backward()
    for rank, res in enumerate(results):
        for ours, ref in zip(res["ours"], res["ref"]):
            torch.testing.assert_close(ours, ref)  # worker for worker, value and gradients
        torch.testing.assert_close(res["ours"][0], full.detach())  # every worker sees the global matrix
        # the gradient flows through the worker's own term: its rows get the global loss's gradient
        torch.testing.assert_close(res["ours"][1], a.grad.chunk(2)[rank])
        torch.testing.assert_close(res["ours"][2], b.grad.chunk(2)[rank])
