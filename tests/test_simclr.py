"""SimCLR (Chen et al. 2020): NT-Xent against google-research/simclr's loss, cross-worker negatives with gradient,
the projector, views, evaluation and export, ViT and ResNet training steps."""

from __future__ import annotations

import inspect
import os
import socket
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from methods import get_method_class
from methods.backbones import create_backbone
from methods.base import SSLMethod
from methods.constraints import ConstraintError
from methods.contrastive import ScaleOnlyBatchNorm1d, bn_mlp, gather_with_grad, nt_xent
from methods.simclr import SimCLR
from methods.views import simclr_recipes
from ssl_platform.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]

TINY_VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}
LARGE_NUM = 1e9


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on the shared 2-core machine two threads per test process thrash (a ResNet step took
    5-7 s with 2 threads next to another job, 0.5 s with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reference_add_contrastive_loss(hidden: torch.Tensor, hidden_norm: bool = True, temperature: float = 1.0):
    """google-research/simclr ``objective.py`` ``add_contrastive_loss``, lines 53-88 at commit 383d4143 (the
    ``tpu_context is None`` branch), TensorFlow -> torch line by line: ``tf.math.l2_normalize`` -> ``F.normalize``,
    ``tf.split`` -> ``torch.chunk``, ``tf.one_hot`` -> ``F.one_hot``, ``tf.matmul(a, b, transpose_b=True)`` ->
    ``a @ b.T``, ``tf.losses.softmax_cross_entropy(labels, logits)`` -> the batch mean of ``-sum(labels * log_softmax)``."""

    def softmax_cross_entropy(labels, logits):
        return -(labels * F.log_softmax(logits, dim=1)).sum(1).mean()

    # Get (normalized) hidden1 and hidden2.
    if hidden_norm:
        hidden = F.normalize(hidden, dim=-1)
    hidden1, hidden2 = torch.chunk(hidden, 2, 0)
    batch_size = hidden1.shape[0]

    hidden1_large = hidden1
    hidden2_large = hidden2
    labels = F.one_hot(torch.arange(batch_size), batch_size * 2).to(hidden.dtype)
    masks = F.one_hot(torch.arange(batch_size), batch_size).to(hidden.dtype)

    logits_aa = hidden1 @ hidden1_large.T / temperature
    logits_aa = logits_aa - masks * LARGE_NUM
    logits_bb = hidden2 @ hidden2_large.T / temperature
    logits_bb = logits_bb - masks * LARGE_NUM
    logits_ab = hidden1 @ hidden2_large.T / temperature
    logits_ba = hidden2 @ hidden1_large.T / temperature

    loss_a = softmax_cross_entropy(labels, torch.cat([logits_ab, logits_aa], 1))
    loss_b = softmax_cross_entropy(labels, torch.cat([logits_ba, logits_bb], 1))
    loss = loss_a + loss_b

    return loss, logits_ab, labels


def tiny_simclr(**kw) -> SimCLR:
    torch.manual_seed(0)
    args = {"encoder_name": "vit_tiny_patch16_224", "encoder_kwargs": dict(TINY_VIT), "projector_dims": (64, 16)}
    return SimCLR(**{**args, **kw})


def test_signature_matches_stable_pretraining():
    expected = {"encoder_name": "vit_small_patch16_224", "projector_dims": (2048, 2048, 256), "temperature": 0.5,
                "low_resolution": False, "pretrained": False}
    params = inspect.signature(SimCLR.__init__).parameters
    assert list(params)[1 : len(expected) + 1] == list(expected)  # stable-pretraining's order, then encoder_kwargs
    assert {k: params[k].default for k in expected} == expected and list(params)[len(expected) + 1 :] == ["encoder_kwargs"]
    assert get_method_class("simclr") is SimCLR and SimCLR.method_name == "simclr"
    assert SimCLR.backbones == ("vit", "resnet")


@pytest.mark.parametrize("temperature", [0.1, 0.5, 1.0])
def test_nt_xent_equals_the_reference_loss_and_gradient(temperature):
    """Our loss is the paper's mean over the 2N anchors (Algorithm 1); the reference sums the two directions' means."""
    torch.manual_seed(1)
    z1, z2 = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    ours_in = [z1.clone().requires_grad_(), z2.clone().requires_grad_()]
    ref_in = torch.cat([z1, z2]).requires_grad_()
    ours = nt_xent(*ours_in, temperature)
    ref, logits_ab, _ = reference_add_contrastive_loss(ref_in, temperature=temperature)
    torch.testing.assert_close(2 * ours, ref, rtol=1e-12, atol=1e-12)
    (2 * ours).backward()
    ref.backward()
    torch.testing.assert_close(torch.cat([g.grad for g in ours_in]), ref_in.grad, rtol=1e-10, atol=1e-12)
    assert logits_ab.shape == (6, 6) and ours.dtype == torch.float64


def test_nt_xent_is_log_2n_minus_1_for_orthogonal_views_and_small_for_aligned_ones():
    n = 4
    eye = torch.eye(2 * n)  # all 2n projections orthogonal: every candidate has logit 0
    assert nt_xent(eye[:n], eye[n:], 0.5).item() == pytest.approx(torch.log(torch.tensor(2.0 * n - 1)).item())
    z = torch.eye(n) * 10
    assert nt_xent(z, z.clone(), 0.1).item() < 1e-3  # positives identical, negatives orthogonal
    z1, z2 = torch.randn(8, 16).bfloat16(), torch.randn(8, 16).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 projections: the similarities in float32 all the same
        mixed = nt_xent(z1, z2, 0.1)
    assert mixed.dtype == torch.float32 and torch.equal(mixed, nt_xent(z1.float(), z2.float(), 0.1))


def _gather_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # the same global batch on every worker; each takes its own rows
        z1, z2 = torch.randn(2 * 3, 8), torch.randn(2 * 3, 8)
        mine = [z[3 * rank : 3 * (rank + 1)].clone().requires_grad_() for z in (z1, z2)]
        loss = nt_xent(*mine, 0.3)
        loss.backward()
        x = torch.full((2, 2), float(rank), requires_grad=True)
        gathered = gather_with_grad(x)
        (gathered * torch.arange(4.0).view(4, 1)).sum().backward()  # worker r's rows weigh 2r, 2r + 1
        torch.save({"loss": loss.detach(), "grads": [m.grad for m in mine], "gathered": gathered.detach(),
                    "x_grad": x.grad}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_negatives_are_gathered_across_workers_with_gradient():
    """Two gloo workers with half the batch each: the mean of their losses is the one-process loss of the whole
    batch, and each worker's gradient (its own loss's and the other worker's, through the gather) is ``W`` times
    the whole-batch gradient of its rows, so DDP's average is the whole-batch gradient."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_gather_worker, args=(2, _free_port(), out_dir), nprocs=2, join=True)
        results = [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(2)]
    torch.manual_seed(0)
    z1, z2 = torch.randn(6, 8).requires_grad_(), torch.randn(6, 8).requires_grad_()
    full = nt_xent(z1, z2, 0.3)
    full.backward()
    torch.testing.assert_close((results[0]["loss"] + results[1]["loss"]) / 2, full.detach())
    assert not torch.allclose(results[0]["loss"], results[1]["loss"])
    for r, res in enumerate(results):
        for grad, whole in zip(res["grads"], (z1.grad, z2.grad)):
            torch.testing.assert_close(grad / 2, whole[3 * r : 3 * (r + 1)])
        torch.testing.assert_close(res["gathered"], torch.tensor([[0.0, 0], [0, 0], [1, 1], [1, 1]]))
        # d/dx_r of sum over both workers of sum(rows * weight): each worker weighs rows 2r, 2r + 1 alike
        torch.testing.assert_close(res["x_grad"], 2 * torch.tensor([[2.0 * r], [2.0 * r + 1]]).expand(2, 2))


def test_projector_is_simclrs_batchnorm_mlp():
    head = bn_mlp([32, 64, 64, 16], last_bn="scale")
    kinds = [type(m) for m in head]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear,
                     ScaleOnlyBatchNorm1d]
    assert all(m.bias is None for m in head if isinstance(m, nn.Linear))
    last = head[-1]
    assert last.bias is None and last.weight.shape == (16,) and "bias" not in last.state_dict()
    x = torch.randn(10, 16)
    with torch.no_grad():
        last.weight.uniform_(0.5, 2.0)
    expected = (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + last.eps) * last.weight
    torch.testing.assert_close(last(x), expected)  # y = gamma * x_hat, no shift
    method = tiny_simclr(projector_dims=(48, 48, 24))
    assert [m.out_features for m in method.projector if isinstance(m, nn.Linear)] == [48, 48, 24]
    with pytest.raises(ValueError, match="last_bn"):
        bn_mlp([4, 4], last_bn="shift")


def test_views_are_two_identical_simclr_recipes_from_the_data_section():
    data = {"image_size": 32, "augment": {"crop_scale": [0.5, 1.0]}, "multicrop": {"hflip_p": 0.0}}
    views = SimCLR.training_views(data)
    assert list(views) == ["view1", "view2"] and all(g.single for g in views.values())
    first, second = views["view1"].recipes[0], views["view2"].recipes[0]
    assert first == second and first.scale == (0.5, 1.0) and first.hflip_p == 0.0 and first.solarize_p == 0.0
    assert (first.brightness, first.contrast, first.saturation, first.hue, first.blur_p) == (0.8, 0.8, 0.8, 0.2, 0.5)
    # the spec's defaults (multicrop: flip 0.5, jitter 0.8) give exactly simclr_recipes
    assert SimCLR.view_recipes({"image_size": 224, "augment": {"crop_scale": [0.08, 1.0]}}) == simclr_recipes(224)


def test_training_output_gradients_and_eval_embedding():
    method = tiny_simclr()
    method.train()
    v1, v2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    out = method(view1=v1, view2=v2)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss) and out.embedding.shape == (4, 32)
    assert out.projection.shape == (4, 16) and not out.embedding.requires_grad
    out.loss.backward()
    for name, p in method.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert method.backbone.patch_embed.proj.weight.grad.abs().sum() > 0
    method.eval()
    x = torch.randn(3, 3, 32, 32)
    ev = method(images=x)
    assert ev.embedding.shape == (3, 32) and ev.loss.item() == 0.0
    torch.testing.assert_close(method.embed(x), ev.embedding)
    rebuilt, shape = SSLMethod.embedding_encoder(method.encoder_config(), method.encoder_state_dict())
    rebuilt.eval()
    assert shape == (3, 32, 32)
    torch.testing.assert_close(rebuilt(x), ev.embedding)


def test_resnet_low_resolution_two_optimizer_steps():
    torch.manual_seed(0)
    method = SimCLR(encoder_name="resnet18", low_resolution=True, projector_dims=(64, 32), temperature=0.5)
    assert isinstance(method.backbone.conv1, nn.Conv2d) and method.backbone.conv1.stride == (1, 1)
    method.train()
    opt = torch.optim.AdamW(method.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in method.parameters()]
    for _ in range(2):
        out = method(view1=torch.randn(2, 3, 32, 32), view2=torch.randn(2, 3, 32, 32))
        assert torch.isfinite(out.loss) and out.embedding.shape == (2, 512)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, method.parameters()))
    resnet = create_backbone("resnet18", method.encoder_kwargs)
    resnet.load_state_dict(method.encoder_state_dict())


def test_constraints_and_digits_spec():
    SimCLR.check_kwargs({"temperature": 0.2, "projector_dims": [512, 128]})
    for bad in ({"temperature": 0.0}, {"projector_dims": []}, {"projector_dims": [64, 0]}, {"projector_dims": "64"}):
        with pytest.raises(ConstraintError):
            SimCLR.check_kwargs(bad)
    spec = load_spec(str(ROOT / "experiments" / "simclr_vit_tiny_digits.yaml"))
    assert spec.method.name == "simclr" and SimCLR.training_views(spec.data)["view1"].recipes[0].hflip_p == 0.0
