"""VICReg (Bardes et al. 2022): the loss against the reference code (one process and two gloo processes), the
expander, gradients, views, evaluation, export and a ResNet backbone."""

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
import torch.nn.functional as F
from torch import nn

from methods import get_method_class
from methods.constraints import ConstraintError
from methods.redundancy import gather_with_grad, off_diagonal, redundancy_projector, vicreg_loss
from methods.vicreg import VICReg, VICRegOutput

TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 1, "num_heads": 2}


# ---- the reference, ported verbatim ----------------------------------------------------------------------------
# facebookresearch/vicreg @ 4e12602fd495af83efd1631fbe82523e6db092e0, main_vicreg.py: VICReg.forward lines 198-219
# (after the projector of lines 195-196: x, y are the projections; self.args -> args, self.num_features ->
# args.num_features), off_diagonal lines 239-242, FullGatherLayer lines 307-323.
def reference_vicreg_loss(args, x, y):
    repr_loss = F.mse_loss(x, y)

    x = torch.cat(FullGatherLayer.apply(x), dim=0)
    y = torch.cat(FullGatherLayer.apply(y), dim=0)
    x = x - x.mean(dim=0)
    y = y - y.mean(dim=0)

    std_x = torch.sqrt(x.var(dim=0) + 0.0001)
    std_y = torch.sqrt(y.var(dim=0) + 0.0001)
    std_loss = torch.mean(F.relu(1 - std_x)) / 2 + torch.mean(F.relu(1 - std_y)) / 2

    cov_x = (x.T @ x) / (args.batch_size - 1)
    cov_y = (y.T @ y) / (args.batch_size - 1)
    cov_loss = off_diagonal_ref(cov_x).pow_(2).sum().div(
        args.num_features
    ) + off_diagonal_ref(cov_y).pow_(2).sum().div(args.num_features)

    loss = (
        args.sim_coeff * repr_loss
        + args.std_coeff * std_loss
        + args.cov_coeff * cov_loss
    )
    return loss


def off_diagonal_ref(x):
    n, m = x.shape
    assert n == m
    return x.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


class FullGatherLayer(torch.autograd.Function):
    """
    Gather tensors from all process and support backward propagation
    for the gradients across processes.
    """

    @staticmethod
    def forward(ctx, x):
        output = [torch.zeros_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(output, x)
        return tuple(output)

    @staticmethod
    def backward(ctx, *grads):
        all_gradients = torch.stack(grads)
        dist.all_reduce(all_gradients)
        return all_gradients[dist.get_rank()]
# ---- end of the reference ----------------------------------------------------------------------------------------


def ref_args(batch_size: int, num_features: int, sim=25.0, std=25.0, cov=1.0) -> SimpleNamespace:
    return SimpleNamespace(batch_size=batch_size, num_features=num_features, sim_coeff=sim, std_coeff=std, cov_coeff=cov)


@pytest.fixture
def one_process_group(tmp_path):
    """A gloo group of one process: the reference's collectives run as in a one-GPU job."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def tiny_vicreg(**kw) -> VICReg:
    torch.manual_seed(0)
    args = dict(encoder_name="vit_tiny_patch16_224", encoder_kwargs=dict(TINY), projector_dims=(64, 64, 32))
    args.update(kw)
    return VICReg(**args)


def views(b: int = 8, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(b, 3, size, size), torch.randn(b, 3, size, size)


def test_signature_matches_seed_and_registry():
    expected = {  # stable-pretraining 0.1.8, methods/vicreg.py VICReg.__init__
        "encoder_name": "vit_small_patch16_224", "projector_dims": (8192, 8192, 8192), "sim_coeff": 25.0,
        "std_coeff": 25.0, "cov_coeff": 1.0, "low_resolution": False, "pretrained": False,
    }
    params = inspect.signature(VICReg.__init__).parameters
    assert list(params)[1:] == [*expected, "encoder_kwargs"]  # the seed's order, then the extension
    assert {k: params[k].default for k in expected} == expected
    assert get_method_class("vicreg") is VICReg and VICReg.backbones == ("vit", "resnet")
    with pytest.raises(ConstraintError, match="method.projector_dims"):
        VICReg.check_kwargs({"projector_dims": []}, prefix="method.")
    with pytest.raises(ConstraintError, match="method.std_coeff"):
        VICReg.check_kwargs({"std_coeff": -1.0}, prefix="method.")


def test_views_are_byols_asymmetric_pair():
    groups = VICReg.training_views({"image_size": 32, "augment": {"crop_scale": [0.5, 1.0]}})
    first, second = groups["view1"].recipes[0], groups["view2"].recipes[0]
    assert groups["view1"].single and groups["view2"].single
    assert (first.blur_p, first.solarize_p, second.blur_p, second.solarize_p) == (1.0, 0.0, 0.1, 0.2)
    assert first.scale == second.scale == (0.5, 1.0)


@pytest.mark.parametrize("coeffs", [(25.0, 25.0, 1.0), (5.0, 10.0, 2.0)])
def test_loss_equals_reference_with_one_process(one_process_group, coeffs):
    torch.manual_seed(1)
    z1, z2 = torch.randn(16, 24, dtype=torch.float64), torch.randn(16, 24, dtype=torch.float64) * 0.5
    a1, a2 = z1.clone().float().requires_grad_(), z2.clone().float().requires_grad_()
    b1, b2 = z1.clone().float().requires_grad_(), z2.clone().float().requires_grad_()
    ours = vicreg_loss(a1, a2, *coeffs)
    ref = reference_vicreg_loss(ref_args(16, 24, *coeffs), b1, b2)
    torch.testing.assert_close(ours.loss, ref)
    ours.loss.backward()
    ref.backward()
    torch.testing.assert_close(a1.grad, b1.grad)
    torch.testing.assert_close(a2.grad, b2.grad)
    sim, std, cov = coeffs
    torch.testing.assert_close(sim * ours.invariance + std * ours.variance + cov * ours.covariance, ours.loss.detach())


def test_loss_terms_by_hand():
    """Identical views of unit-variance, uncorrelated columns: every term is 0; a constant batch: variance 1 - 0.01."""
    z = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]]) * (3 / 4) ** 0.5  # Var = 1 (unbiased)
    terms = vicreg_loss(z, z.clone())
    assert float(terms.invariance) == 0.0 and float(terms.covariance) == 0.0
    torch.testing.assert_close(terms.variance, torch.relu(1 - torch.sqrt(torch.tensor(1.0 + 1e-4))))
    const = vicreg_loss(torch.ones(4, 3), torch.ones(4, 3))
    torch.testing.assert_close(const.variance, torch.tensor(1 - 0.01))  # sqrt(0 + 1e-4) = 0.01
    torch.testing.assert_close(const.loss, torch.tensor(25 * 0.99))
    assert off_diagonal(torch.arange(9.0).view(3, 3)).tolist() == [1.0, 2.0, 3.0, 5.0, 6.0, 7.0]


def test_loss_runs_in_float32_under_autocast():
    torch.manual_seed(2)
    z1, z2 = torch.randn(16, 64).bfloat16(), torch.randn(16, 64).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = vicreg_loss(z1, z2)
    assert terms.loss.dtype == torch.float32
    torch.testing.assert_close(terms.loss, vicreg_loss(z1.float(), z2.float()).loss)


def test_method_loss_equals_reference_forward(one_process_group):
    model = tiny_vicreg(sim_coeff=20.0, std_coeff=30.0, cov_coeff=2.0).train()
    v1, v2 = views()
    out = model(view1=v1, view2=v2)
    assert isinstance(out, VICRegOutput) and out.embedding.shape == (8, 48) and out.projection.shape == (8, 32)
    assert not out.embedding.requires_grad
    x, y = model.projector(model.backbone(v1)), model.projector(model.backbone(v2))  # reference lines 195-196
    ref = reference_vicreg_loss(ref_args(8, 32, 20.0, 30.0, 2.0), x, y)
    torch.testing.assert_close(out.loss, ref)
    assert set(out.metrics()) == {"invariance", "variance", "covariance"}


def test_gradients_reach_backbone_and_expander_and_eval_embeds():
    model = tiny_vicreg().train()
    out = model(*views())
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    model.eval()
    x = torch.randn(5, 3, 32, 32)
    ev = model(images=x)
    assert ev.embedding.shape == (5, 48) and float(ev.loss) == 0.0 and ev.projection is None
    encoder, shape = VICReg.embedding_encoder(model.encoder_config(), model.encoder_state_dict())
    assert shape == (3, 32, 32)
    torch.testing.assert_close(encoder.eval()(x), ev.embedding)


def test_expander_is_linear_bn_relu_twice_then_bias_free_linear():
    mlp = redundancy_projector(16, (32, 32, 8), hidden_bias=True)
    kinds = [type(m) for m in mlp]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert mlp[0].bias is not None and mlp[3].bias is not None and mlp[6].bias is None
    assert [m.out_features for m in tiny_vicreg(projector_dims=(40, 30, 20)).projector if isinstance(m, nn.Linear)] == [40, 30, 20]


def test_resnet_low_resolution_two_optimizer_steps():
    torch.manual_seed(0)
    model = VICReg(encoder_name="resnet18", low_resolution=True, projector_dims=(64, 64, 32)).train()
    assert model.backbone.conv1.stride == (1, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(2):
        out = model(*views(b=4))
        assert torch.isfinite(out.loss)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters())
    assert model.eval()(images=torch.randn(2, 3, 32, 32)).embedding.shape == (2, 512)


# ---- two gloo processes: gather with gradient ----------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def full_batch(n: int = 6, d: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(2 * n, d, generator=g), torch.randn(2 * n, d, generator=g) * 0.7


def _gather_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        z1, z2 = (z.chunk(world)[rank] for z in full_batch())
        result = {"gathered": gather_with_grad(z1).detach()}
        for key, fn in (("ours", lambda a, b: vicreg_loss(a, b).loss),
                        ("ref", lambda a, b: reference_vicreg_loss(ref_args(12, 10), a, b))):
            a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
            loss = fn(a, b)
            loss.backward()
            result[key] = (loss.detach(), a.grad, b.grad)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_processes_gather_with_gradient_as_the_reference():
    with tempfile.TemporaryDirectory() as out_dir:
        # fork: the children need nothing re-imported (each sets one intra-op thread before any torch work)
        mp.start_processes(_gather_worker, args=(2, _free_port(), out_dir), nprocs=2, join=True, start_method="fork")
        results = [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(2)]
    z1, z2 = full_batch()
    a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    full = vicreg_loss(a, b).loss  # one process, the whole batch
    full.backward()
    for rank, res in enumerate(results):
        torch.testing.assert_close(res["gathered"], z1)
        for ours, ref in zip(res["ours"], res["ref"]):
            torch.testing.assert_close(ours, ref)  # worker for worker, value and gradients
        # the sum over workers in FullGatherLayer's backward: each worker holds 2x its share of the global
        # gradient, which DDP's average over the 2 workers turns into the gradient of the global loss
        torch.testing.assert_close(res["ours"][1] / 2, a.grad.chunk(2)[rank])
        torch.testing.assert_close(res["ours"][2] / 2, b.grad.chunk(2)[rank])
    torch.testing.assert_close((results[0]["ours"][0] + results[1]["ours"][0]) / 2, full.detach())
