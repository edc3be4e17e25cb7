"""I-JEPA multi-block masking (Assran et al., "Self-Supervised Learning from Images with a Joint-Embedding
Predictive Architecture", CVPR 2023, arXiv 2301.08243), used by SALT (stage 1 V-Pixel and stage 2), and V-JEPA's
(Bardes et al. 2024) complement-of-the-union variant.

On a patch grid of ``H x W`` (``N = H * W`` patches), once per call (per batch), block sizes come from a generator
seeded with the call's index (or the training ``step``), as ijepa ``src/masks/multiblock.py`` ``MaskCollator.__call__``
(``g.manual_seed(seed)``, ``seed = self.step()``): the same sequence on every worker, continued on resume.

``style="ijepa"`` (default): one target size, then one context size, each from ONE uniform ``u`` (``_sample_block_size``):
scale ``s = s0 + u (s1 - s0)`` and aspect ``a = a0 + u (a1 - a0)`` share it; ``k = int(N s)``,
``h = round(sqrt(k a))``, ``w = round(sqrt(k / a))``, and each side is kept strictly below the grid
(``while h >= H: h -= 1``). Then per sample: ``num_targets`` target blocks at uniform positions (they may overlap)
and one context block at a uniform position minus the union of the targets. A context must keep more than
``min_keep`` patches (ijepa ``len(mask) > self.min_keep``; its configs set ``min_keep: 10``), else that sample is
redrawn (vectorised over the failing samples). On grids so small that the context block has fewer than ``4 * min_keep``
patches the threshold is a quarter of that block instead (the reference never finds a context there; ViT-B/16 at 224:
a 13x13 block at most, 10 kept).

``style="vjepa"``: V-JEPA's ``multiblock3d._MaskGenerator``: one target size per call from three draws (temporal scale,
consumed; spatial scale; aspect ratio), sides clipped to the grid (``min(h, H)``); per sample ``num_targets`` blocks,
targets = their union, context = its complement (redrawn only when empty). V-JEPA's image-equivalent configuration is two
such mask sets per batch: 8 blocks at scale 0.15 and 2 blocks at scale 0.7, aspect 0.75-1.5 (``configs/pretrain/vitl16.yaml``).

The context keeps the same number of patches in every sample of a batch: each sample's context indices are
sorted and truncated to the batch minimum ``Kc``, as both collators do. Two deliberate differences from the I-JEPA
collator: the block top-left corner is drawn from ``[0, H - h]`` inclusive (its exclusive bound never covers the last
row/column; V-JEPA's is inclusive), and a context that stays too small is redrawn instead of being allowed to overlap
the targets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class MultiBlockMasks:
    """Masks of one batch.

    ``context_idx`` ``[B, Kc]`` sorted visible (context) patch indices; ``target_idx`` ``[B, T, Kt]`` sorted
    patch indices of each target block (``Kt = h_t * w_t``); ``context_mask`` ``[B, N]`` bool (True = in
    ``context_idx``); ``target_mask`` ``[B, N]`` bool (True = in any target block); block sizes as ``(h, w)``.
    """

    context_idx: torch.Tensor
    target_idx: torch.Tensor
    context_mask: torch.Tensor
    target_mask: torch.Tensor
    target_block_size: tuple[int, int]
    context_block_size: tuple[int, int]

    @property
    def flat_target_idx(self) -> torch.Tensor:
        """``[B, T * Kt]``: every target block's indices, concatenated (duplicates where targets overlap)."""
        return self.target_idx.reshape(self.target_idx.shape[0], -1)

    def union_target_idx(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The union of each sample's target blocks (overlaps counted once), padded to the batch maximum.

        Returns ``idx`` ``[B, U]`` (each sample's target patches in raster order, then non-target patches as
        padding) and ``valid`` ``[B, U]`` (bool, False on the padding), ``U = max_b |union_b|``. One host
        synchronisation (the maximum size).
        """
        b, n = self.target_mask.shape
        sizes = self.target_mask.sum(dim=1)
        u = int(sizes.max())
        ar = torch.arange(n, device=self.target_mask.device)
        idx = torch.where(self.target_mask, ar, ar + n).argsort(dim=1)[:, :u]  # targets first, raster order
        valid = torch.arange(u, device=idx.device) < sizes[:, None]
        return idx, valid


def _as_grid(grid: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(grid, int):
        return (grid, grid)
    gh, gw = (int(g) for g in grid)
    return (gh, gw)


def _check_range(name: str, value: tuple[float, float], low: float, high: float | None) -> tuple[float, float]:
    lo, hi = (float(v) for v in value)
    if not (low <= lo <= hi) or (high is not None and hi > high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be (min, max) with min <= max within {bound}, got {value!r}")
    return (lo, hi)


MASK_STYLES = ("ijepa", "vjepa")


class MultiBlockMaskGenerator:
    """Callable ``gen(batch_size, device=..., generator=..., step=...) -> MultiBlockMasks`` on a fixed patch grid.

    :param grid: patch grid ``(H, W)`` (or an int for a square grid).
    :param num_targets: target blocks per sample (I-JEPA / SALT: 4).
    :param context_scale: (min, max) fraction of the grid covered by the context block (``ijepa`` only).
    :param target_scale: (min, max) fraction of the grid covered by each target block.
    :param context_aspect_ratio: (min, max) height / width of the context block (``ijepa`` only).
    :param target_aspect_ratio: (min, max) height / width of the target blocks.
    :param min_keep: a context must have MORE than this many patches (I-JEPA's configs: 10).
    :param max_tries: redraws of the positions (then of the block sizes) before giving up with an error.
    :param style: ``"ijepa"`` (context block minus targets) or ``"vjepa"`` (context = complement of the targets' union).
    """

    def __init__(
        self,
        grid: int | tuple[int, int],
        num_targets: int = 4,
        context_scale: tuple[float, float] = (0.85, 1.0),
        target_scale: tuple[float, float] = (0.15, 0.2),
        context_aspect_ratio: tuple[float, float] = (1.0, 1.0),
        target_aspect_ratio: tuple[float, float] = (0.75, 1.5),
        min_keep: int = 10,
        max_tries: int = 100,
        style: str = "ijepa",
    ):
        self.grid = _as_grid(grid)
        if min(self.grid) < 1:
            raise ValueError(f"grid must be positive, got {grid!r}")
        if num_targets < 1:
            raise ValueError(f"num_targets must be >= 1, got {num_targets}")
        if style not in MASK_STYLES:
            raise ValueError(f"style must be one of {MASK_STYLES}, got {style!r}")
        self.style = style
        self.num_targets = int(num_targets)
        self.context_scale = _check_range("context_scale", context_scale, 0.0, 1.0)
        self.target_scale = _check_range("target_scale", target_scale, 0.0, 1.0)
        self.context_aspect_ratio = _check_range("context_aspect_ratio", context_aspect_ratio, 1e-6, None)
        self.target_aspect_ratio = _check_range("target_aspect_ratio", target_aspect_ratio, 1e-6, None)
        n = self.grid[0] * self.grid[1]
        if not 0 <= min_keep < n:
            raise ValueError(f"min_keep must be in [0, {n - 1}] for a {self.grid} grid, got {min_keep}")
        self.min_keep = int(min_keep)
        self.max_tries = int(max_tries)
        self.calls = 0  # the seed of the next call's block sizes when no step is given

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def block_size(self, scale: tuple[float, float], aspect_ratio: tuple[float, float], generator=None) -> tuple[int, int]:
        """I-JEPA's ``_sample_block_size``: one uniform ``u`` for scale and aspect, ``k = int(N s)``,
        ``h = round(sqrt(k a))``, ``w = round(sqrt(k / a))``, each side at most ``H - 1`` / ``W - 1`` (and >= 1)."""
        gh, gw = self.grid
        u = torch.rand(1, generator=generator).item()
        s = scale[0] + u * (scale[1] - scale[0])
        a = aspect_ratio[0] + u * (aspect_ratio[1] - aspect_ratio[0])
        k = int(self.num_patches * s)
        h = int(round(math.sqrt(k * a)))
        w = int(round(math.sqrt(k / a)))
        return (max(min(h, gh - 1), 1), max(min(w, gw - 1), 1))

    def vjepa_block_size(self, scale: tuple[float, float], aspect_ratio: tuple[float, float], generator=None) -> tuple[int, int]:
        """V-JEPA's ``_sample_block_size`` for one frame: a (consumed) temporal draw, then scale and aspect from their own
        draws; sides clipped to the grid (``min(h, H)``)."""
        gh, gw = self.grid
        _, u_s, u_a = (torch.rand(1, generator=generator).item() for _ in range(3))
        s = scale[0] + u_s * (scale[1] - scale[0])
        a = aspect_ratio[0] + u_a * (aspect_ratio[1] - aspect_ratio[0])
        k = int(self.num_patches * s)
        h = int(round(math.sqrt(k * a)))
        w = int(round(math.sqrt(k / a)))
        return (max(min(h, gh), 1), max(min(w, gw), 1))

    def sizes(self, generator: torch.Generator) -> tuple[tuple[int, int], tuple[int, int], int]:
        """(target size, context size, minimum context patches - 1) of one call."""
        if self.style == "vjepa":  # the context "block" is the whole grid: context = complement of the targets
            return self.vjepa_block_size(self.target_scale, self.target_aspect_ratio, generator), self.grid, 0
        t_size = self.block_size(self.target_scale, self.target_aspect_ratio, generator)
        c_size = self.block_size(self.context_scale, self.context_aspect_ratio, generator)
        # at most a quarter of the context block: on tiny grids (a 3x3 context on 4x4) the reference loops forever
        return t_size, c_size, min(self.min_keep, c_size[0] * c_size[1] // 4)

    def _blocks(self, n: int, count: int, size: tuple[int, int], device, generator) -> torch.Tensor:
        """``[n, count, H, W]`` bool rectangles of ``size`` at uniform top-left corners."""
        gh, gw = self.grid
        h, w = size
        u = torch.rand(2, n, count, generator=generator).to(device)
        top = (u[0] * (gh - h + 1)).long().clamp(max=gh - h)
        left = (u[1] * (gw - w + 1)).long().clamp(max=gw - w)
        rows = torch.arange(gh, device=device)
        cols = torch.arange(gw, device=device)
        in_rows = (rows >= top[..., None]) & (rows < top[..., None] + h)  # [n, count, H]
        in_cols = (cols >= left[..., None]) & (cols < left[..., None] + w)  # [n, count, W]
        return in_rows[..., :, None] & in_cols[..., None, :]

    def _sample_positions(self, batch_size: int, t_size, c_size, keep: int, device, generator):
        n = self.num_patches
        targets = self._blocks(batch_size, self.num_targets, t_size, device, generator).reshape(batch_size, -1, n)
        context = self._blocks(batch_size, 1, c_size, device, generator).reshape(batch_size, n)
        context = context & ~targets.any(dim=1)
        for _ in range(self.max_tries):
            bad = context.sum(dim=1) <= keep  # the reference keeps a context only if len(mask) > min_keep
            if not bool(bad.any()):
                return targets, context
            nb = int(bad.sum())
            targets[bad] = self._blocks(nb, self.num_targets, t_size, device, generator).reshape(nb, -1, n)
            ctx = self._blocks(nb, 1, c_size, device, generator).reshape(nb, n)
            context[bad] = ctx & ~targets[bad].any(dim=1)
        return None

    def __call__(
        self, batch_size: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None,
        step: int | None = None,
    ) -> MultiBlockMasks:
        """Masks of one batch. Block sizes come from a generator seeded with ``step`` (or this generator's call count);
        positions from ``generator`` (default: torch's global generator)."""
        seed = self.calls if step is None else int(step)
        self.calls = seed + 1
        size_generator = torch.Generator().manual_seed(seed)
        n = self.num_patches
        for _ in range(10):
            t_size, c_size, keep = self.sizes(size_generator)
            sampled = self._sample_positions(batch_size, t_size, c_size, keep, device, generator)
            if sampled is not None:
                break
        else:
            raise RuntimeError(
                f"MultiBlockMaskGenerator: no context with > {self.min_keep} patches outside {self.num_targets} "
                f"targets on a {self.grid} grid after repeated redraws (target_scale={self.target_scale}, "
                f"context_scale={self.context_scale}); lower num_targets/target_scale or min_keep"
            )
        targets, context = sampled
        kt = t_size[0] * t_size[1]
        # every target block lies inside the grid, so it has exactly h_t * w_t patches (sorted by nonzero)
        target_idx = targets.nonzero()[:, -1].reshape(batch_size, self.num_targets, kt)
        kc = int(context.sum(dim=1).min())
        ar = torch.arange(n, device=device)
        order_key = torch.where(context, ar, ar + n)  # context patches first, each group in raster order
        context_idx = order_key.argsort(dim=1)[:, :kc]
        context_mask = torch.zeros(batch_size, n, dtype=torch.bool, device=device)
        context_mask.scatter_(1, context_idx, True)
        return MultiBlockMasks(
            context_idx=context_idx,
            target_idx=target_idx,
            context_mask=context_mask,
            target_mask=targets.any(dim=1),
            target_block_size=t_size,
            context_block_size=c_size,
        )


# ---- iBOT / BEiT block-wise masks ---------------------------------------------------------------------------
def sample_mask_ratios(
    shape: tuple[int, ...], mask_ratio: float, mask_ratio_var: float = 0.0, unmasked_fraction: float = 0.0,
    device: torch.device | str = "cpu", generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Per-image prediction ratios, as iBOT's ``ImageFolderMask.get_pred_ratio``: ``r ~ U(m - v, m + v)`` (``m`` if
    ``v = 0``), and ``r = 0`` with probability ``unmasked_fraction`` (iBOT's ``--pred_ratio 0 0.3
    --pred_ratio_var 0 0.2`` = ``random.choice([0, U(0.1, 0.5)])``: ``unmasked_fraction=0.5``)."""
    if not 0.0 <= mask_ratio_var <= mask_ratio:
        raise ValueError(f"mask_ratio_var must be in [0, mask_ratio={mask_ratio}], got {mask_ratio_var}")
    u = torch.rand(2, *shape, generator=generator).to(device)
    ratios = mask_ratio - mask_ratio_var + 2.0 * mask_ratio_var * u[0]
    return torch.where(u[1] < unmasked_fraction, torch.zeros_like(ratios), ratios)


def block_masks(
    grid: tuple[int, int], ratios: torch.Tensor, aspect_ratio: tuple[float, float] = (0.3, 1 / 0.3),
    max_attempts: int = 10, generator: torch.Generator | None = None,
) -> torch.Tensor:
    """BEiT block-wise masks (Bao et al. 2022; iBOT's ``pred_shape='block'``), one per ratio: ``[*ratios.shape, H, W]`` bool.

    The reference, per image with budget ``high = r * H * W``: while fewer than ``high`` patches are masked, try up
    to ``max_attempts`` rectangles: area ``a ~ U(low, high - masked)`` with ``low = (min(H, W) // 3)^2``, aspect
    ``e^U(log ar0, log ar1)``, ``h = round(sqrt(a * ar))``, ``w = round(sqrt(a / ar))``; if ``h < H`` and ``w < W``, a
    uniform top-left corner, and the rectangle is added when it masks ``0 < new <= high - masked`` new patches; the
    image is done once ``masked >= high`` or after ``max_attempts`` failed tries in a row. Here every attempt is one
    round over all unfinished images at once (the same draws per image, vectorised).
    """
    gh, gw = grid
    lead = ratios.shape
    device = ratios.device
    high = ratios.reshape(-1).double() * gh * gw
    n = high.numel()
    mask = torch.zeros(n, gh, gw, dtype=torch.bool, device=device)
    count = torch.zeros(n, dtype=torch.float64, device=device)
    fails = torch.zeros(n, dtype=torch.long, device=device)
    active = count < high
    low = float((min(gh, gw) // 3) ** 2)
    log_lo, log_hi = math.log(aspect_ratio[0]), math.log(aspect_ratio[1])
    rows = torch.arange(gh, device=device)
    cols = torch.arange(gw, device=device)
    while bool(active.any()):
        u = torch.rand(4, n, generator=generator, dtype=torch.float64).to(device)
        budget = high - count
        area = low + u[0] * (budget - low)  # random.uniform(low, budget), also when budget < low
        ar = torch.exp(log_lo + u[1] * (log_hi - log_lo))
        h = torch.round(torch.sqrt(area * ar)).long()
        w = torch.round(torch.sqrt(area / ar)).long()
        fits = (h < gh) & (w < gw)
        h, w = torch.where(fits, h, 0), torch.where(fits, w, 0)
        top = (u[2] * (gh - h + 1)).long().clamp(max=gh - 1)  # random.randint(0, H - h)
        left = (u[3] * (gw - w + 1)).long().clamp(max=gw - 1)
        in_rows = (rows >= top[:, None]) & (rows < (top + h)[:, None])
        in_cols = (cols >= left[:, None]) & (cols < (left + w)[:, None])
        rect = in_rows[:, :, None] & in_cols[:, None, :]
        new = (rect & ~mask).sum(dim=(1, 2)).double()
        ok = active & fits & (new > 0) & (new <= budget)
        mask |= rect & ok[:, None, None]
        count += torch.where(ok, new, 0.0)
        fails = torch.where(ok, 0, fails + active.long())
        active = active & (count < high) & (fails < max_attempts)
    return mask.reshape(*lead, gh, gw)
