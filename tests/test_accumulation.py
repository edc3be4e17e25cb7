"""Gradient accumulation (``optim.accumulation_steps``) and activation checkpointing (``scaling.activation_checkpointing``)
in the worker's own step functions, one process: same gradients as the plain step."""

from __future__ import annotations

import torch

from ssl_platform.spec import spec_from_dict
from ssl_platform.training.hooks import StepInfo
from ssl_platform.training.sharding import enable_activation_checkpointing
from ssl_platform.training.trainer import accumulate_gradients, local_worker, micro_batches, train_step
from tests.conftest import TINY_VIT, tiny_spec_dict

INFO = StepInfo("t", 0, 0, 0, 4, 0)


def _grads(training) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in training.method.named_parameters() if p.grad is not None}


def _accumulated(worker, training, views, k: int, seed: int = 123):
    worker.spec.optim.accumulation_steps = k
    torch.manual_seed(seed)  # MAE's random masks: the same draws for one batch of 16 or two of 8
    loss, metrics = accumulate_gradients(worker, training, views, INFO)
    return loss, _grads(training)


def test_k_micro_batches_give_the_gradient_of_one_batch_k_times_larger(tiny_spec):
    """MAE (no batch statistics): the gradient of 16 images in one pass = 2 x 8 or 4 x 4 accumulated, and so is the loss."""
    worker, data, training = local_worker(tiny_spec())
    views = data.views(next(data.train(0)), torch.Generator().manual_seed(0))
    assert views["images"].shape[0] == 16
    loss1, g1 = _accumulated(worker, training, views, 1)
    for k in (2, 4):
        loss_k, g_k = _accumulated(worker, training, views, k)
        assert g_k.keys() == g1.keys() and len(g1) > 10
        torch.testing.assert_close(loss_k, loss1, rtol=1e-5, atol=1e-6)
        for name in g1:
            torch.testing.assert_close(g_k[name], g1[name], rtol=1e-4, atol=1e-6, msg=f"k={k}: {name}")


def test_micro_batches_cut_every_view_along_the_batch():
    views = {"global_views": [torch.arange(8.0), torch.arange(8.0) + 10], "local_views": [], "images": torch.ones(8, 2)}
    parts = micro_batches(views, 4)
    assert len(parts) == 4
    assert [p["global_views"][1].tolist() for p in parts] == [[10, 11], [12, 13], [14, 15], [16, 17]]
    assert all(p["local_views"] == [] and p["images"].shape == (2, 2) for p in parts)


def test_schedules_and_ema_count_optimizer_steps_not_micro_batches(tmp_path):
    raw = tiny_spec_dict(tmp_path, optim={"accumulation_steps": 4})
    raw["method"] = {"name": "data2vec", "encoder_name": "vit_tiny_patch16_224", "encoder_kwargs": dict(TINY_VIT),
                     "top_k_blocks": 1, "image_size": 16}
    worker, data, training = local_worker(spec_from_dict(raw))
    teacher_before = [p.clone() for p in training.method.teacher.parameters()]
    batch = next(data.train(0))
    train_step(worker, data, training, batch, torch.Generator().manual_seed(0), INFO, 0.0)
    assert training.scheduler.steps_taken == 1  # one optimizer step for 4 micro-batches
    assert all(int(s["step"]) == 1 for s in training.optimizer.state.values())
    moved = [not torch.equal(a, b) for a, b in zip(teacher_before, training.method.teacher.parameters())]
    assert any(moved)  # the EMA teacher moved once, after the optimizer step


def test_activation_checkpointing_keeps_loss_and_gradients(tiny_spec):
    """Blocks that recompute in backward give the same loss and gradients (RNG state kept for the masks' draws)."""
    worker, data, training = local_worker(tiny_spec())
    views = data.views(next(data.train(0)), torch.Generator().manual_seed(0))
    loss_plain, g_plain = _accumulated(worker, training, views, 1)
    blocks = enable_activation_checkpointing(training.method)
    assert blocks == len(training.method.encoder.blocks) + len(training.method.decoder_blocks)
    loss_ckpt, g_ckpt = _accumulated(worker, training, views, 1)
    torch.testing.assert_close(loss_ckpt, loss_plain, rtol=0, atol=0)
    for name in g_plain:
        torch.testing.assert_close(g_ckpt[name], g_plain[name], rtol=1e-5, atol=1e-7, msg=name)
