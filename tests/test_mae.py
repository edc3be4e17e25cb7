"""MAE: loss only on masked patches, mask ratio honoured, eval embeddings, backward."""

from __future__ import annotations

import torch

from methods import build_method
from methods import vit as V
from tests.conftest import TINY_VIT, layer_norm_reference, randomize_layer_norm_


def tiny_mae(**kw):
    torch.manual_seed(0)
    return build_method("mae", encoder_kwargs=dict(TINY_VIT), decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, **kw)


def test_mask_ratio_is_honoured():
    keep, mask = V.random_masking(4, 16, 0.75, "cpu")
    assert keep.shape == (4, 4) and mask.sum(1).tolist() == [12, 12, 12, 12]
    model = tiny_mae(mask_ratio=0.5)
    out = model(images=torch.randn(3, 3, 16, 16))
    assert out.mask.shape == (3, 16) and out.mask.sum(1).tolist() == [8.0, 8.0, 8.0]


def test_loss_only_on_masked_patches():
    """Changing the pixels of visible patches in the *target* leaves the loss unchanged; masked ones change it."""
    model = tiny_mae()
    images = torch.randn(2, 3, 16, 16)
    torch.manual_seed(1)
    out = model(images=images)
    mask = out.mask.bool()
    # Recompute the loss from the formula with targets changed at visible positions only.
    target = out.target.clone()
    target[~mask] += 10.0
    per = ((out.predictions - target) ** 2).mean(-1)
    recomputed = (per * mask).sum() / mask.sum()
    assert torch.allclose(recomputed, out.loss, atol=1e-6)
    target2 = out.target.clone()
    target2[mask] += 1.0
    per2 = ((out.predictions - target2) ** 2).mean(-1)
    assert not torch.allclose((per2 * mask).sum() / mask.sum(), out.loss)


def test_norm_pix_target_is_per_patch_normalised():
    model = tiny_mae()
    images = torch.randn(2, 3, 16, 16)
    out = model(images=images)
    patches = V.patchify(images, 4)
    expected = (patches - patches.mean(-1, keepdim=True)) / (patches.var(-1, keepdim=True) + 1e-6).sqrt()
    assert torch.allclose(out.target, expected, atol=1e-5)


def test_eval_returns_embedding_and_zero_loss_and_backward_works():
    model = tiny_mae()
    out = model(images=torch.randn(5, 3, 16, 16))
    out.loss.backward()
    assert model.encoder.patch_embed.proj.weight.grad is not None
    assert model.decoder_pred.weight.grad is not None
    model.eval()
    ev = model(images=torch.randn(5, 3, 16, 16))
    assert ev.embedding.shape == (5, 32) and float(ev.loss) == 0.0


def test_visible_patches_only_enter_the_encoder():
    model = tiny_mae(mask_ratio=0.75)
    seen = []
    model.encoder.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    model(images=torch.randn(2, 3, 16, 16))
    assert seen == [1 + 4]  # CLS + 25% of 16 patches


def test_decoder_gets_final_layernorm_tokens_with_avg_pooling():
    """MAE normalises the encoder output before the decoder (He et al. 2022). With global_pool='avg' timm
    applies that LayerNorm (fc_norm) only after pooling, so MAE applies it to every visible token."""
    torch.manual_seed(0)
    model = build_method(
        "mae", encoder_kwargs={**TINY_VIT, "global_pool": "avg"}, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2
    ).train()
    enc = model.encoder
    assert isinstance(enc.norm, torch.nn.Identity)
    randomize_layer_norm_(enc.fc_norm)
    seen = {}
    decode = model.decode

    def capture(latent, keep_idx, grid):
        seen["latent"], seen["keep_idx"] = latent, keep_idx
        return decode(latent, keep_idx, grid)

    model.decode = capture
    images = torch.randn(2, 3, 16, 16)
    model(images=images)
    x = enc._pos_embed(enc.patch_embed(images))
    keep = seen["keep_idx"]
    p = enc.num_prefix_tokens  # timm keeps the CLS token with avg pooling; it is encoded too
    x = torch.stack([torch.cat([x[i, :p], x[i, p:][keep[i]]]) for i in range(2)])
    for block in enc.blocks:
        x = block(x)
    assert torch.allclose(seen["latent"], layer_norm_reference(x, enc.fc_norm), atol=1e-5)
