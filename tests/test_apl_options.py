"""APL's reference options against le0x99/self-supervised-vision-transformers (APL/base_models.py Attention,
Transformer, PatchDropout; APL/PreTrainer.py Tuner)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from methods.apl import APL, ReferenceBlock, build_apl_encoder
from methods.apl_tuner import fit_tuner

SMALL = {"grid_size": 4, "crop": 1, "image_size": 24, "heads": 3, "n_blocks": 2, "hidden_mult": 2}


def reference_transformer(block: ReferenceBlock, x: torch.Tensor) -> torch.Tensor:
    """base_models.Transformer.forward (dropout off) with the block's weights, step by step as the reference."""
    att = block.attention
    b, t, e = x.size()
    h = att.heads
    s = e // h
    k = att.w_k(x).view(b, t, h, s).transpose(1, 2).contiguous().view(b * h, t, s) / (e ** (1 / 4))
    q = att.w_q(x).view(b, t, h, s).transpose(1, 2).contiguous().view(b * h, t, s) / (e ** (1 / 4))
    v = att.w_v(x).view(b, t, h, s).transpose(1, 2).contiguous().view(b * h, t, s) / (e ** (1 / 4))
    w = F.softmax(q @ k.transpose(1, 2), dim=2)
    y = (w @ v).view(b, h, t, s).transpose(1, 2).contiguous().view(b, t, s * h)
    attended = att.w_u(y)
    x = block.norm1(attended + x)
    return block.norm2(block.ff(x) + x)


def test_reference_block_equals_the_repository_formula():
    torch.manual_seed(0)
    block = ReferenceBlock(48, 4, 3, dropout=0.0).eval()
    for norm in (block.norm1, block.norm2):
        norm.weight.data.uniform_(0.5, 2)
        norm.bias.data.uniform_(-1, 1)
    x = torch.randn(2, 7, 48)
    torch.testing.assert_close(block(x), reference_transformer(block, x), atol=1e-5, rtol=1e-5)
    assert block.attention.w_q.bias is None and block.attention.w_u.bias is not None
    assert isinstance(block.ff[1], torch.nn.ReLU)


def test_reference_encoder_has_no_final_norm_and_rebuilds():
    torch.manual_seed(0)
    model = APL(**SMALL, block="reference", dropout=0.0).eval()
    enc = model.encoder
    assert isinstance(enc.norm, torch.nn.Identity) and all(isinstance(b, ReferenceBlock) for b in enc.blocks)
    x = torch.randn(2, 3, 24, 24)
    tokens = enc.encode_patches(enc.patches(x))
    expected = tokens
    for block in enc.blocks:
        expected = reference_transformer(block, expected)
    torch.testing.assert_close(enc(x), expected, atol=1e-5, rtol=1e-5)
    rebuilt = build_apl_encoder(model.encoder_config()["encoder_kwargs"])
    rebuilt.load_state_dict(enc.state_dict())
    torch.testing.assert_close(rebuilt.eval()(x), enc(x))
    with pytest.raises(ValueError, match="block"):
        APL(**SMALL, block="post_ln")


def test_zeroing_patch_dropout_keeps_tokens_and_skips_them_in_the_loss():
    torch.manual_seed(0)
    model = APL(**SMALL, patch_dropout=0.25, patch_dropout_mode="zero", method="PLT").train()
    seen = []
    model.encoder.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    out = model(torch.randn(256, 3, 24, 24))
    zeroed = (seen[0] == 0).all(dim=-1)  # [B, T]
    assert out.labels.shape == (256, 16)  # every token stays in the sequence
    assert abs(float(zeroed.float().mean()) - 0.25) < 0.02  # Binomial(T, 0.25) zeroed tokens per image
    assert float(zeroed.sum(dim=1).float().std()) > 0.5  # a random number per image, not a fixed count
    assert torch.equal(out.loss_mask, ~zeroed)
    ce = F.cross_entropy(out.logits.reshape(-1, 16), out.labels.reshape(-1), reduction="none").reshape(256, 16)
    torch.testing.assert_close(out.loss, ce[~zeroed].mean())


def test_tuner_keeps_patch_dropout_while_training_only():
    torch.manual_seed(0)
    enc = APL(**SMALL, dropout=0.0).export_encoder()
    x, y = torch.randn(40, 3, 24, 24), torch.arange(40) % 4
    fractions = {True: [], False: []}

    def record(module, args):
        fractions[module.training].append(float((args[0] == 0).all(dim=-1).float().mean()))

    enc.blocks[0].register_forward_pre_hook(record)  # fit_tuner deep-copies the encoder, hooks included
    fit_tuner(enc, x, y, x, y, samples_per_class=10, epochs=2, batch_size=20, patch_dropout=0.3, seed=0)
    assert fractions[True] and fractions[False]
    assert 0.2 < sum(fractions[True]) / len(fractions[True]) < 0.4
    assert max(fractions[False]) == 0.0
