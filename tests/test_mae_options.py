"""MAE's paper choices as options, against the reference (facebookresearch/mae models_mae.py, util/pos_embed.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from methods.mae import MAE
from ssl_platform.training.optim import build_optimizer

ENC = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2}


def tiny_mae(**kw) -> MAE:
    torch.manual_seed(0)
    return MAE(encoder_kwargs=dict(ENC), decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, **kw)


def mae_get_2d_sincos_pos_embed(embed_dim, grid_size, cls_token=False):
    """util/pos_embed.py, written out from the reference."""
    def get_1d(dim, pos):
        omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, grid_size, grid_size])
    emb = np.concatenate([get_1d(embed_dim // 2, grid[0]), get_1d(embed_dim // 2, grid[1])], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)
    return emb


def test_fixed_sincos_encoder_positions_equal_mae_and_stay_fixed():
    model = tiny_mae(encoder_pos_embed="sincos")
    pos = model.encoder.pos_embed
    expected = torch.from_numpy(mae_get_2d_sincos_pos_embed(64, 4, cls_token=True)).float()[None]
    torch.testing.assert_close(pos.detach(), expected)
    assert not pos.requires_grad
    optimizer = build_optimizer(model, OmegaConf.create({"lr": 1e-2, "betas": [0.9, 0.95], "weight_decay": 0.05}), torch.device("cpu"))
    assert all(p is not pos for g in optimizer.param_groups for p in g["params"])
    model.train()
    model(torch.randn(4, 3, 32, 32)).loss.backward()
    optimizer.step()
    torch.testing.assert_close(model.encoder.pos_embed.detach(), expected)
    assert tiny_mae().encoder.pos_embed.requires_grad  # default: timm's learned positions


def test_mae_weight_init_is_xavier_everywhere():
    model = tiny_mae(weight_init="mae")
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) > 6
    for m in linears:
        fan_out, fan_in = m.weight.shape
        bound = (6.0 / (fan_in + fan_out)) ** 0.5
        peak = float(m.weight.detach().abs().max())
        assert 0.8 * bound < peak <= bound + 1e-6  # uniform on [-bound, bound], not trunc-normal(0.02)  # uniform on [-bound, bound], not trunc-normal(0.02)
        assert m.bias is None or not m.bias.any()
    conv = model.encoder.patch_embed.proj
    w = conv.weight.detach().view(conv.weight.shape[0], -1)
    bound = (6.0 / (w.shape[0] + w.shape[1])) ** 0.5
    assert 0.8 * bound < float(w.abs().max()) <= bound + 1e-6
    assert abs(float(model.encoder.cls_token.detach().std()) - 0.02) < 0.01
    with pytest.raises(ValueError, match="pretrained"):
        tiny_mae(weight_init="mae", pretrained=True)
    with pytest.raises(ValueError, match="encoder_pos_embed"):
        tiny_mae(encoder_pos_embed="rope")
