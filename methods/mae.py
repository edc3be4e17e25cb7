"""MAE: Masked Autoencoders Are Scalable Vision Learners (He et al., CVPR 2022, arXiv 2111.06377).

The encoder (a timm ViT) sees only the visible patches (``1 - mask_ratio`` of them, chosen uniformly at
random per sample); a lightweight decoder gets the encoded visible tokens (after the encoder's final
LayerNorm, applied per token also for ``global_pool='avg'``, :func:`methods.vit.per_token_norm`) plus a shared
mask token at every masked position, with fixed 2-D sin-cos positions, and predicts the pixels of every patch.
The loss is the mean squared error on masked patches only, against per-patch normalised pixels when
``norm_pix_loss``:

    target_i = (x_i - mean(x_i)) / sqrt(var(x_i) + 1e-6),   loss = sum_i m_i * ||pred_i - target_i||^2 / (D * sum_i m_i)

This is also SALT's stage 1 ("V-Pixel"): with ``mask_type="multiblock"`` the visible set is an I-JEPA
context block and the loss covers every non-context patch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from timm.models.vision_transformer import Block
from torch import nn

from methods import constraints as C
from methods import vit as V
from methods.base import MethodOutput, SSLMethod
from methods.health import HealthInputs
from methods.masks import MultiBlockMaskGenerator  # SALT's I-JEPA multi-block masks
from methods.visualize import Panel, masked_prediction_panels


@dataclass
class MAEOutput(MethodOutput):
    """``loss``; ``embedding`` ``[B, D]``; ``predictions`` ``[B, N, p*p*C]``; ``mask`` ``[B, N]`` (1 = masked)."""

    predictions: torch.Tensor | None = None
    target: torch.Tensor | None = None
    mask: torch.Tensor | None = None


class MAE(SSLMethod):
    """Masked autoencoder with a timm ViT encoder.

    :param encoder_name: timm ViT name (default ``"vit_tiny_patch16_224"``).
    :param mask_ratio: fraction of patches hidden from the encoder (default 0.75).
    :param decoder_embed_dim: decoder width (default 512).
    :param decoder_depth: decoder blocks (default 8).
    :param decoder_num_heads: decoder attention heads (default 16).
    :param norm_pix_loss: regress per-patch normalised pixels (default True).
    :param mask_type: ``"random"`` (MAE) or ``"multiblock"`` (SALT stage 1, V-Pixel).
    :param encoder_kwargs: extra kwargs for ``timm.create_model`` (e.g. ``img_size``, ``patch_size``).
    :param pretrained: load pretrained timm weights for the encoder.
    :param encoder_pos_embed: extension: ``"learned"`` (default: timm's trainable positions) or ``"sincos"`` (MAE's
        choice: fixed 2-D sin-cos positions in the encoder, :func:`methods.vit.fix_sincos_pos_embed_`).
    :param weight_init: extension: ``"timm"`` (default: timm's truncated-normal encoder, truncated-normal decoder) or
        ``"mae"`` (MAE's choice: xavier-uniform linear layers and patch embedding everywhere,
        :func:`methods.vit.mae_init_`).
    """

    method_name = "mae"

    health_metrics = ("rank_fraction", "normalized_std", "target_scale", "prediction_scale")
    view_interpolation = "bicubic"  # main_pretrain.py: RandomResizedCrop(input_size, scale=(0.2, 1.0), interpolation=3)
    constraints = (
        C.open_unit_interval("mask_ratio"),
        C.positive_int("decoder_embed_dim"),
        C.positive_int("decoder_depth"),
        C.positive_int("decoder_num_heads"),
        C.OneOf("mask_type", ("random", "multiblock")),
        C.OneOf("encoder_pos_embed", ("learned", "sincos")),
        C.OneOf("weight_init", ("timm", "mae")),
    )

    def __init__(
        self,
        encoder_name: str = "vit_tiny_patch16_224",
        mask_ratio: float = 0.75,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        norm_pix_loss: bool = True,
        mask_type: str = "random",
        encoder_kwargs: dict[str, Any] | None = None,
        pretrained: bool = False,
        encoder_pos_embed: str = "learned",
        weight_init: str = "timm",
    ):
        super().__init__()
        self.check_kwargs({"mask_ratio": mask_ratio, "mask_type": mask_type, "decoder_embed_dim": decoder_embed_dim,
                           "decoder_depth": decoder_depth, "decoder_num_heads": decoder_num_heads,
                           "encoder_pos_embed": encoder_pos_embed, "weight_init": weight_init})
        if weight_init == "mae" and pretrained:
            raise ValueError("weight_init='mae' would overwrite the pretrained encoder weights; use weight_init='timm'")
        V.head_dim_ok(decoder_embed_dim, decoder_num_heads, "MAE decoder")
        self.encoder_name = encoder_name
        self.encoder_kwargs = dict(encoder_kwargs or {})
        self.mask_ratio = mask_ratio
        self.mask_type = mask_type
        self.norm_pix_loss = norm_pix_loss

        self.encoder = V.create_vit(encoder_name, self.encoder_kwargs, pretrained)
        dim = self.encoder.embed_dim
        self.patch = V.patch_size(self.encoder)
        in_chans = self.encoder.patch_embed.proj.in_channels
        self.in_chans = in_chans

        self.decoder_embed = nn.Linear(dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, self.patch * self.patch * in_chans)
        self.decoder_embed_dim = decoder_embed_dim

        for module in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            module.apply(V.trunc_normal_init)
        nn.init.normal_(self.mask_token, std=0.02)
        if weight_init == "mae":
            V.mae_init_(self)
        if encoder_pos_embed == "sincos":
            V.fix_sincos_pos_embed_(self.encoder)
        self._mask_generator = None

    # ---- masking --------------------------------------------------------------------------------------
    def sample_mask(self, batch_size: int, grid: tuple[int, int], device) -> tuple[torch.Tensor, torch.Tensor]:
        """``keep_idx`` ``[B, K]`` of visible patches and ``mask`` ``[B, N]`` (True = masked / predicted)."""
        n = grid[0] * grid[1]
        if self.mask_type == "random":
            return V.random_masking(batch_size, n, self.mask_ratio, device)

        if self._mask_generator is None or self._mask_generator.grid != tuple(grid):
            self._mask_generator = MultiBlockMaskGenerator(grid)
        masks = self._mask_generator(batch_size, device=device)
        keep_idx = masks.context_idx
        mask = torch.ones(batch_size, n, dtype=torch.bool, device=device)
        mask.scatter_(1, keep_idx, False)
        return keep_idx, mask

    # ---- forward --------------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> MAEOutput:
        if not self.training:
            with torch.no_grad():
                tokens = V.encode_full(self.encoder, images)
                emb = V.pooled_embedding(self.encoder, tokens)
            return MAEOutput(loss=torch.zeros((), device=images.device), embedding=emb)

        b = images.shape[0]
        grid = V.grid_shape(self.encoder, images)
        keep_idx, mask = self.sample_mask(b, grid, images.device)
        with V.variable_length_attention(enabled=self.mask_type == "multiblock"):  # multi-block: a new context size every step
            latent = V.encode_visible(self.encoder, images, keep_idx)  # [B, P + K, D]
        pred = self.decode(V.per_token_norm(self.encoder, latent), keep_idx, grid)  # [B, N, p*p*C]

        target = V.patchify(images, self.patch)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        per_patch = ((pred.float() - target.float()) ** 2).mean(dim=-1)  # [B, N]
        m = mask.float()
        loss = (per_patch * m).sum() / m.sum().clamp(min=1.0)
        emb = V.pooled_embedding(self.encoder, latent).detach()
        health = HealthInputs(targets=target.detach(), predictions=pred.detach(), token_mask=m)
        return MAEOutput(loss=loss, embedding=emb, predictions=pred, target=target, mask=m, health=health)

    def pictures(self, images: torch.Tensor) -> list[Panel]:
        """MAE's figure: the input, its masked patches and the reconstruction (He et al. 2022, Fig. 2)."""
        return masked_prediction_panels(self, images, self.patch, self.norm_pix_loss)

    def decode(self, latent: torch.Tensor, keep_idx: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Scatter encoded visible tokens into a full grid of mask tokens, add positions, decode to pixels."""
        n_prefix = V.num_prefix_tokens(self.encoder)
        x = self.decoder_embed(latent)
        prefix, visible = x[:, :n_prefix], x[:, n_prefix:]
        b, n = x.shape[0], grid[0] * grid[1]
        full = self.mask_token.to(x.dtype).expand(b, n, -1).clone()
        full.scatter_(1, keep_idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]), visible)
        pos = V.sincos_pos_embed_2d(self.decoder_embed_dim, grid, device=x.device).to(x.dtype)
        full = full + pos.unsqueeze(0)
        x = torch.cat([prefix, full], dim=1)
        for block in self.decoder_blocks:
            x = block(x)
        x = self.decoder_norm(x)
        return self.decoder_pred(x[:, n_prefix:])

    # ---- export ---------------------------------------------------------------------------------------
    def export_encoder(self) -> nn.Module:
        return self.encoder

    def encoder_config(self) -> dict[str, Any]:
        return {"encoder_name": self.encoder_name, "encoder_kwargs": dict(self.encoder_kwargs)}
