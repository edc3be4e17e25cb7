"""MoCo v3 (Chen, Xie, He 2021): the loss against facebookresearch/moco-v3's ``contrastive_loss``, keys gathered across
workers, the momentum encoder and its schedule, heads per backbone family, stop_grad_conv1, ViT and ResNet steps."""

from __future__ import annotations

import inspect
import math
import os
import socket
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from methods import get_method_class
from methods.base import SSLMethod
from methods.constraints import ConstraintError
from methods.contrastive import moco_contrastive
from methods.joint_embedding import JointEmbeddingMethod
from methods.mocov3 import MoCoV3, MoCoV3Output
from methods.pretrained import load_encoder_init
from methods.teacher_student import EMATeacherMethod, TeacherStudent
from methods.views import byol_recipes
from ssl_platform.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
TINY_VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on the shared 2-core machine two threads per test process thrash (a ResNet step took
    5-7 s with 2 threads next to another job, 0.5 s with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class ReferenceMoCo:
    """facebookresearch/moco-v3 at commit c349e6e2: ``moco/builder.py`` ``MoCo.contrastive_loss`` (lines 63-73) and
    ``main_moco.py`` ``adjust_moco_momentum`` (lines 431-434), verbatim except where marked: one process, so
    ``concat_all_gather(k)`` is ``k`` and ``torch.distributed.get_rank()`` is 0, and no ``.cuda()``."""

    def __init__(self, T: float, moco_m: float = 0.99, epochs: int = 100):
        self.T = T
        self.moco_m, self.epochs = moco_m, epochs

    def contrastive_loss(self, q, k):
        # normalize
        q = nn.functional.normalize(q, dim=1)
        k = nn.functional.normalize(k, dim=1)
        # gather all targets
        k = k  # adapted: concat_all_gather(k) with one process
        # Einstein sum is more intuitive
        logits = torch.einsum('nc,mc->nm', [q, k]) / self.T
        N = logits.shape[0]  # batch size per GPU
        labels = (torch.arange(N, dtype=torch.long) + N * 0)  # adapted: get_rank() = 0, no .cuda()
        return nn.CrossEntropyLoss()(logits, labels) * (2 * self.T)

    def adjust_moco_momentum(self, epoch):
        """Adjust moco momentum based on current epoch"""
        m = 1. - 0.5 * (1. + math.cos(math.pi * epoch / self.epochs)) * (1. - self.moco_m)
        return m


def tiny_moco(**kw) -> MoCoV3:
    torch.manual_seed(0)
    args = {"encoder_name": "vit_tiny_patch16_224", "encoder_kwargs": dict(TINY_VIT), "projector_dims": (64, 64, 16),
            "predictor_hidden_dim": 48}
    return MoCoV3(**{**args, **kw})


def test_signature_matches_stable_pretraining():
    expected = {"encoder_name": "vit_small_patch16_224", "projector_dims": (4096, 4096, 256), "predictor_hidden_dim": 4096,
                "temperature": 0.2, "ema_decay_start": 0.99, "ema_decay_end": 1.0, "low_resolution": False,
                "pretrained": False}
    params = inspect.signature(MoCoV3.__init__).parameters
    assert list(params)[1 : len(expected) + 1] == list(expected)  # stable-pretraining's order, then extensions
    assert {k: params[k].default for k in expected} == expected
    assert {k: params[k].default for k in list(params)[len(expected) + 1 :]} == {"encoder_kwargs": None,
                                                                                 "stop_grad_conv1": False}
    assert get_method_class("mocov3") is MoCoV3 and MoCoV3.method_name == "mocov3" and MoCoV3.backbones == ("vit", "resnet")


@pytest.mark.parametrize("temperature", [0.2, 1.0])
def test_contrastive_loss_equals_the_reference(temperature):
    torch.manual_seed(0)
    q, k = torch.randn(8, 16, dtype=torch.float64, requires_grad=True), torch.randn(8, 16, dtype=torch.float64)
    ref_q = q.detach().clone().requires_grad_()
    ours = moco_contrastive(q, k, temperature)
    ref = ReferenceMoCo(temperature).contrastive_loss(ref_q, k)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(q.grad, ref_q.grad, rtol=1e-10, atol=1e-12)


def test_method_loss_is_the_symmetric_reference_loss_of_queries_and_momentum_keys():
    method = tiny_moco(temperature=0.2)
    method.train()
    with torch.no_grad():  # move the momentum encoder away from the base encoder, as after some training
        for p in method.backbone.teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    v1, v2 = torch.randn(6, 3, 32, 32), torch.randn(6, 3, 32, 32)
    out = method(view1=v1, view2=v2)
    assert isinstance(out, MoCoV3Output)
    q1 = method.predictor(method.projector.student(method.backbone.student(v1)))
    q2 = method.predictor(method.projector.student(method.backbone.student(v2)))
    k1 = method.projector.teacher(method.backbone.teacher(v1))
    k2 = method.projector.teacher(method.backbone.teacher(v2))
    ref = ReferenceMoCo(0.2)
    torch.testing.assert_close(out.loss, ref.contrastive_loss(q1, k2) + ref.contrastive_loss(q2, k1))
    torch.testing.assert_close(out.target, k1)
    assert not out.target.requires_grad and out.embedding.shape == (6, 32) and out.projection.shape == (6, 16)
    out.loss.backward()
    for name, p in method.named_parameters():
        teacher = ".teacher." in name
        assert (p.grad is None) == teacher, name  # gradients reach base encoder, projector and predictor only
        assert p.requires_grad != teacher, name


def _keys_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # the same global batch on every worker; each takes its own rows
        q, k = torch.randn(2 * 4, 8), torch.randn(2 * 4, 8)
        mine_q = q[4 * rank : 4 * (rank + 1)].clone().requires_grad_()
        loss = moco_contrastive(mine_q, k[4 * rank : 4 * (rank + 1)], 0.2)
        loss.backward()
        torch.save({"loss": loss.detach(), "grad": mine_q.grad}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_keys_of_every_worker_are_the_candidates():
    """Two gloo workers with half the batch each (keys gathered as moco-v3's ``concat_all_gather``, labels offset
    by ``N * rank``): the mean of their losses is the one-process loss of the whole batch and their gradients are
    ``W`` times the whole-batch gradient of their rows."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_keys_worker, args=(2, _free_port(), out_dir), nprocs=2, join=True)
        results = [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(2)]
    torch.manual_seed(0)
    q, k = torch.randn(8, 8).requires_grad_(), torch.randn(8, 8)
    full = ReferenceMoCo(0.2).contrastive_loss(q, k)
    full.backward()
    torch.testing.assert_close((results[0]["loss"] + results[1]["loss"]) / 2, full.detach())
    for r, res in enumerate(results):
        torch.testing.assert_close(res["grad"] / 2, q.grad[4 * r : 4 * (r + 1)])


def test_momentum_schedule_is_moco_v3s_and_the_momentum_encoder_follows_it():
    method = tiny_moco(ema_decay_start=0.9)
    ref = ReferenceMoCo(0.2, moco_m=0.9, epochs=10)
    steps_per_epoch = 7
    for step in (0, 13, 35, 52, 70):
        method.on_train_step(step, 10 * steps_per_epoch, step / steps_per_epoch)
        assert method.ema_momentum == pytest.approx(ref.adjust_moco_momentum(step / steps_per_epoch), abs=1e-12)
        assert method.schedule_state() == {"ema_momentum": method.ema_momentum}
    assert method.ema_momentum == pytest.approx(1.0)
    method.on_train_step(20, 70, 20 / 7)
    m = method.ema_momentum
    method.train()
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.5)
    method(view1=torch.randn(4, 3, 32, 32), view2=torch.randn(4, 3, 32, 32)).loss.backward()
    old = {n: p.detach().clone() for n, p in method.named_parameters() if ".teacher." in n}
    opt.step()
    assert all(torch.equal(old[n], p) for n, p in method.named_parameters() if n in old)  # the step alone: no change
    method.after_optimizer_step()
    for wrapper, prefix in ((method.backbone, "backbone"), (method.projector, "projector")):
        assert isinstance(wrapper, TeacherStudent)
        for (name, t), s in zip(wrapper.teacher.named_parameters(), wrapper.student.parameters()):
            torch.testing.assert_close(t, m * old[f"{prefix}.teacher.{name}"] + (1 - m) * s.detach())
    assert not any(".teacher." in n for n, _ in method.predictor.named_parameters())  # no momentum predictor


def test_heads_follow_moco_v3s_vit_and_resnet_builders():
    vit = tiny_moco()
    assert [type(m) for m in vit.projector.student] == [nn.Linear, nn.BatchNorm1d, nn.ReLU] * 2 + [nn.Linear,
                                                                                                    nn.BatchNorm1d]
    last = vit.projector.student[-1]
    assert not last.affine and all(m.bias is None for m in vit.projector.student if isinstance(m, nn.Linear))
    assert isinstance(vit.predictor[-1], nn.BatchNorm1d) and not vit.predictor[-1].affine  # MoCo_ViT: last BN
    assert [m.out_features for m in vit.predictor if isinstance(m, nn.Linear)] == [48, 16]
    torch.manual_seed(0)
    resnet = MoCoV3(encoder_name="resnet18", low_resolution=True, projector_dims=(64, 16), predictor_hidden_dim=32)
    assert [type(m) for m in resnet.projector.student] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d]
    assert isinstance(resnet.predictor[-1], nn.Linear)  # MoCo_ResNet: the predictor has no last BN
    with pytest.raises(ValueError, match="stop_grad_conv1"):
        MoCoV3(encoder_name="resnet18", projector_dims=(8, 4), predictor_hidden_dim=8, stop_grad_conv1=True)


def test_stop_grad_conv1_keeps_the_random_patch_projection():
    method = tiny_moco(stop_grad_conv1=True)
    method.train()
    proj = method.backbone.student.patch_embed.proj
    before = proj.weight.detach().clone()
    opt = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-2)
    out = method(view1=torch.randn(4, 3, 32, 32), view2=torch.randn(4, 3, 32, 32))
    out.loss.backward()
    assert proj.weight.grad is None and proj.bias.grad is None
    assert method.backbone.student.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    opt.step()
    method.after_optimizer_step()
    assert torch.equal(proj.weight, before) and torch.equal(method.backbone.teacher.patch_embed.proj.weight, before)
    assert "backbone.student.patch_embed.proj.weight" in method.state_dict()


def test_eval_embedding_and_export_are_the_base_encoder():
    method = tiny_moco()
    with torch.no_grad():
        for p in method.backbone.teacher.parameters():
            p.add_(0.1)
    method.eval()
    x = torch.randn(3, 3, 32, 32)
    out = method(images=x)
    assert out.embedding.shape == (3, 32) and out.loss.item() == 0.0
    torch.testing.assert_close(out.embedding, method.backbone.student(x))
    assert method.export_encoder() is method.backbone.student
    rebuilt, shape = SSLMethod.embedding_encoder(method.encoder_config(), method.encoder_state_dict())
    rebuilt.eval()
    assert shape == (3, 32, 32)
    torch.testing.assert_close(rebuilt(x), out.embedding)


def test_released_encoder_starts_base_and_momentum_backbones(tmp_path):
    method = tiny_moco()
    torch.manual_seed(5)
    released = {k: torch.randn_like(v) for k, v in method.encoder_state_dict().items()}
    torch.save(released, tmp_path / "encoder.pt")
    load_encoder_init(method, tmp_path / "encoder.pt")
    assert isinstance(method, EMATeacherMethod) and method.teacher is method.backbone.teacher
    for module in (method.backbone.student, method.backbone.teacher):
        for k, v in module.state_dict().items():
            torch.testing.assert_close(v, released[k])


def test_resnet_low_resolution_two_optimizer_steps():
    torch.manual_seed(0)
    method = MoCoV3(encoder_name="resnet18", low_resolution=True, projector_dims=(64, 16), predictor_hidden_dim=32,
                    temperature=1.0)
    method.train()
    opt = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-3)
    student = [p.detach().clone() for p in method.backbone.student.parameters()]
    teacher = [p.detach().clone() for p in method.backbone.teacher.parameters()]
    for step in range(2):
        method.on_train_step(step, 10, step / 5)
        out = method(view1=torch.randn(2, 3, 32, 32), view2=torch.randn(2, 3, 32, 32))
        assert torch.isfinite(out.loss) and out.embedding.shape == (2, 512)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        method.after_optimizer_step()
    assert all(not torch.equal(b, p) for b, p in zip(student, method.backbone.student.parameters()))
    assert all(not torch.equal(b, p) for b, p in zip(teacher, method.backbone.teacher.parameters()))


def test_views_constraints_and_digits_spec():
    data = {"image_size": 224, "augment": {"crop_scale": [0.08, 1.0]}}
    assert MoCoV3.view_recipes(data) == byol_recipes(224, (0.08, 1.0))  # moco-v3's augmentation1 / augmentation2
    assert JointEmbeddingMethod.view_recipes(data) == byol_recipes(224, (0.08, 1.0))
    digits = {"image_size": 32, "augment": {"crop_scale": [0.5, 1.0]}, "multicrop": {"hflip_p": 0.0, "solarize_p": 0.0}}
    first, second = MoCoV3.view_recipes(digits)
    assert (first.hflip_p, second.hflip_p, first.solarize_p, second.solarize_p) == (0.0, 0.0, 0.0, 0.0)
    assert (first.blur_p, second.blur_p, first.scale) == (1.0, 0.1, (0.5, 1.0))
    MoCoV3.check_kwargs({"projector_dims": [4096, 256], "temperature": 1.0})
    for bad in ({"temperature": -1.0}, {"ema_decay_start": 1.5}, {"ema_decay_start": 0.99, "ema_decay_end": 0.9},
                {"projector_dims": [0]}, {"predictor_hidden_dim": 0}):
        with pytest.raises(ConstraintError):
            MoCoV3.check_kwargs(bad)
    spec = load_spec(str(ROOT / "experiments" / "mocov3_vit_tiny_digits.yaml"))
    assert spec.method.name == "mocov3" and spec.method.stop_grad_conv1 is True
