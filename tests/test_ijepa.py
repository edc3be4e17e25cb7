"""I-JEPA (methods.ijepa) against a port of the official code (facebookresearch/ijepa, commit 52c1ae9).

Ported, line for line, on the same weights and masks (references are to that commit):
* ``src/masks/utils.py`` lines 11-20 ``apply_masks`` and ``src/utils/tensors.py`` lines 65-71 ``repeat_interleave_batch``;
* ``src/models/vision_transformer.py`` lines 22-82 (2-D sin-cos positions), 138-150 and 165-171 (``Attention`` /
  ``Block`` forward), 285-326 (``VisionTransformerPredictor.forward``), 401-425 (``VisionTransformer.forward``), with
  the LayerNorm eps 1e-6 of ``vit_predictor`` / ``vit_*`` (lines 444-483);
* ``src/train.py`` lines 295-313 (``forward_target``, ``forward_context``, ``loss_fn``) and 228-229 (the momentum
  schedule).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from methods.health import health_metrics
from methods.ijepa import IJEPA, linear_ema_momentum
from methods.masks import MultiBlockMaskGenerator
from methods.registry import build_method
from methods.salt import SALT, SALTPredictor
from tests.conftest import ROOT, randomize_layer_norm_

ENC = {"img_size": 32, "patch_size": 4, "embed_dim": 64, "depth": 2, "num_heads": 2}  # an 8x8 patch grid
PRED = {"predictor_embed_dim": 32, "predictor_depth": 2}
REF_EPS = 1e-6


# ---- the port of the reference ------------------------------------------------------------------------------
def apply_masks(x, masks):
    all_x = []
    for m in masks:
        mask_keep = m.unsqueeze(-1).repeat(1, 1, x.size(-1))
        all_x += [torch.gather(x, dim=1, index=mask_keep)]
    return torch.cat(all_x, dim=0)


def repeat_interleave_batch(x, B, repeat):
    N = len(x) // B
    return torch.cat([torch.cat([x[i * B:(i + 1) * B] for _ in range(repeat)], dim=0) for i in range(N)], dim=0)


def get_1d_sincos_pos_embed_from_grid(embed_dim, pos):
    omega = np.arange(embed_dim // 2, dtype=float)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def get_2d_sincos_pos_embed(embed_dim, grid_size):
    grid_h = np.arange(grid_size, dtype=float)
    grid_w = np.arange(grid_size, dtype=float)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, grid_size, grid_size])  # here w goes first
    emb_h = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])
    emb_w = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])
    return torch.from_numpy(np.concatenate([emb_h, emb_w], axis=1)).float().unsqueeze(0)


def ln(norm, x):
    return F.layer_norm(x, (x.shape[-1],), norm.weight, norm.bias, REF_EPS)


def ref_block(blk, x):
    B, N, C = x.shape
    heads = blk.attn.num_heads
    qkv = blk.attn.qkv(ln(blk.norm1, x)).reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = ((q @ k.transpose(-2, -1)) * (C // heads) ** -0.5).softmax(dim=-1)
    x = x + blk.attn.proj((attn @ v).transpose(1, 2).reshape(B, N, C))
    return x + blk.mlp.fc2(F.gelu(blk.mlp.fc1(ln(blk.norm2, x))))


def ref_encoder(vit, x, masks=None):
    x = vit.patch_embed.proj(x).flatten(2).transpose(1, 2)
    x = x + get_2d_sincos_pos_embed(x.shape[-1], int(x.shape[1] ** 0.5))
    if masks is not None:
        x = apply_masks(x, masks)
    for blk in vit.blocks:
        x = ref_block(blk, x)
    return ln(vit.norm, x)


def ref_predictor(p, x, masks_x, masks):
    """``p``: a predictor whose residual channels are in the reference's order (:func:`reference_channels`)."""
    B = len(x) // len(masks_x)
    x = p.embed(x)
    pos = get_2d_sincos_pos_embed(x.shape[-1], int(p.num_patches ** 0.5))
    x = x + apply_masks(pos.repeat(B, 1, 1), masks_x)
    _, N_ctxt, D = x.shape
    pos_embs = repeat_interleave_batch(apply_masks(pos.repeat(B, 1, 1), masks), B, repeat=len(masks_x))
    pred_tokens = p.mask_token.repeat(pos_embs.size(0), pos_embs.size(1), 1) + pos_embs
    x = torch.cat([x.repeat(len(masks), 1, 1), pred_tokens], dim=1)
    for blk in p.blocks:
        x = ref_block(blk, x)
    return p.proj(ln(p.norm, x)[:, N_ctxt:])


def ref_loss(model, imgs, masks_enc, masks_pred):
    with torch.no_grad():  # forward_target
        h = ref_encoder(model.teacher, imgs)
        h = F.layer_norm(h, (h.size(-1),))
        B = len(h)
        h = apply_masks(h, masks_pred)
        h = repeat_interleave_batch(h, B, repeat=len(masks_enc))
    z = ref_encoder(model.student, imgs, masks_enc)  # forward_context
    predictor = reference_channels(model.predictor, num_patches=64)
    z = ref_predictor(predictor, z, masks_enc, masks_pred)
    return F.smooth_l1_loss(z, h), z, h  # loss_fn


@torch.no_grad()
def reference_channels(pred: SALTPredictor, num_patches: int) -> SALTPredictor:
    """A copy of ``pred`` with its residual stream's channels permuted into the reference's order: its fixed positions
    put the column half first (``get_2d_sincos_pos_embed``: ``meshgrid(grid_w, grid_h)``), the project's the row half.
    A transformer is exactly equivariant under a permutation of its residual channels."""
    q = copy.deepcopy(pred)
    d = q.predictor_embed_dim
    perm = torch.roll(torch.arange(d), d // 2)  # reference channel c = project channel (c + d/2) mod d
    q.embed.weight.copy_(q.embed.weight[perm])
    q.embed.bias.copy_(q.embed.bias[perm])
    q.mask_token.copy_(q.mask_token[..., perm])
    for blk in q.blocks:
        for norm in (blk.norm1, blk.norm2):
            norm.weight.copy_(norm.weight[perm])
            norm.bias.copy_(norm.bias[perm])
        for layer in (blk.attn.qkv, blk.mlp.fc1):  # read the stream
            layer.weight.copy_(layer.weight[:, perm])
        for layer in (blk.attn.proj, blk.mlp.fc2):  # write to it
            layer.weight.copy_(layer.weight[perm])
            layer.bias.copy_(layer.bias[perm])
    q.norm.weight.copy_(q.norm.weight[perm])
    q.norm.bias.copy_(q.norm.bias[perm])
    q.proj.weight.copy_(q.proj.weight[:, perm])
    q.num_patches = num_patches
    return q


# ---- helpers --------------------------------------------------------------------------------------------------
def _model(**kw) -> IJEPA:
    torch.manual_seed(0)
    return IJEPA(encoder_name="vit_tiny_patch16_224", encoder_kwargs=ENC, **PRED, **kw)


@torch.no_grad()
def _perturb(model: IJEPA) -> None:
    """Make the context encoder differ from the target encoder, and give every norm, bias and the predictor's output
    a non-trivial value, so that a wrong encoder, a missing bias or a skipped affine norm changes the loss."""
    for p in [*model.student.parameters(), *model.predictor.parameters()]:
        if p.requires_grad:
            p.add_(0.05 * torch.randn_like(p))
    for module in [*model.student.modules(), *model.predictor.modules()]:
        if isinstance(module, torch.nn.LayerNorm):
            randomize_layer_norm_(module)
    model.predictor.proj.weight.mul_(20.0)  # predictions of order 1: both branches of the smooth L1


def _masks(model: IJEPA, batch: int, seed: int = 0):
    return model.mask_generator((8, 8))(batch, generator=torch.Generator().manual_seed(seed), step=seed)


# ---- tests ----------------------------------------------------------------------------------------------------
def test_registered_with_stable_pretraining_names_and_defaults():
    sig = inspect.signature(IJEPA.__init__)
    expected = {  # stable_pretraining/methods/ijepa.py 0.1.8 (model_or_model_name -> encoder_name, as every method here)
        "encoder_name": "vit_base_patch16_224", "predictor_embed_dim": 384, "predictor_depth": 6, "num_targets": 4,
        "target_scale": (0.15, 0.2), "target_aspect_ratio": (0.75, 1.5), "context_scale": (0.85, 1.0),
        "ema_decay_start": 0.996, "ema_decay_end": 1.0, "pretrained": False,
    }
    names = list(sig.parameters)[1:]
    assert names[: len(expected)] == list(expected)
    assert {k: sig.parameters[k].default for k in expected} == expected
    model = build_method("ijepa", encoder_kwargs=ENC, **PRED)
    assert type(model) is IJEPA and model.method_name == "ijepa"
    with pytest.raises(ValueError, match="predictor_depth"):
        IJEPA(encoder_kwargs=ENC, predictor_depth=0)


def test_loss_predictions_and_targets_equal_the_reference():
    model = _model().train()
    _perturb(model)
    imgs = torch.randn(3, 3, 32, 32)
    masks = _masks(model, 3)
    masks_enc = [masks.context_idx]
    masks_pred = [masks.target_idx[:, t] for t in range(masks.target_idx.shape[1])]
    ref, z, h = ref_loss(model, imgs, masks_enc, masks_pred)
    out = model(images=imgs, masks=masks)
    t, b = len(masks_pred), imgs.shape[0]
    to_ours = lambda x: x.reshape(t, b, *x.shape[1:]).transpose(0, 1)  # noqa: E731  [T*B, ...] mask-major -> [B, T, ...]
    torch.testing.assert_close(out.targets, to_ours(h), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.predictions, to_ours(z), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-6)
    big = ((z - h).abs() > 1).float().mean()
    assert 0.0 < big < 1.0  # both branches of the smooth L1 are exercised
    # a mistake the comparison must catch: the targets from the context encoder instead of the target encoder
    wrong = F.smooth_l1_loss(z, apply_masks(F.layer_norm(ref_encoder(model.student, imgs), (64,)), masks_pred))
    assert not torch.allclose(wrong, ref, rtol=1e-3)


def test_target_encoder_gets_no_gradient_and_follows_the_linear_ema():
    model = _model().train()
    _perturb(model)
    model(images=torch.randn(2, 3, 32, 32), masks=_masks(model, 2)).loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())
    assert all(p.grad is not None for p in model.student.parameters() if p.requires_grad)
    assert all(p.grad is not None for p in model.predictor.parameters())
    before = [p.detach().clone() for p in model.teacher.parameters()]
    student = [p.detach().clone() for p in model.student.parameters()]
    model.on_train_step(step=30, total_steps=120, epoch=1.0)
    m = 0.996 + 30 * (1.0 - 0.996) / 120
    assert model.ema_momentum == pytest.approx(m) and model.schedule_state() == {"ema_momentum": pytest.approx(m)}
    model.after_optimizer_step()
    for t0, s, t1 in zip(before, student, model.teacher.parameters()):
        torch.testing.assert_close(t1, m * t0 + (1 - m) * s)
    assert any(not torch.equal(t0, t1) for t0, t1 in zip(before, model.teacher.parameters()))


def test_momentum_schedule_is_the_reference_generator():
    ema, ipe, num_epochs, ipe_scale = (0.996, 1.0), 7, 3, 1.0  # in1k_vith14_ep300.yaml: ipe_scale 1.0
    momentum_scheduler = (ema[0] + i * (ema[1] - ema[0]) / (ipe * num_epochs * ipe_scale)
                          for i in range(int(ipe * num_epochs * ipe_scale) + 1))
    reference = list(momentum_scheduler)  # the i-th next() is the momentum of the update after step i
    model = _model(ema_decay_start=ema[0], ema_decay_end=ema[1])
    ours = []
    for step in range(len(reference)):
        model.on_train_step(step, ipe * num_epochs, step / ipe)
        ours.append(model.ema_momentum)
    assert ours == pytest.approx(reference, abs=1e-15)
    assert linear_ema_momentum(0, 0, 0.99, 1.0) == 0.99


def test_masks_and_predictor_are_salt_s():
    model = _model()
    assert type(model.predictor) is SALTPredictor  # I-JEPA's VisionTransformerPredictor, one class for both
    assert model.predictor.blocks[0].attn.num_heads == ENC["num_heads"]  # helper.py: num_heads=encoder.num_heads
    assert all(m.eps == REF_EPS for m in model.predictor.modules() if isinstance(m, torch.nn.LayerNorm))
    gen = model.mask_generator((8, 8))
    assert type(gen) is MultiBlockMaskGenerator
    salt = SALT(encoder_kwargs=ENC, predictor_embed_dim=32, predictor_depth=1, predictor_num_heads=2)
    ours, salts = (g(4, generator=torch.Generator().manual_seed(1), step=3) for g in (gen, salt.mask_generator((8, 8))))
    assert torch.equal(ours.context_idx, salts.context_idx) and torch.equal(ours.target_idx, salts.target_idx)
    assert not (ours.context_mask & ours.target_mask).any()  # allow_overlap: false
    assert ours.target_idx.shape[1] == 4 and ours.context_idx.shape[1] > 10  # npred 4, min_keep 10


def test_eval_embedding_is_the_pooled_target_encoder_and_exports_it():
    model = _model().train()
    _perturb(model)
    with torch.no_grad():
        for name, p in model.teacher.named_parameters():
            if name != "pos_embed":  # fixed sin-cos positions, as the reference's
                p.add_(0.01 * torch.randn_like(p))
    imgs = torch.randn(5, 3, 32, 32)
    out = model.eval()(images=imgs)
    assert out.embedding.shape == (5, 64) and float(out.loss) == 0.0
    with torch.no_grad():
        torch.testing.assert_close(out.embedding, ref_encoder(model.teacher, imgs).mean(dim=1), rtol=1e-5, atol=1e-5)
    assert model.export_encoder() is model.teacher
    encoder, shape = IJEPA.embedding_encoder(model.encoder_config(), model.encoder_state_dict())
    assert shape == (3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(encoder.eval()(imgs), out.embedding, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.train()(images=imgs, masks=_masks(model, 5)).embedding, out.embedding)


def test_health_metrics_filled():
    model = _model().train()
    _perturb(model)
    out = model(images=torch.randn(6, 3, 32, 32), masks=_masks(model, 6))
    values = health_metrics(dataclasses.replace(out.health, embeddings=out.embedding), IJEPA.health_metrics)
    assert set(values) == set(IJEPA.health_metrics)
    assert float(values["target_scale"]) == pytest.approx(1.0, abs=1e-3)  # layer-normed targets: RMS 1
    assert float(values["prediction_scale"]) == pytest.approx(float(out.predictions.detach().pow(2).mean().sqrt()))
    assert all(torch.isfinite(v) for v in values.values())


def test_digits_spec_loads():
    from ssl_platform.spec import load_spec

    spec = load_spec(ROOT / "experiments" / "ijepa_vit_tiny_digits.yaml")
    assert spec.method.name == "ijepa" and spec.optim.weight_decay_end == 0.4
