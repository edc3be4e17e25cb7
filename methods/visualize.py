"""Pictures a method can show of itself (``SSLMethod.pictures``): what the platform logs under ``images/``.

A method returns :class:`Panel` s for a fixed batch of evaluation images: ``"image"`` panels are ``[B, C, H, W]``
in the method's input space (the platform undoes the input normalisation), ``"heatmap"`` panels are
``[B, K, h, w]`` maps drawn one column per channel (e.g. one per attention head). Pure torch, no plotting here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from methods import vit as V


@dataclass
class Panel:
    name: str
    images: torch.Tensor
    kind: str = "image"  # image | heatmap


@torch.no_grad()
def cls_attention_maps(vit: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The last block's attention of the CLS token to every patch, per head: ``[B, heads, gh, gw]``.

    As DINO's ``visualize_attention.py`` (``model.get_last_selfattention(img)[0, :, 0, 1:]`` reshaped to the patch
    grid): ``softmax(q_cls k^T / sqrt(d))`` of the last block, computed from its ``norm1`` input with its own
    ``qkv`` weights (timm's fused attention does not return the weights).
    """
    grid = V.grid_shape(vit, images)
    x = vit.norm_pre(V.embed_patches(vit, images))
    for block in vit.blocks[:-1]:
        x = block(x)
    last = vit.blocks[-1]
    attn = last.attn
    b, n, _ = x.shape
    qkv = attn.qkv(last.norm1(x)).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    weights = ((q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # [B, heads, 1, N]
    prefix = V.num_prefix_tokens(vit)
    return weights[:, :, 0, prefix:].reshape(b, attn.num_heads, *grid).float()


def reconstruction_panels(images: torch.Tensor, predictions: torch.Tensor, mask: torch.Tensor, patch: int,
                          norm_pix: bool) -> list[Panel]:
    """MAE's figure (He et al. 2022, Fig. 2): the input, the input with masked patches greyed out, and the
    reconstruction with the visible patches pasted back (``predictions [B, N, p*p*C]``, ``mask [B, N]``, 1 = masked).
    With ``norm_pix`` the predictions are per-patch normalised and are mapped back with each patch's own mean and
    standard deviation, as in MAE's visualisation demo."""
    grid = images.shape[-2] // patch, images.shape[-1] // patch
    target = V.patchify(images, patch)
    pred = predictions.float()
    if norm_pix:
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        pred = pred * (var + 1.0e-6) ** 0.5 + mean
    m = mask.float().unsqueeze(-1)
    channels = images.shape[1]
    masked = V.unpatchify(target * (1 - m), patch, grid, channels)
    pasted = V.unpatchify(target * (1 - m) + pred * m, patch, grid, channels)
    return [Panel("input", images.float()), Panel("masked", masked), Panel("reconstruction", pasted)]


def attention_panels(vit: nn.Module, images: torch.Tensor) -> list[Panel]:
    """The images and their last-block CLS attention per head (DINO, Caron et al. 2021, Fig. 1 / 3)."""
    return [Panel("input", images.float()), Panel("head", cls_attention_maps(vit, images), "heatmap")]


@torch.no_grad()
def masked_prediction_panels(method: nn.Module, images: torch.Tensor, patch: int, norm_pix: bool) -> list[Panel]:
    """:func:`reconstruction_panels` of one training-mode forward of a masked pixel model (``predictions`` and
    ``mask`` of its output), the module's train / eval mode restored after."""
    was_training = method.training
    method.train()
    try:
        out = method(images=images)
    finally:
        method.train(was_training)
    return reconstruction_panels(images, out.predictions, out.mask, patch, norm_pix)
