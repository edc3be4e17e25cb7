"""Shared ViT parts: timm encoder construction, masked encoding, random masking, 2-D sin-cos positions.

Every ViT-based method (MAE, SALT, iBOT, data2vec, DINO) builds its encoder with :func:`create_vit` and runs
it through these helpers, so masking is written once. Encoders are plain ``timm`` VisionTransformers
(``num_classes=0``), which keeps exported weights loadable with ``timm.create_model(name, **kwargs)``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.models._manipulate import checkpoint_seq
from timm.models.beit import Beit
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel


def create_vit(encoder_name: str, encoder_kwargs: dict[str, Any] | None = None, pretrained: bool = False) -> nn.Module:
    """``timm.create_model(encoder_name, num_classes=0, **encoder_kwargs)``, checked to be a ViT (a timm
    ``VisionTransformer``, or a timm ``Beit``: BEiT / data2vec's encoder with relative position biases)."""
    kwargs = dict(encoder_kwargs or {})
    kwargs.setdefault("num_classes", 0)
    model = timm.create_model(encoder_name, pretrained=pretrained, **kwargs)
    for attr in ("patch_embed", "blocks", "norm") + (() if is_beit(model) else ("_pos_embed",)):
        if not hasattr(model, attr):
            raise ValueError(
                f"encoder_name {encoder_name!r} is not a timm VisionTransformer (missing {attr!r}); "
                "masked methods need a ViT such as 'vit_tiny_patch16_224'"
            )
    return model


def is_beit(vit: nn.Module) -> bool:
    """A timm ``Beit`` (its blocks take the shared relative position bias; no ``_pos_embed``)."""
    return isinstance(vit, Beit)


def num_prefix_tokens(vit: nn.Module) -> int:
    return int(getattr(vit, "num_prefix_tokens", 0))


def patch_size(vit: nn.Module) -> int:
    p = vit.patch_embed.patch_size
    return int(p[0] if isinstance(p, (tuple, list)) else p)


def grid_shape(vit: nn.Module, images: torch.Tensor) -> tuple[int, int]:
    p = patch_size(vit)
    return images.shape[-2] // p, images.shape[-1] // p


def embed_patches(
    vit: nn.Module,
    images: torch.Tensor,
    mask: torch.Tensor | None = None,
    mask_token: torch.Tensor | None = None,
) -> torch.Tensor:
    """Patch embedding + prefix tokens + positions: ``[B, P + N, D]`` (P prefix tokens, N patches).

    With ``mask`` (``[B, N]``, 1/True = masked) the masked patch embeddings are replaced by ``mask_token``
    (``[1, 1, D]``) *before* positions are added, as in BEiT/iBOT/data2vec.
    """
    x = vit.patch_embed(images)  # [B, N, D] or [B, H, W, D] with dynamic_img_size
    if mask is not None:
        if mask_token is None:
            raise ValueError("embed_patches: a mask needs a mask_token")
        shape = x.shape
        flat = x.reshape(shape[0], -1, shape[-1])
        # one pass, the same values and gradients as ``x (1 - m) + t m`` for a 0/1 mask
        flat = torch.where(mask.reshape(shape[0], -1, 1).bool(), mask_token.to(flat.dtype), flat)
        x = flat.reshape(shape)
    return add_pos_embed(vit, x)


def resample_patch_pos_embed(pos: torch.Tensor, new_grid: tuple[int, int], old_grid: tuple[int, int]) -> torch.Tensor:
    """``[1, Ho * Wo, D] -> [1, H * W, D]`` as DINO's ``interpolate_pos_encoding`` (vision_transformer.py:174; iBOT's
    copy is the same): plain bicubic, ``F.interpolate(grid, scale_factor=((H + 0.1) / Ho, (W + 0.1) / Wo),
    mode="bicubic")`` (``align_corners=False``, no antialiasing: timm's ``resample_abs_pos_embed`` antialiases when it
    shrinks). The scale factor, not the size, sets the sampling positions, as in DINO. Computed in float32."""
    (h, w), (h0, w0) = new_grid, old_grid
    d = pos.shape[-1]
    grid = pos.float().reshape(1, h0, w0, d).permute(0, 3, 1, 2)
    out = F.interpolate(grid, scale_factor=((h + 0.1) / h0, (w + 0.1) / w0), mode="bicubic", align_corners=False)
    if tuple(out.shape[-2:]) != (h, w):
        raise ValueError(f"resampled position grid {tuple(out.shape[-2:])} != {(h, w)}")
    return out.permute(0, 2, 3, 1).reshape(1, h * w, d).to(pos.dtype)


def add_pos_embed(vit: nn.Module, x: torch.Tensor, antialias: bool = False) -> torch.Tensor:
    """Prefix tokens + positions for patch embeddings ``x`` (timm's ``_pos_embed``): ``[B, P + N, D]``.

    At another grid than the encoder's (``dynamic_img_size``: DINO / iBOT local crops) the patch positions are
    resampled by :func:`resample_patch_pos_embed` (DINO's plain bicubic); ``antialias=True`` keeps timm's own
    ``resample_abs_pos_embed`` (bicubic with antialiasing). A timm ``Beit`` gets its CLS token and absolute positions,
    if any (BEiT / data2vec put positions in per-block relative biases instead)."""
    if is_beit(vit):
        x = torch.cat([vit.cls_token.expand(x.shape[0], -1, -1), x.reshape(x.shape[0], -1, x.shape[-1])], dim=1)
        return vit.pos_drop(x if vit.pos_embed is None else x + vit.pos_embed)
    old = tuple(int(g) for g in vit.patch_embed.grid_size)
    if antialias or x.ndim != 4 or vit.pos_embed is None or tuple(x.shape[1:3]) == old:
        return vit._pos_embed(x)
    b, h, w, d = x.shape
    n_prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
    pos = vit.pos_embed
    pos = torch.cat([pos[:, :n_prefix], resample_patch_pos_embed(pos[:, n_prefix:], (h, w), old)], dim=1)
    x = x.reshape(b, h * w, d)
    prefix = [t.expand(b, -1, -1) for t in (vit.cls_token, vit.reg_token) if t is not None]
    if vit.no_embed_class:  # positions for the patches only, prefix tokens concatenated after
        x = torch.cat([*prefix, x + pos], dim=1)
    else:
        x = torch.cat([*prefix, x], dim=1) + pos
    return vit.pos_drop(x)


def block_outputs(vit: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """``norm_pre`` then every block's output (before the final norm), block by block; a ``Beit``'s blocks get its
    shared relative position bias (``Beit.forward_features``)."""
    x = getattr(vit, "norm_pre", nn.Identity())(x)
    kwargs = {}
    if is_beit(vit) and vit.rel_pos_bias is not None:
        kwargs["shared_rel_pos_bias"] = vit.rel_pos_bias()
    outputs = []
    for block in vit.blocks:
        x = block(x, **kwargs)
        outputs.append(x)
    return outputs


def run_blocks(vit: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``norm_pre -> blocks -> norm`` of a token sequence that already carries positions."""
    if is_beit(vit):
        return vit.norm(block_outputs(vit, x)[-1])
    x = vit.norm_pre(x)
    x = vit.blocks(x)
    return vit.norm(x)


def per_token_norm(vit: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Tokens from :func:`run_blocks` with the encoder's final LayerNorm applied to EVERY token.

    timm moves that norm after pooling for ``global_pool='avg'`` (``norm`` is ``Identity``, ``fc_norm``
    normalises the pooled vector), so the patch tokens are then the raw residual stream; this applies
    ``fc_norm`` per token in that case and returns ``tokens`` unchanged when ``norm`` already did it. Used where
    the papers take "final-norm tokens": SALT's targets and predictor input, MAE's decoder input and data2vec's
    regression-head input.
    """
    if isinstance(vit.norm, nn.Identity) and isinstance(getattr(vit, "fc_norm", None), nn.LayerNorm):
        return vit.fc_norm(tokens)
    return tokens


# Attention backends for sequences whose length changes from step to step (I-JEPA / SALT context sets): all but
# cuDNN's, which builds an execution plan for every new length. Measured on an H100 (ViT-S/16, batch 128, bf16):
# SALT's step took 335 ms with cuDNN attention and per-step masks, 86 ms without it, 74 ms with fixed masks.
VARIABLE_LENGTH_SDPA_BACKENDS = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)


def variable_length_attention(enabled: bool = True):
    """Context manager: ``scaled_dot_product_attention`` (forward and backward) without the cuDNN backend; with
    ``enabled=False`` (sequences of a fixed length) it changes nothing."""
    return sdpa_kernel(list(VARIABLE_LENGTH_SDPA_BACKENDS)) if enabled else contextlib.nullcontext()


def keep_tokens(x: torch.Tensor, keep_idx: torch.Tensor, n_prefix: int) -> torch.Tensor:
    """Keep the prefix tokens and the patch tokens at ``keep_idx`` (``[B, K]`` indices into the patches)."""
    patches = x[:, n_prefix:]
    kept = torch.gather(patches, 1, keep_idx.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
    return torch.cat([x[:, :n_prefix], kept], dim=1)


def encode_visible(vit: nn.Module, images: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
    """Encode only the visible patches (MAE / SALT student): ``[B, P + K, D]`` after the final norm."""
    x = embed_patches(vit, images)
    return run_blocks(vit, keep_tokens(x, keep_idx, num_prefix_tokens(vit)))


def encode_full(vit: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """All tokens of the full image after the final norm: ``[B, P + N, D]``."""
    return run_blocks(vit, embed_patches(vit, images))


def pooled_embedding(vit: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """timm's own pooling of final tokens (CLS token, or mean of patches for ``global_pool='avg'``)."""
    return vit.forward_head(tokens, pre_logits=True)


def cls_embedding(vit: nn.Module, images: torch.Tensor, antialias: bool = False) -> torch.Tensor:
    """``vit(images)`` of a ViT pooled by its CLS token (``global_pool='token'``: DINO), with the last block
    computed for the CLS row only.

    The pooled output depends on the last block only through its CLS row, and that row needs the keys and values
    of every token but the query, attention row, projection and MLP of the CLS token alone (:func:`cls_row_of_block`):
    about 5/6 of the last block's FLOPs, forward and backward, are not spent (1/12 of a 12-block encoder). The
    result is ``vit(images)``'s (tested, values and gradients). Any other timm ViT (other pooling, gated attention,
    gradient checkpointing) runs :func:`forward_features` and its head; a non-timm module runs ``vit(images)``. Positions
    of another grid are resampled by :func:`add_pos_embed` (DINO's plain bicubic unless ``antialias``).
    """
    if not _cls_row_supported(vit):
        return vit.forward_head(forward_features(vit, images, antialias)) if _is_timm_vit(vit) else vit(images)
    x = vit.norm_pre(vit.patch_drop(add_pos_embed(vit, vit.patch_embed(images), antialias)))
    for block in vit.blocks[:-1]:
        x = block(x)
    return vit.forward_head(vit.norm(cls_row_of_block(vit.blocks[-1], x)))


def _is_timm_vit(vit: nn.Module) -> bool:
    return isinstance(vit, VisionTransformer)


def forward_features(vit: nn.Module, images: torch.Tensor, antialias: bool = False) -> torch.Tensor:
    """timm's ``VisionTransformer.forward_features`` with positions from :func:`add_pos_embed`."""
    x = vit.norm_pre(vit.patch_drop(add_pos_embed(vit, vit.patch_embed(images), antialias)))
    if getattr(vit, "grad_checkpointing", False) and torch.is_grad_enabled():
        x = checkpoint_seq(vit.blocks, x)
    else:
        x = vit.blocks(x)
    return vit.norm(x)


def _cls_row_supported(vit: nn.Module) -> bool:
    if not isinstance(vit, VisionTransformer) or vit.global_pool != "token" or vit.attn_pool is not None:
        return False
    if getattr(vit, "grad_checkpointing", False) or len(vit.blocks) == 0:
        return False
    return split_block_supported(vit.blocks[-1])


def split_block_supported(block: nn.Module) -> bool:
    """``block`` is a plain timm ``Block`` with timm's ``Attention`` (no gate), which :func:`block_rows` and
    :func:`packed_block` compute piece by piece."""
    from timm.layers.attention import Attention
    from timm.models.vision_transformer import Block

    attn = getattr(block, "attn", None)
    known = all(hasattr(attn, name) for name in ("qkv", "num_heads", "head_dim", "q_norm", "k_norm", "proj", "norm"))
    return type(block) is Block and type(attn) is Attention and known and getattr(attn, "gate", None) is None


def cls_row_of_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``block(x)[:, :1]`` of a timm ``Block`` (pre-norm attention + MLP, timm's ``Attention``) computed for the
    first token's row only: ``c' = c + attn(norm1(x))_0``, ``c'' = c' + mlp(norm2(c'))``, where the attention row
    is ``softmax(q_0 K^T / sqrt(d)) V`` with ``K, V`` of every token."""
    return _block_at(block, x, lambda t: t[:, :1])


def block_rows(block: nn.Module, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``gather(block(x), 1, rows)`` of a timm ``Block`` computed for those rows only (``rows`` ``[B, R]`` token
    indices): keys and values of every token, query, attention row, projection and MLP of the ``R`` rows alone,
    ``c'_r = x_r + attn(norm1(x))_r``, ``c''_r = c'_r + mlp(norm2(c'_r))`` -> ``[B, R, D]``."""
    return _block_at(block, x, lambda t: torch.gather(t, 1, rows[..., None].expand(-1, -1, t.shape[-1])))


def _block_at(block: nn.Module, x: torch.Tensor, pick: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The rows ``pick(.)`` selects of ``block(x)`` (``pick``: ``[B, N, C] -> [B, R, C]``), queries only for them."""
    attn = block.attn
    b, n, _ = x.shape
    h = block.norm1(x)
    heads, head_dim = attn.num_heads, attn.head_dim
    dim = heads * head_dim
    weight, bias = attn.qkv.weight, attn.qkv.bias
    q = F.linear(pick(h), weight[:dim], None if bias is None else bias[:dim])
    r = q.shape[1]
    kv = F.linear(h, weight[dim:], None if bias is None else bias[dim:])
    q = q.reshape(b, r, heads, head_dim).transpose(1, 2)
    k, v = kv.reshape(b, n, 2, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    o = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    o = attn.proj_drop(attn.proj(attn.norm(o.transpose(1, 2).reshape(b, r, dim))))
    c = pick(x) + block.drop_path1(block.ls1(o))
    return c + block.drop_path2(block.ls2(block.mlp(block.norm2(c))))


def packed_block(
    block: nn.Module, x: torch.Tensor, rows: torch.Tensor, shape: tuple[int, int], attn_mask: torch.Tensor | None
) -> torch.Tensor:
    """``block(padded, attn_mask)`` at the rows that exist, for a timm ``Block`` whose batch ``[B, L]`` is padded:
    ``x`` ``[M, D]`` holds only the ``M`` real rows (``rows``: their flat indices into ``B * L``, ascending).

    Every per-token part (norms, qkv, projection, MLP, residuals) runs on the ``M`` rows; only the attention sees the
    padded layout (queries, keys and values scattered into zeros at the padding, which ``attn_mask`` ``[B, 1, 1, L]``
    must hide as keys). The real rows equal those of the padded block (tested): padding changes no real row's output."""
    attn = block.attn
    b, length = shape
    heads, head_dim = attn.num_heads, attn.head_dim
    qkv = attn.qkv(block.norm1(x))  # [M, 3D]
    full = qkv.new_zeros(b * length, qkv.shape[-1]).index_copy(0, rows, qkv)
    q, k, v = full.reshape(b, length, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    o = o.transpose(1, 2).reshape(b * length, heads * head_dim).index_select(0, rows)
    x = x + block.drop_path1(block.ls1(attn.proj_drop(attn.proj(attn.norm(o)))))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def random_masking(
    batch_size: int, num_patches: int, mask_ratio: float, device: torch.device | str, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample uniform random masking (MAE), vectorised with ``argsort`` of uniform noise.

    Returns ``keep_idx`` ``[B, K]`` (sorted visible patch indices, ``K = N - round(N * mask_ratio)``) and
    ``mask`` ``[B, N]`` (bool, True = masked).
    """
    n_mask = int(round(num_patches * mask_ratio))
    n_mask = min(max(n_mask, 0), num_patches - 1)
    noise = torch.rand(batch_size, num_patches, device=device, generator=generator)
    order = noise.argsort(dim=1)
    keep_idx = order[:, n_mask:].sort(dim=1).values
    mask = torch.ones(batch_size, num_patches, dtype=torch.bool, device=device)
    mask.scatter_(1, keep_idx, False)
    return keep_idx, mask


def patchify(images: torch.Tensor, p: int) -> torch.Tensor:
    """``[B, C, H, W] -> [B, N, p*p*C]`` in row-major patch order (the order of timm's patch tokens)."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // p, p, w // p, p)
    x = torch.einsum("bchpwq->bhwpqc", x)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: torch.Tensor, p: int, grid: tuple[int, int], channels: int = 3) -> torch.Tensor:
    b = patches.shape[0]
    gh, gw = grid
    x = patches.reshape(b, gh, gw, p, p, channels)
    x = torch.einsum("bhwpqc->bchpwq", x)
    return x.reshape(b, channels, gh * p, gw * p)


def sincos_pos_embed_2d(dim: int, grid: tuple[int, int], device=None, columns_first: bool = False) -> torch.Tensor:
    """Fixed 2-D sin-cos positional embedding (MAE, I-JEPA): ``[gh * gw, dim]`` in raster order.

    Half the channels encode the row, half the column; each half is ``[sin(pos * w_k), cos(pos * w_k)]`` with
    ``w_k = 1 / 10000^(2k / (dim/2))``. ``columns_first=True`` is MAE's exact layout (``get_2d_sincos_pos_embed``
    builds its grid with ``np.meshgrid(grid_w, grid_h)``, so its first half encodes the column); the default puts the
    row first. The two differ by a fixed permutation of channels, which a following learned linear layer at random
    init cannot tell apart (the MAE decoder and SALT predictor use the default).
    """
    if dim % 4 != 0:
        raise ValueError(f"sin-cos 2-D positional embedding needs dim divisible by 4, got {dim}")
    gh, gw = grid
    rows = torch.arange(gh, dtype=torch.float64, device=device)
    cols = torch.arange(gw, dtype=torch.float64, device=device)
    rr, cc = torch.meshgrid(rows, cols, indexing="ij")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64, device=device) / quarter)

    def enc(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1, 1) * omega.reshape(1, -1)
        return torch.cat([out.sin(), out.cos()], dim=1)

    halves = [enc(cc), enc(rr)] if columns_first else [enc(rr), enc(cc)]
    return torch.cat(halves, dim=1).float()


@torch.no_grad()
def fix_sincos_pos_embed_(vit: nn.Module) -> None:
    """MAE's encoder positions: ``pos_embed`` <- fixed 2-D sin-cos (MAE's layout, zeros for prefix tokens), frozen."""
    pos = vit.pos_embed
    grid = tuple(int(g) for g in vit.patch_embed.grid_size)
    table = sincos_pos_embed_2d(pos.shape[-1], grid, device=pos.device, columns_first=True)
    n_prefix = pos.shape[1] - table.shape[0]
    if pos.ndim != 3 or n_prefix < 0:
        raise ValueError(f"fixed sin-cos positions need a pos_embed [1, P + {table.shape[0]}, D], got {tuple(pos.shape)}")
    pos.zero_()
    pos[0, n_prefix:] = table.to(pos.dtype)
    pos.requires_grad_(False)


@torch.no_grad()
def mae_init_(module: nn.Module) -> None:
    """MAE's ``initialize_weights`` for everything it applies to: every ``nn.Linear`` xavier-uniform with zero bias,
    LayerNorms (1, 0), a patch-embedding convolution xavier-uniform as the linear map it is (``[out, in*p*p]``), and
    CLS / mask tokens ``N(0, 0.02)``."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d) and m.kernel_size == m.stride:  # the patch embedding
            nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
    for name, p in module.named_parameters():
        if name.rsplit(".", 1)[-1] in ("cls_token", "mask_token"):
            nn.init.normal_(p, std=0.02)


def trunc_normal_init(module: nn.Module) -> None:
    """timm/MAE initialisation for linear and norm layers of heads and decoders."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def head_dim_ok(dim: int, heads: int, what: str) -> None:
    if dim % heads != 0:
        raise ValueError(f"{what}: embed dim {dim} is not divisible by num_heads {heads}")


def count_patches(vit: nn.Module, image_size: int) -> int:
    p = patch_size(vit)
    return (image_size // p) ** 2

