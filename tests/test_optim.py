"""Optimiser options against the reference formulas (DINO utils.cosine_scheduler / clip_gradients), resumability of
the lr + weight-decay schedule, SyncBatchNorm conversion, and spec validation of the new keys."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from ssl_platform.spec import SpecError
from ssl_platform.training.optim import (
    build_optimizer,
    build_scheduler,
    clip_gradients,
    maybe_sync_batchnorm,
    param_groups,
)


def dino_cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0, start_warmup_value=0):
    """facebookresearch/dino utils.cosine_scheduler, written out from the reference."""
    warmup_schedule = np.array([])
    warmup_iters = warmup_epochs * niter_per_ep
    if warmup_epochs > 0:
        warmup_schedule = np.linspace(start_warmup_value, base_value, warmup_iters)
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    schedule = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((warmup_schedule, schedule))


def optim_cfg(**kw):
    base = {"lr": 5e-4, "weight_decay": 0.04, "betas": [0.9, 0.999], "warmup_epochs": 2, "epochs": 6,
            "min_lr_ratio": 0.01, "clip_grad": 3.0, "clip_mode": "global", "weight_decay_end": None,
            "lr_scaling": "none", "min_lr": None}
    return OmegaConf.create({**base, **kw})


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 3))


def test_weight_decay_and_lr_follow_dino_schedules():
    """wd: DINO's cosine_scheduler(0.04, 0.4) per step on the decayed group only; lr after warm-up: its cosine to min_lr."""
    spe, cfg = 5, optim_cfg(weight_decay_end=0.4, lr_scaling="linear", min_lr=1e-6)
    model = small_model()
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    sched = build_scheduler(opt, cfg, spe, global_batch=1024)
    wd_ref = dino_cosine_scheduler(0.04, 0.4, cfg.epochs, spe)
    lr0 = 5e-4 * 1024 / 256  # linear scaling: lr * global batch / 256
    lr_ref = dino_cosine_scheduler(lr0, 1e-6, cfg.epochs, spe, warmup_epochs=cfg.warmup_epochs)
    warm = cfg.warmup_epochs * spe
    for t in range(cfg.epochs * spe):
        decayed, plain = opt.param_groups
        assert decayed["weight_decay"] == pytest.approx(wd_ref[t], rel=1e-9)
        assert plain["weight_decay"] == 0.0
        if t >= warm:
            assert decayed["lr"] == pytest.approx(lr_ref[t], rel=1e-9) and plain["lr"] == decayed["lr"]
        else:
            assert decayed["lr"] == pytest.approx(lr0 * (t + 1) / warm, rel=1e-9)
        opt.step()
        sched.step()


def test_defaults_keep_the_previous_schedule():
    """No new key set: constant weight decay, lr unscaled with min_lr_ratio (the digits recipes' behaviour)."""
    spe, cfg = 4, optim_cfg(lr=1e-3, weight_decay=0.05)
    opt = build_optimizer(small_model(), cfg, torch.device("cpu"))
    sched = build_scheduler(opt, cfg, spe, global_batch=64)
    total, warm = cfg.epochs * spe, cfg.warmup_epochs * spe
    for t in range(total):
        expect = 1e-3 * ((t + 1) / warm if t < warm else 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * (t - warm) / (total - warm))))
        assert opt.param_groups[0]["lr"] == pytest.approx(expect, rel=1e-9)
        assert opt.param_groups[0]["weight_decay"] == 0.05
        sched.step()


def _train(model, opt, sched, steps, seed):
    g = torch.Generator().manual_seed(seed)
    seen = []
    for _ in range(steps):
        x = torch.randn(4, 6, generator=g)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        seen.append((opt.param_groups[0]["lr"], opt.param_groups[0]["weight_decay"]))
    return seen


def test_resumed_run_continues_lr_and_weight_decay_schedules(tmp_path):
    cfg = optim_cfg(weight_decay_end=0.4, lr_scaling="linear", min_lr=1e-6)
    spe = 3
    straight = small_model()
    opt = build_optimizer(straight, cfg, torch.device("cpu"))
    sched = build_scheduler(opt, cfg, spe, global_batch=512)
    full = _train(straight, opt, sched, 7, seed=1) + _train(straight, opt, sched, 8, seed=2)

    first = small_model()
    opt1 = build_optimizer(first, cfg, torch.device("cpu"))
    sched1 = build_scheduler(opt1, cfg, spe, global_batch=512)
    head = _train(first, opt1, sched1, 7, seed=1)
    torch.save({"model": first.state_dict(), "optimizer": opt1.state_dict(), "scheduler": sched1.state_dict()}, tmp_path / "c.pt")

    saved = torch.load(tmp_path / "c.pt", weights_only=False)
    resumed = small_model()
    resumed.load_state_dict(saved["model"])
    opt2 = build_optimizer(resumed, cfg, torch.device("cpu"))
    sched2 = build_scheduler(opt2, cfg, spe, global_batch=512)
    opt2.load_state_dict(saved["optimizer"])
    sched2.load_state_dict(saved["scheduler"])
    assert opt2.param_groups[0]["weight_decay"] == pytest.approx(full[6][1])  # wd of step 7, not of step 0
    tail = _train(resumed, opt2, sched2, 8, seed=2)
    np.testing.assert_allclose(np.array(head + tail), np.array(full), rtol=1e-12)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b)


def test_lambda_lr_state_of_older_checkpoints_loads():
    cfg = optim_cfg()
    opt = build_optimizer(small_model(), cfg, torch.device("cpu"))
    sched = build_scheduler(opt, cfg, 4)
    sched.load_state_dict({"last_epoch": 9, "base_lrs": [5e-4, 5e-4], "_step_count": 10})
    assert opt.param_groups[0]["lr"] == pytest.approx(sched.lr_at(9))


def test_per_param_clipping_matches_dino_clip_gradients():
    model = small_model()
    model(torch.randn(5, 6)).pow(2).sum().mul(100).backward()
    expected = []
    for p in model.parameters():  # DINO utils.clip_gradients, clip = 0.5
        g = p.grad.detach().clone()
        clip_coef = 0.5 / (g.norm(2) + 1e-6)
        expected.append(g * clip_coef if clip_coef < 1 else g)
    assert any(e.norm() < p.grad.norm() for e, p in zip(expected, model.parameters()))
    clip_gradients(model, optim_cfg(clip_grad=0.5, clip_mode="per_param"))
    for e, p in zip(expected, model.parameters()):
        torch.testing.assert_close(p.grad, e)


def test_global_clipping_and_no_clipping():
    model = small_model()
    model(torch.randn(5, 6)).pow(2).sum().mul(100).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    clip_gradients(model, optim_cfg(clip_grad=0.0))
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
    total = torch.sqrt(sum(g.pow(2).sum() for g in grads))
    clip_gradients(model, optim_cfg(clip_grad=0.5, clip_mode="global"))
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, g * (0.5 / (total + 1e-6)))
    for p, g in zip(model.parameters(), grads):  # with the caller's global norm (the train step computes it)
        p.grad = g.clone()
    clip_gradients(list(model.parameters()), optim_cfg(clip_grad=0.5), total_norm=total)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, g * (0.5 / (total + 1e-6)))


def test_sync_batchnorm_only_with_several_accelerator_workers():
    from methods.heads import DINOHead

    head = DINOHead(8, 16, hidden_dim=12, bottleneck_dim=6, use_bn=True)
    head.mlp[1].running_mean.uniform_()
    head.eval()  # running statistics in use, and unchanged by the forward
    state = {k: v.clone() for k, v in head.state_dict().items()}
    x = torch.randn(10, 8)
    before = head(x)
    assert maybe_sync_batchnorm(head, 1, torch.device("cuda")) is head
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in maybe_sync_batchnorm(head, 4, torch.device("cpu")).modules())
    synced = maybe_sync_batchnorm(head, 2, torch.device("cuda"))  # conversion itself needs no GPU
    bns = [m for m in synced.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns and all(isinstance(m, nn.SyncBatchNorm) for m in bns)
    for k, v in synced.state_dict().items():
        torch.testing.assert_close(v, state[k])
    torch.testing.assert_close(synced(x), before)  # the same running statistics and affine parameters


def test_param_groups_mark_the_decayed_group():
    groups = param_groups(small_model(), 0.1)
    assert groups[0]["decayed"] and not groups[1]["decayed"]
    assert {p.ndim for p in groups[0]["params"]} == {2}


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("optim.clip_mode=per_layer", "optim.clip_mode"),
        ("optim.lr_scaling=sqrt", "optim.lr_scaling"),
        ("optim.weight_decay_end=-0.1", "optim.weight_decay_end"),
        ("optim.min_lr=1.0", "optim.min_lr"),
        ("optim.weight_decay_exclude=tokens", "optim.weight_decay_exclude"),
        ("optim.schedule=step", "optim.schedule"),
        ("optim.warmup_start_factor=0.0", "optim.warmup_start_factor"),
    ],
)
def test_bad_optim_keys_name_key_expected_and_seen(tiny_spec, override, key):
    with pytest.raises(SpecError) as err:
        tiny_spec([override])
    assert err.value.key == key and str(err.value.seen) == override.split("=", 1)[1]


def dino_get_params_groups(model):
    """facebookresearch/dino utils.py:632 ``get_params_groups``, ported."""
    regularized = []
    not_regularized = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # we do not regularize biases nor Norm parameters
        if name.endswith(".bias") or len(param.shape) == 1:
            not_regularized.append(param)
        else:
            regularized.append(param)
    return [{'params': regularized}, {'params': not_regularized, 'weight_decay': 0.}]


def _vit_with_tokens() -> nn.Module:
    import timm

    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=0,
                             reg_tokens=2, init_values=1e-4)


def test_default_weight_decay_exclusions_are_dinos_get_params_groups():
    """Biases and 1-D parameters only: pos_embed, cls_token and reg_token (3-D) are decayed, as in DINO / MAE."""
    vit = _vit_with_tokens()
    vit.patch_embed.proj.bias.requires_grad_(False)  # frozen parameters are left out of both groups
    ours = param_groups(vit, 0.05)
    ref = dino_get_params_groups(vit)
    for mine, theirs in zip(ours, ref):
        assert [id(p) for p in mine["params"]] == [id(p) for p in theirs["params"]]
    decayed = {id(p) for p in ours[0]["params"]}
    assert {id(vit.pos_embed), id(vit.cls_token), id(vit.reg_token)} <= decayed
    assert id(vit.blocks[0].ls1.gamma) not in decayed  # LayerScale gains are 1-D


def test_weight_decay_exclude_options():
    vit = _vit_with_tokens()
    named = dict(vit.named_parameters())
    tokens = param_groups(vit, 0.05, "bias_norm_tokens")
    exempt = {id(p) for p in tokens[1]["params"]}
    assert {id(vit.pos_embed), id(vit.cls_token), id(vit.reg_token)} <= exempt
    assert exempt == {id(p) for n, p in named.items() if n.endswith(".bias") or p.ndim <= 1 or "token" in n or "pos_embed" in n}
    everything = param_groups(vit, 0.05, "none")
    assert len(everything[0]["params"]) == len(named) and not everything[1]["params"]  # fairseq's Adam decays all
    opt = build_optimizer(vit, optim_cfg(weight_decay_exclude="none"), torch.device("cpu"))
    assert len(opt.param_groups[0]["params"]) == len(named)
    with pytest.raises(ValueError, match="weight_decay_exclude"):
        param_groups(vit, 0.05, "tokens")


@pytest.mark.parametrize(("epochs", "lr"), [(300, 1.15e-3), (40, 1e-3), (10, 2e-3)])
def test_linear_cosine_epochs_is_apls_chained_scheduler(epochs, lr):
    """le0x99/self-supervised-vision-transformers APL/PreTrainer.py ``Trainer.train`` (lines 111-115): Adam, then
    ``LinearLR(start_factor=0.5, total_iters=int(E * 0.05))`` chained with ``CosineAnnealingLR(T_max=E,
    eta_min=0.1 * lr)``, ``scheduler.step()`` once per epoch (``train_``, line 162). The reference's own torch
    schedulers run here; the platform's per-step schedule must give the same lr at every step of every epoch."""
    spe = 3
    ref_model = nn.Linear(2, 2)
    optimizer = torch.optim.Adam(ref_model.parameters(), lr=lr, weight_decay=0.0)
    warmup_epochs = int(epochs * 0.05)
    warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.5, total_iters=warmup_epochs)
    cosan = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs, eta_min=0.1 * lr)
    scheduler = torch.optim.lr_scheduler.ChainedScheduler([warmup, cosan])

    cfg = optim_cfg(lr=lr, weight_decay=0.0, warmup_epochs=warmup_epochs, epochs=epochs, min_lr_ratio=0.1,
                    schedule="linear_cosine_epochs", warmup_start_factor=0.5)
    opt = build_optimizer(small_model(), cfg, torch.device("cpu"))
    sched = build_scheduler(opt, cfg, spe)
    for _epoch in range(epochs):
        expected = optimizer.param_groups[0]["lr"]
        for _ in range(spe):
            assert [g["lr"] for g in opt.param_groups] == pytest.approx([expected] * 2, rel=1e-12)
            sched.step()
        scheduler.step()
    assert sched.lr_at(0) == pytest.approx(0.5 * lr)
