"""APL (methods.apl) and its downstream Tuner (methods.apl_tuner)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from methods.apl import APL, build_apl_encoder
from methods.apl_tuner import fit_tuner, select_per_class, tuner_lr_factor
from methods.registry import build_method

SMALL = {"grid_size": 4, "crop": 1, "image_size": 24, "heads": 3, "n_blocks": 2, "hidden_mult": 2}


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=24, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    x = (x - x.mean()) / x.std()
    return x, torch.tensor(d.target)


def test_labels_are_a_permutation_and_tokens_are_the_cropped_patches():
    torch.manual_seed(0)
    model = APL(**SMALL, patch_dropout=0.0, method="PLT", dropout=0.0).train()
    x = torch.randn(3, 3, 24, 24)
    seen = []
    h = model.encoder.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    try:
        out = model(x)
    finally:
        h.remove()
    t = 16
    assert out.labels.shape == (3, t) and out.logits.shape == (3, t, t)
    for i in range(3):
        assert sorted(out.labels[i].tolist()) == list(range(t))
    assert not torch.equal(out.labels, torch.arange(t).expand(3, t))  # actually shuffled
    # token in slot j = flattened centre crop (side S - K = 5, offset round(K / 2) = 0) of patch labels[j]
    s, k, o = 6, 5, round(1 / 2)
    for i in range(3):
        for j in range(t):
            p = int(out.labels[i, j])
            r, c = divmod(p, 4)
            ref = x[i, :, r * s + o : r * s + o + k, c * s + o : c * s + o + k].reshape(-1)
            assert torch.equal(seen[0][i, j], ref)
    # accuracy field = fraction of argmax hits
    acc = (out.logits.argmax(-1) == out.labels).float().mean()
    assert torch.allclose(out.position_accuracy, acc)


def test_patch_dropout_and_masking_counts():
    torch.manual_seed(0)
    model = APL(**SMALL, patch_dropout=0.25, method="PLT_MASKED").train()
    out = model(torch.randn(64, 3, 24, 24))
    n_keep = 16 - round(0.25 * 16)
    assert out.labels.shape == (64, n_keep)
    assert all(len(set(row.tolist())) == n_keep for row in out.labels)
    # each patch is noised with probability 1/T: expected counted fraction 1 - 1/16
    frac = out.loss_mask.float().mean().item()
    assert abs(frac - (1 - 1 / 16)) < 0.03
    # loss ignores the noised tokens: recompute the masked cross-entropy by formula
    ce = F.cross_entropy(out.logits.reshape(-1, 16), out.labels.reshape(-1), reduction="none").reshape(64, n_keep)
    expected = ce[out.loss_mask].mean()
    assert torch.allclose(out.loss, expected, atol=1e-6)


def test_no_positional_parameters_and_permutation_equivariance():
    model = APL(**SMALL, encoder="LEARNED", embed_dim=48)
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    assert names and not any("pos" in n.lower() for n in names)
    for kw in ({}, {"project_patch_emb": True, "embed_dim": 30}):
        model = APL(**SMALL, **kw).eval()
        assert not any("pos" in n.lower() for n, _ in model.named_parameters())
        enc = model.encoder
        tokens = enc.encode_patches(enc.patches(torch.randn(2, 3, 24, 24)))
        perm = torch.randperm(16)
        with torch.no_grad():
            a = enc.contextualise(tokens)[:, perm]
            b = enc.contextualise(tokens[:, perm])
        assert torch.allclose(a, b, atol=1e-5)


def test_eval_embedding_export_and_rebuild():
    torch.manual_seed(0)
    model = build_method("apl", **SMALL).eval()
    assert list(APL.training_views({"image_size": 24})) == ["images"]
    x = torch.randn(2, 3, 24, 24)
    out = model(x)
    assert out.loss.item() == 0.0 and out.embedding.shape == (2, 75)  # 3 * (6 - 1)^2
    cfg = model.encoder_config()
    enc = build_apl_encoder(cfg["encoder_kwargs"])
    enc.load_state_dict(model.export_encoder().state_dict())
    enc.eval()
    with torch.no_grad():
        assert torch.allclose(enc(x).mean(1), out.embedding, atol=1e-6)
    with pytest.raises(ValueError, match="APL expects images"):
        model(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="not divisible by heads"):
        APL(grid_size=4, crop=1, image_size=24, heads=4)


def test_short_training_on_digits_learns_positions(digits):
    x, _ = digits
    torch.manual_seed(0)
    model = APL(**SMALL, dropout=0.0, patch_dropout=0.1, method="PLT_MASKED")
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(150):
        out = model(x[torch.randint(0, 1500, (128,))])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    with torch.no_grad():
        held_out = model(x[1500:]).position_accuracy.item()
    assert held_out > 5 * (1 / 16), held_out


def test_tuner_schedule_selection_and_fit(digits):
    total = 100
    warm = math.ceil(0.05 * total)
    assert tuner_lr_factor(0, total) == pytest.approx(1 / warm)
    assert tuner_lr_factor(warm - 1, total) == pytest.approx(1.0)
    assert tuner_lr_factor(warm, total) == pytest.approx(1.0)
    mid = warm + (total - warm) // 2
    expected_mid = 0.1 + 0.9 * (1 + math.cos(math.pi * (mid - warm) / (total - warm))) / 2
    assert tuner_lr_factor(mid, total) == pytest.approx(expected_mid)
    assert tuner_lr_factor(total, total) == pytest.approx(0.1)

    x, y = digits
    idx = select_per_class(y[:1500], 20, seed=42)
    assert torch.equal(torch.bincount(y[idx]), torch.full((10,), 20))
    assert torch.equal(idx, select_per_class(y[:1500], 20, seed=42))

    torch.manual_seed(0)
    enc = APL(**SMALL, dropout=0.0).export_encoder()
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    kwargs = dict(samples_per_class=50, epochs=15, lr=2e-3, weight_decay=1e-4, dropout=0.1, seed=0, batch_size=128)
    acc = fit_tuner(enc, x[:1500], y[:1500], x[1500:], y[1500:], freeze_encoder=False, **kwargs)
    kwargs["lr"] = 1e-2  # only the linear head trains
    frozen = fit_tuner(enc, x[:1500], y[:1500], x[1500:], y[1500:], freeze_encoder=True, **kwargs)
    assert acc > 0.5 and frozen > 0.3, (acc, frozen)  # chance 0.1
    assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items())
