"""APL: absolute position learning, a jigsaw-style pretext task without positional embeddings.

From the public repository le0x99/self-supervised-vision-transformers (no paper). An image of side
``image_size`` is cut into a ``G x G`` grid (``T = G^2`` patches of side ``S = image_size // G``); every patch
is centre-cropped to ``S - K`` pixels (so neighbouring patches share no border pixels to "cheat" with) and
encoded, by default by flattening ("MECHANICAL", token dim ``d = C (S - K)^2``). The tokens are shuffled per
sample and contextualised by standard transformer encoder blocks WITHOUT any positional embedding; one
shared linear classifier ``W`` predicts every token's true absolute position:

    loss = (1 / |V|) * sum_{j in V} CE(W h_j, pi(j)),   pi = the sample's permutation, h = contextualised tokens,

where ``V`` are the tokens that count: patch dropout removes a fraction ``patch_dropout`` of the (shuffled)
tokens from the sequence, and with ``method="PLT_MASKED"`` every patch is replaced by Gaussian noise with
probability ``1 / T`` and excluded from the loss. Since nothing carries position, the position must be
inferred from content and context. Evaluation: the embedding is the mean of the contextualised tokens of the
full, unshuffled grid (zero loss).

Mapping from the seed's settings: ``G -> grid_size``, ``CROP -> crop``, ``PDO -> patch_dropout``,
``METHOD -> method``, ``DROPOUT -> dropout``, ``EMB_DO -> emb_dropout``, ``ENCODER_DO -> encoder_dropout``,
``N_BLOCKS -> n_blocks``, ``HEADS -> heads``, ``HIDDEN_MULT -> hidden_mult`` (MLP width = hidden_mult * d),
``NN_HEAD -> nn_head``, ``PROJECT_PATCH_EMB -> project_patch_emb``, ``ENCODER -> encoder``,
``IMAGE_N -> image_size``. The repository's final version (``APL/``) differs from the defaults here in two places,
both available as options: its transformer block (``block="reference"``: post-LN, ReLU feed-forward, Q, K and V
each divided by ``e^(1/4)``, no qkv bias, no final norm) and its ``PatchDropout`` (``patch_dropout_mode="zero"``:
every token is zeroed with probability PDO and stays in the sequence; zeroed tokens do not count in the loss).
Optimiser settings (LEARNING_RATE, WEIGHT_DECAY, BATCH_SIZE, NUM_EPOCHS) belong
to the platform's optim/data spec.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from methods import constraints as C
from methods.base import MethodOutput, SSLMethod
from methods.checkpoint_io import load_state_dict_strict

APL_METHODS = ("PLT", "PLT_MASKED")
APL_ENCODERS = ("MECHANICAL", "LEARNED")
APL_BLOCKS = ("pre_ln", "reference")
APL_PATCH_DROPOUT_MODES = ("remove", "zero")


def zero_tokens(tokens: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's ``PatchDropout``: each token is zeroed with probability ``p`` (a Binomial number per image)
    and stays in the sequence. Returns the tokens and the dropped mask ``[B, T]`` (True = zeroed)."""
    dropped = torch.rand(tokens.shape[:2], device=tokens.device) < p
    return tokens.masked_fill(dropped[..., None], 0.0), dropped


class ReferenceAttention(nn.Module):
    """The reference's multi-head attention: ``Q, K, V = x W_q, x W_k, x W_v`` (no biases), EACH divided by
    ``e^(1/4)`` with ``e`` the full token width, ``Y = softmax(Q K^T) V`` per head, then ``W_u`` (with bias)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.w_q = nn.Linear(width, width, bias=False)
        self.w_k = nn.Linear(width, width, bias=False)
        self.w_v = nn.Linear(width, width, bias=False)
        self.w_u = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, e = x.shape
        scale = e**0.25

        def split(z: torch.Tensor) -> torch.Tensor:
            return (z / scale).view(b, t, self.heads, e // self.heads).transpose(1, 2)

        y = F.scaled_dot_product_attention(split(self.w_q(x)), split(self.w_k(x)), split(self.w_v(x)), scale=1.0)
        return self.w_u(y.transpose(1, 2).reshape(b, t, e))


class ReferenceBlock(nn.Module):
    """The reference's post-LN transformer block: ``x = drop(LN1(attn(x) + x))``, ``x = drop(LN2(ff(x) + x))``,
    ``ff = Linear(e, m e) -> ReLU -> Linear(m e, e)``."""

    def __init__(self, width: int, heads: int, hidden_mult: float, dropout: float):
        super().__init__()
        self.attention = ReferenceAttention(width, heads)
        self.norm1 = nn.LayerNorm(width)
        self.norm2 = nn.LayerNorm(width)
        hidden = int(hidden_mult * width)
        self.ff = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, width))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.norm1(self.attention(x) + x))
        return self.drop(self.norm2(self.ff(x) + x))


@dataclass
class APLOutput(MethodOutput):
    """``loss``; ``embedding`` ``[B, D]``; in training also ``position_accuracy`` (scalar, over counted tokens),
    ``logits`` ``[B, T', T]``, ``labels`` ``[B, T']`` (true positions of the shuffled, kept tokens) and
    ``loss_mask`` ``[B, T']`` (True = counted)."""

    position_accuracy: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    loss_mask: torch.Tensor | None = None


def _checked_patch_side(grid_size: int, crop: int, image_size: int, encoder: str, block: str) -> int:
    """The patch side ``S = image_size // grid_size``, after checking ``block``, ``encoder`` and the grid geometry."""
    if block not in APL_BLOCKS:
        raise ValueError(f"block must be one of {APL_BLOCKS}, got {block!r}")
    if encoder not in APL_ENCODERS:
        raise ValueError(f"encoder must be one of {APL_ENCODERS}, got {encoder!r}")
    side = image_size // grid_size
    if grid_size < 2 or side < 1 or not 0 <= crop < side:
        raise ValueError(
            f"need grid_size >= 2 and 0 <= crop < image_size // grid_size, got grid_size={grid_size}, "
            f"crop={crop}, image_size={image_size} (patch side {side})"
        )
    return side


def _build_blocks(
    block: str, width: int, heads: int, hidden_mult: float, dropout: float, n_blocks: int
) -> tuple[nn.ModuleList, nn.Module]:
    """The ``n_blocks`` transformer blocks and the final norm (``nn.Identity`` for the reference blocks)."""
    if block == "reference":  # post-LN, ReLU, e^(1/4)-scaled Q/K/V, no final norm
        return nn.ModuleList(ReferenceBlock(width, heads, hidden_mult, dropout) for _ in range(n_blocks)), nn.Identity()
    blocks = nn.ModuleList(
        nn.TransformerEncoderLayer(
            width, heads, dim_feedforward=int(hidden_mult * width), dropout=dropout,
            activation="gelu", batch_first=True, norm_first=True,
        )  # fmt: skip
        for _ in range(n_blocks)
    )
    return blocks, nn.LayerNorm(width)


class APLEncoder(nn.Module):
    """Patch encoder + transformer (no positions): ``images [B, C, H, W] -> tokens [B, T, D]`` in grid order."""

    def __init__(
        self,
        grid_size: int = 7,
        crop: int = 1,
        image_size: int = 96,
        in_chans: int = 3,
        encoder: str = "MECHANICAL",
        project_patch_emb: bool = False,
        embed_dim: int | None = None,
        n_blocks: int = 4,
        heads: int = 16,
        hidden_mult: float = 3,
        dropout: float = 0.15,
        emb_dropout: float = 0.0,
        encoder_dropout: float = 0.0,
        block: str = "pre_ln",
    ):
        super().__init__()
        side = _checked_patch_side(grid_size, crop, image_size, encoder, block)
        self.config = {
            "grid_size": grid_size, "crop": crop, "image_size": image_size, "in_chans": in_chans,
            "encoder": encoder, "project_patch_emb": project_patch_emb, "embed_dim": embed_dim,
            "n_blocks": n_blocks, "heads": heads, "hidden_mult": hidden_mult, "dropout": dropout,
            "emb_dropout": emb_dropout, "encoder_dropout": encoder_dropout, "block": block,
        }  # fmt: skip
        self.grid_size, self.crop, self.image_size, self.in_chans = grid_size, crop, image_size, in_chans
        self.side = side
        self.crop_side = side - crop
        self.crop_offset = int(round(crop / 2.0))  # torchvision CenterCrop: round((S - (S - K)) / 2)
        self.num_patches = grid_size * grid_size
        self.patch_dim = in_chans * self.crop_side**2

        self.patch_encoder, width = self._build_patch_encoder(encoder, project_patch_emb, embed_dim)
        if width % heads != 0:
            raise ValueError(f"APL token dim {width} is not divisible by heads={heads}")
        self.embed_dim = width
        self.encoder_drop = nn.Dropout(encoder_dropout)
        self.emb_drop = nn.Dropout(emb_dropout)
        self.blocks, self.norm = _build_blocks(block, width, heads, hidden_mult, dropout, n_blocks)

    def _build_patch_encoder(self, encoder: str, project_patch_emb: bool, embed_dim: int | None) -> tuple[nn.Module, int]:
        """The per-patch encoder ``[B*T, C, k, k] -> [B*T, width]`` and its token width (needs ``patch_dim``)."""
        if encoder == "LEARNED":
            width = embed_dim or self.patch_dim
            return nn.Sequential(
                nn.Conv2d(self.in_chans, 32, 3, padding=1),
                nn.GELU(),
                nn.Conv2d(32, 32, 3, padding=1),
                nn.GELU(),
                nn.Flatten(),
                nn.Linear(32 * self.crop_side**2, width),
            ), width
        if project_patch_emb:
            width = embed_dim or self.patch_dim
            return nn.Sequential(nn.Flatten(), nn.Linear(self.patch_dim, width)), width
        if embed_dim not in (None, self.patch_dim):
            raise ValueError(
                f"MECHANICAL encoding without project_patch_emb has dim C*(S-K)^2 = {self.patch_dim}; "
                f"embed_dim={embed_dim} needs project_patch_emb=True"
            )
        return nn.Flatten(), self.patch_dim

    def patches(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W] -> [B, T, C, S-K, S-K]``: row-major G x G grid, each patch centre-cropped by K."""
        b, c, h, w = images.shape
        if (h, w) != (self.image_size, self.image_size) or c != self.in_chans:
            raise ValueError(f"APL expects images [B, {self.in_chans}, {self.image_size}, {self.image_size}], got {tuple(images.shape)}")
        g, s, o, k = self.grid_size, self.side, self.crop_offset, self.crop_side
        x = images[:, :, : g * s, : g * s].reshape(b, c, g, s, g, s).permute(0, 2, 4, 1, 3, 5)
        return x[..., o : o + k, o : o + k].reshape(b, g * g, c, k, k)

    def encode_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """``[B, T, C, k, k] -> [B, T, D]``."""
        b, t = patches.shape[:2]
        tokens = self.patch_encoder(patches.reshape(b * t, *patches.shape[2:]))
        return self.encoder_drop(tokens.reshape(b, t, -1))

    def contextualise(self, tokens: torch.Tensor) -> torch.Tensor:
        """Transformer blocks on a token set (no positions: permutation-equivariant)."""
        x = self.emb_drop(tokens)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, images: torch.Tensor, patch_dropout: float = 0.0) -> torch.Tensor:
        """Contextualised tokens ``[B, T, D]``; ``patch_dropout > 0`` zeroes tokens first (:func:`zero_tokens`, the
        reference Tuner's PDO while fine-tuning)."""
        tokens = self.encode_patches(self.patches(images))
        if patch_dropout > 0:
            tokens, _ = zero_tokens(tokens, patch_dropout)
        return self.contextualise(tokens)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Mean of the contextualised tokens: ``[B, D]``."""
        return self(images).mean(dim=1)


def build_apl_encoder(encoder_kwargs: dict[str, Any]) -> APLEncoder:
    """Rebuild the exported encoder from ``APL.encoder_config()["encoder_kwargs"]``."""
    return APLEncoder(**encoder_kwargs)


class APLEmbedding(nn.Module):
    """An :class:`APLEncoder` whose ``forward`` is the embedding ``[B, D]`` (mean token), for a model registry."""

    def __init__(self, encoder: APLEncoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder.embed(images)


class APL(SSLMethod):
    """Absolute position learning (seed setting names in the module docstring).

    :param grid_size: G, patches per side (T = G^2 classes).
    :param crop: K, pixels removed by the centre crop of each patch.
    :param patch_dropout: PDO, fraction of tokens dropped from the sequence (loss on kept tokens only).
    :param method: ``"PLT_MASKED"`` (patches replaced by noise with prob. 1/T, not counted) or ``"PLT"``.
    :param dropout: DROPOUT inside the transformer blocks.
    :param n_blocks: N_BLOCKS transformer encoder blocks.
    :param heads: HEADS attention heads (must divide the token dim).
    :param hidden_mult: HIDDEN_MULT, MLP width / token dim.
    :param image_size: IMAGE_N, input side in pixels.
    :param encoder: ENCODER, ``"MECHANICAL"`` (flatten) or ``"LEARNED"`` (small conv net per patch).
    :param project_patch_emb: PROJECT_PATCH_EMB, learned linear projection of the flattened patch.
    :param embed_dim: token width with a learned encoder / projection (default: the flattened patch dim).
    :param emb_dropout: EMB_DO, dropout on the tokens entering the transformer.
    :param encoder_dropout: ENCODER_DO, dropout on the patch encodings.
    :param nn_head: NN_HEAD, a two-layer MLP classifier instead of the linear one.
    :param in_chans: image channels.
    :param block: extension: ``"pre_ln"`` (default: pre-LN GELU blocks with a final LayerNorm) or ``"reference"``
        (the repository's block: post-LN, ReLU feed-forward, Q/K/V scaled by ``e^(1/4)``, no qkv bias, no final norm).
    :param patch_dropout_mode: extension: ``"remove"`` (default: ``round(PDO T)`` tokens leave the sequence) or
        ``"zero"`` (the repository's ``PatchDropout``: each token zeroed with probability PDO, kept in the sequence,
        not counted in the loss).
    """

    method_name = "apl"

    input_mean = (0.5, 0.5, 0.5)  # the reference's Normalize((0.5,), (0.5,)) (APL/PreTrainer.py, pt_train_transforms)
    input_std = (0.5, 0.5, 0.5)
    constraints = (
        C.OneOf("method", APL_METHODS),
        C.OneOf("encoder", APL_ENCODERS),
        C.InRange("patch_dropout", 0.0, 1.0, high_open=True),  # a dropped fraction of 1 leaves no token
        C.unit_interval("dropout"),
        C.positive_int("n_blocks"),
        C.positive_int("embed_dim", optional=True),  # None: the flattened patch dim
        C.OneOf("block", APL_BLOCKS),
        C.OneOf("patch_dropout_mode", APL_PATCH_DROPOUT_MODES),
    )

    def __init__(
        self,
        grid_size: int = 7,
        crop: int = 1,
        patch_dropout: float = 0.1,
        method: str = "PLT_MASKED",
        dropout: float = 0.15,
        n_blocks: int = 4,
        heads: int = 16,
        hidden_mult: float = 3,
        image_size: int = 96,
        encoder: str = "MECHANICAL",
        project_patch_emb: bool = False,
        embed_dim: int | None = None,
        emb_dropout: float = 0.0,
        encoder_dropout: float = 0.0,
        nn_head: bool = False,
        in_chans: int = 3,
        block: str = "pre_ln",
        patch_dropout_mode: str = "remove",
    ):
        super().__init__()
        self.check_kwargs({"method": method, "encoder": encoder, "patch_dropout": patch_dropout, "dropout": dropout,
                           "n_blocks": n_blocks, "embed_dim": embed_dim, "block": block,
                           "patch_dropout_mode": patch_dropout_mode})
        self.patch_dropout_mode = patch_dropout_mode
        self.method = method
        self.patch_dropout = patch_dropout
        self.encoder = APLEncoder(
            grid_size=grid_size, crop=crop, image_size=image_size, in_chans=in_chans, encoder=encoder,
            project_patch_emb=project_patch_emb, embed_dim=embed_dim, n_blocks=n_blocks, heads=heads,
            hidden_mult=hidden_mult, dropout=dropout, emb_dropout=emb_dropout, encoder_dropout=encoder_dropout,
            block=block,
        )  # fmt: skip
        t, d = self.encoder.num_patches, self.encoder.embed_dim
        self.num_classes = t
        if nn_head:
            self.classifier: nn.Module = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, t))
        else:
            self.classifier = nn.Linear(d, t)

    def forward(self, images: torch.Tensor) -> APLOutput:
        """Training: shuffled, partly dropped/masked patches -> position classification. Eval: mean token."""
        enc = self.encoder
        if not self.training:
            with torch.no_grad():
                emb = enc.embed(images)
            return APLOutput(loss=torch.zeros((), device=images.device), embedding=emb)

        patches = enc.patches(images)  # [B, T, C, k, k]
        b, t = patches.shape[:2]
        dev = images.device
        counted = torch.ones(b, t, dtype=torch.bool, device=dev)
        if self.method == "PLT_MASKED":
            noised = torch.rand(b, t, device=dev) < 1.0 / t
            patches = torch.where(noised[..., None, None, None], torch.randn_like(patches), patches)
            counted = ~noised
        perm = torch.rand(b, t, device=dev).argsort(dim=1)  # slot j holds the patch from position perm[:, j]
        zeroing = self.patch_dropout_mode == "zero"
        n_keep = t if zeroing else max(1, t - int(round(self.patch_dropout * t)))
        labels = perm[:, :n_keep]  # the first n_keep shuffled tokens are a uniform random subset
        kept = torch.gather(patches, 1, labels[:, :, None, None, None].expand(-1, -1, *patches.shape[2:]))
        counted = torch.gather(counted, 1, labels)
        tokens = enc.encode_patches(kept)
        if zeroing:  # dropped tokens stay in the sequence as zeros and do not count
            tokens, dropped = zero_tokens(tokens, self.patch_dropout)
            counted = counted & ~dropped

        h = enc.contextualise(tokens)  # [B, n_keep, D]
        logits = self.classifier(h)  # [B, n_keep, T]
        ce = F.cross_entropy(logits.reshape(-1, t).float(), labels.reshape(-1), reduction="none").reshape(b, n_keep)
        w = counted.float()
        loss = (ce * w).sum() / w.sum().clamp(min=1.0)
        correct = (logits.argmax(dim=-1) == labels).float()
        acc = ((correct * w).sum() / w.sum().clamp(min=1.0)).detach()
        return APLOutput(
            loss=loss, embedding=h.mean(dim=1).detach(), position_accuracy=acc, logits=logits, labels=labels, loss_mask=counted
        )

    def export_encoder(self) -> nn.Module:
        return self.encoder

    def encoder_config(self) -> dict[str, Any]:
        """``{"encoder_name": "apl", "encoder_kwargs": {...}}``: rebuild with :func:`build_apl_encoder`."""
        return {"encoder_name": "apl", "encoder_kwargs": dict(self.encoder.config)}

    @classmethod
    def embedding_encoder(
        cls, encoder_config: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor]
    ) -> tuple[nn.Module, tuple[int, int, int]]:
        """:class:`APLEmbedding` of the rebuilt encoder, and the ``(C, H, W)`` it takes."""
        enc = build_apl_encoder(dict(encoder_config["encoder_kwargs"]))
        load_state_dict_strict(enc, state_dict, "APL encoder")
        return APLEmbedding(enc), (enc.in_chans, enc.image_size, enc.image_size)
