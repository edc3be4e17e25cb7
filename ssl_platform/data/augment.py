"""Batched view augmentation on the worker's device: a uint8 batch in, the method's training views out.

Replaces the per-sample CPU transforms (``benchmarks.per_sample_views``: ``SingleViewTransform``, ``MultiCropTransform``) with
the same distributions drawn per sample but applied to the whole batch at once, on the GPU when there is one:

* **Input** ``images`` uint8 ``[B, 3, C, C]``: a *canvas* per image (resized on the CPU so that it fits ``C x C``
  with its aspect ratio kept, top-left, zero padded) and ``sizes`` int ``[B, 2]``, the valid ``(height, width)``
  of each image (``None``: the whole canvas). Crops lie inside the valid region and resampling never reads
  outside a crop, so the padding never reaches a view.
* **Random resized crop** (Szegedy et al. 2015; torchvision's ``RandomResizedCrop.get_params``): per sample,
  10 tries of area ``s * h * w`` with ``s ~ U(scale)`` and aspect ratio ``r = exp(U(log ratio))``,
  ``w' = round(sqrt(s h w r))``, ``h' = round(sqrt(s h w / r))``; the first try with ``0 < w' <= w`` and
  ``0 < h' <= h`` is placed uniformly (``top ~ U{0..h-h'}``, ``left ~ U{0..w-w'}``), else torchvision's centre-crop
  fallback. ``(h, w)`` is the sample's valid region, so crops never touch padding. All tries of all samples are
  one tensor op.
* **Crop + resize:** torchvision's antialiased resize of each crop (``resized_crop(..., antialias=True)``: the
  triangle (bilinear) or Keys cubic (bicubic, ``a = -0.5``) filter stretched by the downscaling factor, as
  Pillow), bicubic for DINO / iBOT views as their ``RandomResizedCrop`` and the method's ``view_interpolation`` for
  the single view (MAE: bicubic, its ``RandomResizedCrop(..., interpolation=3)``; default bilinear). On the
  CPU each crop is one call of PyTorch's vectorised uint8 kernel on its slice of the channels-last batch (the
  per-sample path's own kernel, so the pixels are the same); on a GPU a vectorised float resampler computes the
  same taps for all crops at once (two separable passes of gathered rows, rounded to uint8 levels after each pass
  as the uint8 kernel does; within a level or two of it). A horizontal flip reverses the crop.
* **Colour jitter** (torchvision ``ColorJitter`` semantics: factors ``b ~ U(1 +- brightness)``,
  ``c ~ U(1 +- contrast)``, ``s ~ U(1 +- saturation)``, hue shift ``~ U(+-hue)``, applied in a random order, each
  step clamped to [0, 1]) with the **order drawn per sample**. Brightness, contrast and saturation are one blend
  ``clamp(a x + (1 - a) t)`` with target ``t = 0``, the image's mean grey, or its grey image; the hue shift is
  applied once to every sample (``0`` where it is not drawn) between three blend slots before and three after
  it: each sample puts its ops before hue into the slots just before it and the others just after (identity
  ``a = 1`` in the unused slots), so every one of the 24 orders is applied exactly with 6 blends + 1 hue pass.
  The hue shift rotates the hue of HSV (``h' = h + d mod 1``) in closed form, ``rgb = min + (max - min) *
  f_c(6 h')`` with torchvision's piecewise-linear ``f_c``, without building the HSV image.
* **Grayscale** (ITU-R 601-2 luma, as torchvision), **Gaussian blur** (per-sample ``sigma ~ U(0.1, 2)``,
  torchvision's kernel and reflect padding, as two separable depthwise convolutions: ``2k`` instead of ``k^2``
  multiply-adds per pixel; a unit impulse where no blur is drawn), **solarisation** (``x >= 0.5 -> 1 - x``),
  **normalisation** with the method's ``input_mean / input_std`` (:class:`methods.base.SSLMethod`; ImageNet's
  statistics for DINO, iBOT, MAE, data2vec, SALT; 0.5 / 0.5 for APL), the same in evaluation (:func:`eval_views`).

Every random parameter is a tensor of one value per view and sample, drawn from ``generator`` (reproducible) on
the generator's device. On a GPU no Python loop runs over samples: every step runs on every row with identity
parameters where a row did not draw it, and nothing is read back to the host (no CUDA synchronisation). On the
CPU (``sparse``) the crops are one uint8 kernel call each, the randomly applied steps run only on the rows that
drew them (rows sorted by jitter order, then blur, so that each step covers a few contiguous ranges), rows are
processed in blocks and the colour steps and blur in chunks that stay in the core's L2 cache, and each run of rows
sharing a brightness / contrast / saturation step gets that formula alone; both paths give the same views up to
the uint8 kernels' rounding (tested).

**Why not a library pipeline** (measured, ``benchmarks/README.md``): kornia 0.9's ``RandomResizedCrop`` samples
crops relative to the whole tensor (no per-sample valid region in a padded batch), does not antialias
(``warp_affine`` / ``grid_sample``) or loops over samples (``cropping_mode="slice"``), draws one colour-jitter order
per batch and takes no ``torch.Generator``; its DINO pipeline was also 2-3.7x slower than this module on the CPU.
torchvision's v2 transforms draw one parameter set per call (per batch), so per-sample parameters need a loop
over samples. ``torchvision.ops.roi_align`` (one kernel for all crops) was this module's first resampler: a box
prefilter rather than the papers' filters, and 5x slower on the CPU than a uint8 kernel per crop (measured).

**Difference from the per-sample path:** none in the resampling on the CPU (same kernel, same boxes); the GPU's
float resampler is within one or two uint8 levels of it in a few pixels (fixed-point weights).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from methods.views import INTERPOLATIONS, ViewGroup, ViewRecipe, dino_recipes
from ssl_platform.data.small_sets import MEAN, STD

__all__ = ["BatchViews", "ViewGroup", "ViewRecipe", "dino_recipes", "eval_views"]

RRC_TRIES = 10
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale (ITU-R 601-2 luma)
CPU_BLOCK_VALUES = 1 << 20  # values per block of rows processed together on the CPU (4 MiB of float32)
CPU_JITTER_CHUNK_VALUES = 1 << 18  # values per chunk of rows jittered together on the CPU (1 MiB of float32)
CPU_BLUR_CHUNK_VALUES = 1 << 19  # values per blur call on the CPU
CPU_PER_ROW_MIN_VALUES = 1 << 14  # smaller rows: per-row / per-run Python loops cost more than the passes they save
MAX_RUNS = 3  # a sparse step runs on up to this many contiguous ranges of rows in place, else on gathered rows
# torchvision's hsv -> rgb as min + chroma * f_c(6 h), f_c(u) = clamp(sign_c * |u - centre_c| + offset_c, 0, 1)
_HUE_CENTRE = (3.0, 2.0, 4.0)
_HUE_SIGN = (1.0, -1.0, -1.0)
_HUE_OFFSET = (-1.0, 2.0, 2.0)


def blur_kernel_size(size: int) -> int:
    """An odd Gaussian kernel about 10% of the crop size, at least 3 (as ``benchmarks.per_sample_views``)."""
    k = max(3, size // 10)
    return k if k % 2 == 1 else k + 1


@functools.lru_cache(maxsize=256)
def constant(values: tuple[float, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A small constant tensor, made once per device: a host-to-device copy per call would synchronise a GPU
    with the host (pageable memory)."""
    return torch.tensor(values, dtype=dtype).to(device)


def normalize_(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(x - mean) / std`` per channel, in place."""
    m = constant(tuple(mean), x.device, x.dtype).view(1, 3, 1, 1)
    inv = constant(tuple(1.0 / v for v in std), x.device, x.dtype).view(1, 3, 1, 1)
    return x.sub_(m).mul_(inv)


# ---- random parameters (one value per row = view x sample) ---------------------------------------------
def _uniform(n: int, lo: torch.Tensor | float, hi: torch.Tensor | float, generator, device) -> torch.Tensor:
    u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
    return lo + (hi - lo) * u


def _bernoulli(p: torch.Tensor, generator) -> torch.Tensor:
    return torch.rand(p.shape, generator=generator, device=p.device, dtype=torch.float64) < p


def sample_resized_crops(
    heights: torch.Tensor,
    widths: torch.Tensor,
    scale: torch.Tensor,
    log_ratio: torch.Tensor,
    generator: torch.Generator | None = None,
    tries: int = RRC_TRIES,
) -> torch.Tensor:
    """torchvision's ``RandomResizedCrop.get_params`` for every row at once -> ``[N, 4]`` (top, left, h, w), int64.

    :param heights, widths: ``[N]`` valid height / width of each row's image.
    :param scale: ``[N, 2]`` area range per row; ``log_ratio``: ``[N, 2]`` log aspect-ratio range per row.
    """
    device = heights.device
    n = heights.shape[0]
    hf, wf = heights.double(), widths.double()
    area = (hf * wf)[:, None]
    u = torch.rand(n, tries, 2, generator=generator, device=device, dtype=torch.float64)
    target = area * (scale[:, :1] + (scale[:, 1:] - scale[:, :1]) * u[..., 0])
    aspect = torch.exp(log_ratio[:, :1] + (log_ratio[:, 1:] - log_ratio[:, :1]) * u[..., 1])
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    ok = (w > 0) & (w <= wf[:, None]) & (h > 0) & (h <= hf[:, None])
    first = ok.to(torch.uint8).argmax(dim=1, keepdim=True)  # index of the first fitting try (0 if none)
    found = ok.any(dim=1)
    w = w.gather(1, first).squeeze(1)
    h = h.gather(1, first).squeeze(1)
    # torchvision's fallback: a centred crop with the ratio clamped into [min, max]
    rmin, rmax = torch.exp(log_ratio[:, 0]), torch.exp(log_ratio[:, 1])
    in_ratio = wf / hf
    fb_w = torch.where(in_ratio > rmax, torch.round(hf * rmax), wf)
    fb_h = torch.where(in_ratio < rmin, torch.round(wf / rmin), hf)
    h = torch.where(found, h, fb_h)
    w = torch.where(found, w, fb_w)
    pos = torch.rand(n, 2, generator=generator, device=device, dtype=torch.float64)
    top = torch.where(found, torch.floor(pos[:, 0] * (hf - h + 1)), torch.floor((hf - h) / 2))
    left = torch.where(found, torch.floor(pos[:, 1] * (wf - w + 1)), torch.floor((wf - w) / 2))
    return torch.stack([top, left, h, w], dim=1).long()


@dataclass
class ViewParams:
    """Random parameters of ``N = views x B`` rows (view-major), all ``[N]`` tensors unless noted."""

    boxes: torch.Tensor  # [N, 4] int64 (top, left, height, width) in the sample's valid region
    flip: torch.Tensor  # bool
    jitter: torch.Tensor  # bool: colour jitter applied
    factors: torch.Tensor  # [N, 4] float (brightness, contrast, saturation, hue shift); identity where not jittered
    order: torch.Tensor  # [N, 4] int64: a permutation of 0..3 (torchvision's ids) per row
    grayscale: torch.Tensor  # bool
    blur: torch.Tensor  # bool
    sigma: torch.Tensor  # float: blur sigma (meaningful where blur)
    solarize: torch.Tensor  # bool


def _per_row(values: Sequence[float], batch: int, device) -> torch.Tensor:
    per_view = constant(tuple(float(v) for v in values), device, torch.float64)
    return per_view[:, None].expand(-1, batch).reshape(-1)  # row v * batch + i = view v


def sample_view_params(
    recipes: Sequence[ViewRecipe],
    heights: torch.Tensor,
    widths: torch.Tensor,
    generator: torch.Generator | None = None,
) -> ViewParams:
    """Draw every random parameter of ``len(recipes) x B`` rows (row ``v * B + b`` = view ``v`` of sample ``b``)."""
    device = heights.device
    b = heights.shape[0]
    n = len(recipes) * b
    col = lambda name: _per_row([getattr(r, name) for r in recipes], b, device)  # noqa: E731
    scale = torch.stack([_per_row([r.scale[0] for r in recipes], b, device),
                         _per_row([r.scale[1] for r in recipes], b, device)], 1)  # fmt: skip
    log_ratio = torch.stack([_per_row([math.log(r.ratio[0]) for r in recipes], b, device),
                             _per_row([math.log(r.ratio[1]) for r in recipes], b, device)], 1)  # fmt: skip
    boxes = sample_resized_crops(heights.repeat(len(recipes)), widths.repeat(len(recipes)), scale, log_ratio, generator)
    flip = _bernoulli(col("hflip_p"), generator)
    jitter = _bernoulli(col("color_jitter_p"), generator)
    bri, con, sat, hue = col("brightness"), col("contrast"), col("saturation"), col("hue")
    u = torch.rand(n, 4, generator=generator, device=device, dtype=torch.float64)
    lo = torch.stack([(1 - bri).clamp(min=0), (1 - con).clamp(min=0), (1 - sat).clamp(min=0), -hue], 1)
    hi = torch.stack([1 + bri, 1 + con, 1 + sat, hue], 1)
    factors = lo + (hi - lo) * u
    identity = constant((1.0, 1.0, 1.0, 0.0), device, torch.float64)
    factors = torch.where(jitter[:, None], factors, identity)
    order = torch.rand(n, 4, generator=generator, device=device).argsort(dim=1)  # uniform permutations
    grayscale = _bernoulli(col("grayscale_p"), generator)
    blur = _bernoulli(col("blur_p"), generator)
    sig_lo = _per_row([r.blur_sigma[0] for r in recipes], b, device)
    sig_hi = _per_row([r.blur_sigma[1] for r in recipes], b, device)
    sigma = _uniform(n, sig_lo, sig_hi, generator, device)
    solarize = _bernoulli(col("solarize_p"), generator)
    return ViewParams(boxes, flip, jitter, factors, order, grayscale, blur, sigma, solarize)


# ---- image operations on [N, 3, H, W] float in [0, 1], parameters per row ----------------------------------
def _col(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.to(device=like.device, dtype=like.dtype).view(-1, 1, 1, 1)


def grayscale_of(x: torch.Tensor) -> torch.Tensor:
    """``[N, 1, H, W]`` luma, as torchvision's ``rgb_to_grayscale``."""
    r, g, b = x.unbind(dim=1)
    return r.mul(GRAY_WEIGHTS[0]).add_(g, alpha=GRAY_WEIGHTS[1]).add_(b, alpha=GRAY_WEIGHTS[2]).unsqueeze(1)


def blend_(x: torch.Tensor, alpha: torch.Tensor, to_gray_mean: torch.Tensor, to_gray: torch.Tensor) -> torch.Tensor:
    """One brightness / contrast / saturation step per row, in place: ``clamp(alpha x + (1 - alpha) t, 0, 1)``
    (torchvision's ``_blend``) with ``t`` = 0 (brightness), the mean grey (contrast: ``to_gray_mean`` = 1) or the
    grey image (saturation: ``to_gray`` = 1); ``alpha = 1`` leaves a row unchanged."""
    gray = grayscale_of(x)
    mean = gray.mean(dim=(-3, -2, -1), keepdim=True)
    target = gray.mul_(_col(to_gray, x)).add_(mean.mul_(_col(to_gray_mean, x)))
    # x + (1 - alpha) (t - x) = alpha x + (1 - alpha) t, in place; exactly x where alpha = 1
    return x.lerp_(target, 1.0 - _col(alpha, x)).clamp_(0.0, 1.0)


def adjust_brightness_(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """torchvision's ``adjust_brightness`` per row, in place: ``clamp(alpha x, 0, 1)``."""
    return x.mul_(_col(alpha, x)).clamp_(0.0, 1.0)


def adjust_contrast_(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """torchvision's ``adjust_contrast`` per row, in place: ``clamp(alpha x + (1 - alpha) m, 0, 1)`` with ``m``
    the mean grey, taken as the luma weights of the channel means (one reduction, no grey image)."""
    channel_mean = x.mean(dim=(-2, -1))
    weights = constant(GRAY_WEIGHTS, x.device, x.dtype)
    a = _col(alpha, x)
    target = (channel_mean @ weights).view(-1, 1, 1, 1) * (1.0 - a)
    return x.mul_(a).add_(target).clamp_(0.0, 1.0)


def adjust_saturation_(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """torchvision's ``adjust_saturation`` per row, in place: ``clamp(alpha x + (1 - alpha) grey(x), 0, 1)``."""
    a = _col(alpha, x)
    gray = grayscale_of(x).mul_(1.0 - a)
    return x.mul_(a).add_(gray).clamp_(0.0, 1.0)


_ADJUST_BY_OP = (adjust_brightness_, adjust_contrast_, adjust_saturation_)  # torchvision's op ids 0, 1, 2


def hue_shift(x: torch.Tensor, shift: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """torchvision's ``adjust_hue`` per row (``h' = h + shift mod 1`` in HSV) in closed form:
    ``rgb = min + (max - min) * clamp(sign_c |6 h' - centre_c| + offset_c, 0, 1)`` per channel ``c``.
    ``out`` may be ``x`` itself (the result is written once the hue is known).

    Written for few passes over memory (each op is one on the CPU): ``amax`` / ``amin`` over the channels (4.4x
    faster than two ``maximum`` calls of channel planes), comparisons written straight into float buffers, the
    wrap as ``u - 6 floor(u / 6)`` (``fmod`` is 5x a pointwise op), the three channels as one broadcast
    expression. Selections are ``lerp`` with 0/1 weights (exact), not ``torch.where``: on the CPU ``where``
    branches per element and was 8-30x slower on natural masks (measured)."""
    r, g, b = x.unbind(dim=1)
    maxc = x.amax(dim=1, keepdim=True)
    minc = x.amin(dim=1, keepdim=True)
    chroma = maxc - minc
    top, spread = maxc[:, 0], chroma[:, 0]
    is_r = torch.eq(top, r, out=torch.empty_like(top))
    is_g = torch.eq(top, g, out=torch.empty_like(top))
    is_g.addcmul_(is_g, is_r, value=-1.0)  # max is g and not r
    # 6 h = (g - b) / C if max is r, 2 + (b - r) / C if g, 4 + (r - g) / C if b (torchvision's _rgb_to_hsv)
    h6 = torch.sub(r, g).add_(spread, alpha=4.0)
    h6.lerp_(torch.sub(b, r).add_(spread, alpha=2.0), is_g)
    h6.lerp_(torch.sub(g, b), is_r)
    h6.div_(torch.eq(spread, 0, out=is_g).add_(spread))
    # u = 6 h + 6 shift + 6 > 0 (|shift| <= 0.5); u mod 6 = u - 6 floor(u / 6), equal to fmod here (tested)
    h6.add_(_col(shift * 6.0 + 6.0, x).view(-1, 1, 1))
    h6.add_(torch.mul(h6, 1.0 / 6.0, out=is_r).floor_(), alpha=-6.0)
    centre, sign, offset = (constant(v, x.device, x.dtype).view(1, 3, 1, 1) for v in (_HUE_CENTRE, _HUE_SIGN, _HUE_OFFSET))
    f = torch.sub(h6[:, None], centre).abs_().mul_(sign).add_(offset).clamp_(0.0, 1.0)
    out = torch.empty_like(x) if out is None else out
    return torch.addcmul(minc, f, chroma, out=out)


@dataclass
class JitterSchedule:
    """Colour jitter of ``N`` rows as 6 blend slots around one hue slot (see the module docstring).

    ``alpha``, ``to_gray_mean``, ``to_gray``: ``[N, 6]`` blend parameters per slot (identity: 1, 0, 0); ``shift``:
    ``[N]`` hue shift; ``key``: ``[N]`` position of hue in the row's order, 4 where no jitter is applied.
    """

    alpha: torch.Tensor
    to_gray_mean: torch.Tensor
    to_gray: torch.Tensor
    shift: torch.Tensor
    key: torch.Tensor

    @classmethod
    def build(cls, factors: torch.Tensor, order: torch.Tensor, jitter: torch.Tensor) -> JitterSchedule:
        """``factors`` ``[N, 4]`` (brightness, contrast, saturation, hue), ``order`` ``[N, 4]`` permutations of
        torchvision's op ids (0 brightness, 1 contrast, 2 saturation, 3 hue), ``jitter`` ``[N]`` bool."""
        slots = torch.arange(6, device=order.device)[None, :]
        hue_pos = (order == 3).long().argmax(dim=1, keepdim=True)
        # slots 0..2 hold the ops before hue, right-aligned; slots 3..5 the ops after hue, left-aligned
        k = torch.where(slots < 3, slots - 3 + hue_pos, hue_pos + slots - 2)
        valid = torch.where(slots < 3, (k >= 0) & (k < hue_pos), k <= 3) & jitter[:, None]
        op = torch.where(valid, order.gather(1, k.clamp(0, 3)), -1)
        alpha = torch.where(op >= 0, factors.gather(1, op.clamp(0, 2)), 1.0)
        key = torch.where(jitter, hue_pos.squeeze(1), 4)
        return cls(alpha.float(), (op == 1).float(), (op == 2).float(), factors[:, 3].float(), key)

    def rows(self, index: torch.Tensor | slice) -> JitterSchedule:
        return JitterSchedule(*(getattr(self, f.name)[index] for f in fields(self)))


def color_jitter_(x: torch.Tensor, s: JitterSchedule, sparse: bool = False) -> torch.Tensor:
    """``ColorJitter`` per row with its own factors and order, in place where possible.

    ``sparse=False``: every slot runs on every row with identity parameters where a row has no op (no data-
    dependent shapes: for GPUs, no host synchronisation). ``sparse=True`` (CPU): the rows must be sorted by
    ``s.key``; each slot then runs on the contiguous rows that use it, hue only on jittered rows, and each run of
    rows with the same op in a slot gets that op alone (brightness 4x, contrast and saturation 1.1-1.2x faster
    than the general blend, measured; rows under ``CPU_PER_ROW_MIN_VALUES`` values: only where a range has one op).
    """
    if not sparse:
        for slot in range(6):
            x = blend_(x, s.alpha[:, slot], s.to_gray_mean[:, slot], s.to_gray[:, slot])
            if slot == 2:
                x = hue_shift(x, s.shift, out=x)
        return x
    c = [int((s.key < v).sum()) for v in range(5)]  # c[v]: rows with key < v (key sorted)
    ops = (s.to_gray_mean + 2.0 * s.to_gray).long().tolist()  # [N][6] op per slot: 0 brightness, 1 contrast, 2 sat.
    per_op = x[0].numel() >= CPU_PER_ROW_MIN_VALUES  # small rows: a mixed range is one general blend (fewer calls)
    # all seven steps on a chunk of rows that stays in the core's L2 cache before the next chunk: the hue's
    # temporaries overflow it for a whole block (hue 2.2x / 2.1x faster at 224 / 96 px in chunks, measured)
    chunk = max(1, CPU_JITTER_CHUNK_VALUES // max(1, x[0].numel()))
    for first in range(0, c[4], chunk):
        last = min(c[4], first + chunk)
        for slot in range(6):
            lo, hi = (c[3 - slot], c[4]) if slot < 3 else (0, c[6 - slot])
            lo, hi = max(lo, first), min(hi, last)
            # every row here has an op in this slot; runs of rows with the same op
            runs = _runs([ops[i][slot] for i in range(lo, hi)], offset=lo)
            if len(runs) > 1 and not per_op:
                blend_(x[lo:hi], s.alpha[lo:hi, slot], s.to_gray_mean[lo:hi, slot], s.to_gray[lo:hi, slot])
            else:
                for start, end, op in runs:
                    _ADJUST_BY_OP[op](x[start:end], s.alpha[start:end, slot])
            if slot == 2:
                hue_shift(x[first:last], s.shift[first:last], out=x[first:last])
    return x


def gaussian_blur(
    x: torch.Tensor, sigma: torch.Tensor, apply: torch.Tensor, kernel_size: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-row Gaussian blur, torchvision's kernel (``softmax(-(t / sigma)^2)``, ``t = linspace(+-(k-1) / (2 sqrt 2))``)
    and reflect padding, as two depthwise 1-D convolutions; a unit impulse (exact identity) where ``apply`` is
    False. ``out`` (may be ``x``): written there, saving a copy."""
    n, c, h, w = x.shape
    k = kernel_size
    lim = (k - 1) / (2.0 * math.sqrt(2.0))
    t = torch.linspace(-lim, lim, k, dtype=x.dtype, device=x.device)
    s = sigma.to(device=x.device, dtype=x.dtype).clamp(min=1e-6)
    kernel = torch.softmax(-(t[None, :] / s[:, None]).pow(2), dim=1)
    # Taps below 1e-12 change no float32 output but are denormal for small sigmas, which makes CPU convolutions
    # about 10x slower (measured): they are set to 0.
    kernel = torch.where(kernel < 1e-12, torch.zeros_like(kernel), kernel)
    impulse = (torch.arange(k, device=x.device) == k // 2).to(x.dtype)
    kernel = torch.where(apply.to(x.device)[:, None], kernel, impulse)  # [N, k]
    weight = kernel[:, None].expand(n, c, k).reshape(n * c, k)  # one kernel per (row, channel)
    pad = k // 2
    y = F.pad(x, (pad, pad, pad, pad), mode="reflect").reshape(1, n * c, h + 2 * pad, w + 2 * pad)
    if x.device.type == "cpu":  # oneDNN's depthwise convolution: 2.2x faster channels-last (measured)
        y = y.contiguous(memory_format=torch.channels_last)
    y = F.conv2d(y, weight.view(n * c, 1, k, 1), groups=n * c)
    y = F.conv2d(y, weight.view(n * c, 1, 1, k), groups=n * c)
    y = y[0].unflatten(0, (n, c))
    return y.contiguous() if out is None else out.copy_(y)


def _blur_rows(x: torch.Tensor, apply: torch.Tensor, sel, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """The blur in place, on the CPU in chunks of rows whose padded copies stay in the core's L2 cache (at 224 / 96
    px 1.4x / 1.1x faster than a whole block, measured)."""
    sigma = sigma[sel]
    chunk = max(1, CPU_BLUR_CHUNK_VALUES // max(1, x[0].numel())) if x.device.type == "cpu" else x.shape[0]
    for i in range(0, x.shape[0], chunk):
        part = x[i : i + chunk]
        gaussian_blur(part, sigma[i : i + chunk], apply[i : i + chunk], kernel_size, out=part)
    return x


def solarize(x: torch.Tensor, apply: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """torchvision's ``solarize`` (``x >= threshold -> 1 - x``) on the rows where ``apply`` (an exact ``lerp``)."""
    return torch.lerp(x, 1.0 - x, (x >= threshold).to(x.dtype).mul_(_col(apply, x)))


def grayscale(x: torch.Tensor, apply: torch.Tensor) -> torch.Tensor:
    """torchvision's ``rgb_to_grayscale(num_output_channels=3)`` on the rows where ``apply``."""
    return torch.lerp(x, grayscale_of(x).expand_as(x), _col(apply, x))


# ---- canvases ----------------------------------------------------------------------------------------------
def _check_batch(images: torch.Tensor, sizes: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"augment: expected images [B, 3, H, W], got {shape}")
    if images.dtype != torch.uint8:
        raise ValueError(f"augment: expected uint8 images (0..255), got dtype {images.dtype}")
    b, _, hc, wc = images.shape
    if sizes is None:
        sizes = torch.stack([torch.full((b,), hc, device=images.device), torch.full((b,), wc, device=images.device)], 1)
    elif tuple(sizes.shape) != (b, 2):
        raise ValueError(f"augment: expected sizes [B={b}, 2] (valid height, width), got shape {tuple(sizes.shape)}")
    return images, sizes.to(device=images.device, dtype=torch.long)


_TAPS = {"bilinear": 2, "bicubic": 4}  # filter support in input pixels at scale 1 (PyTorch's interp_size)


def _aa_filter(t: torch.Tensor, interpolation: str) -> torch.Tensor:
    """PyTorch's (and Pillow's) antialiasing filters: the triangle ``max(0, 1 - |t|)`` (bilinear) or Keys' cubic
    convolution with ``a = -0.5`` (bicubic)."""
    t = t.abs()
    if interpolation == "bilinear":
        return (1.0 - t).clamp_(min=0.0)
    a = -0.5
    near = ((a + 2.0) * t - (a + 3.0)) * t * t + 1.0
    far = ((a * t - 5.0 * a) * t + 8.0 * a) * t - 4.0 * a
    return torch.where(t < 1.0, near, torch.where(t < 2.0, far, torch.zeros_like(t)))


def resize_taps(
    start: torch.Tensor, length: torch.Tensor, size: int, max_length: int, interpolation: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The taps of an antialiased 1-D resize of ``[start, start + length)`` to ``size`` samples, per row, as
    ``F.interpolate(..., antialias=True)`` computes them (``_compute_indices_min_size_weights_aa``): output ``i``
    has centre ``c = s (i + 0.5)`` with ``s = length / size``, support ``r = taps / 2 * max(s, 1)``, inputs
    ``j`` in ``[trunc(c - r + 0.5), trunc(c + r + 0.5))`` clipped to the crop, and weights
    ``filter((j - c + 0.5) / max(s, 1))`` normalised to sum 1 -> absolute indices and weights ``[N, size, K]``,
    zero-weight taps repeating the crop's last index. ``K`` depends only on ``max_length`` (no host sync)."""
    device = length.device
    span = length.double()[:, None]
    scale = span / size
    stretch = scale.clamp(min=1.0)
    support = _TAPS[interpolation] / 2.0 * stretch
    centre = scale * (torch.arange(size, device=device, dtype=torch.float64)[None] + 0.5)
    lo = torch.trunc(centre - support + 0.5).clamp_(min=0.0)
    hi = torch.minimum(torch.trunc(centre + support + 0.5), span)
    k = 2 * math.ceil(_TAPS[interpolation] / 2.0 * max(1.0, max_length / size)) + 1
    j = torch.arange(k, device=device, dtype=torch.float64)
    weight = _aa_filter((j + lo[..., None] - centre[..., None] + 0.5) / stretch[..., None], interpolation)
    weight = weight * (j < (hi - lo)[..., None])
    weight = weight / weight.sum(-1, keepdim=True).clamp(min=1e-12)
    index = torch.minimum(lo[..., None] + j, span[..., None] - 1.0).long() + start.to(device)[:, None, None]
    return index, weight


def _resample_rows(planes: torch.Tensor, plane_index: torch.Tensor, index: torch.Tensor, weight: torch.Tensor):
    """``out[n, c, i, :] = sum_k weight[n, i, k] * planes[plane_index[n, c], index[n, i, k], :]``: one row gather
    (``index_select``, contiguous rows) and one multiply-add per tap."""
    n, size, k = index.shape
    planes_flat = planes.reshape(-1, planes.shape[-1])
    base = plane_index[:, :, None] * planes.shape[-2]  # [N, 3, 1]
    out = None
    for tap in range(k):
        rows = (base + index[:, None, :, tap]).reshape(-1)
        term = planes_flat.index_select(0, rows).view(n, plane_index.shape[1], size, planes.shape[-1])
        term.mul_(weight[:, None, :, tap, None].to(planes.dtype))
        out = term if out is None else out.add_(term)
    return out


def crop_resize(
    canvas: torch.Tensor,
    boxes: torch.Tensor,
    sample_index: torch.Tensor,
    size: int,
    flip: torch.Tensor | None = None,
    interpolation: str = "bilinear",
    quantize: bool = False,
) -> torch.Tensor:
    """Crops ``[N, 4]`` (top, left, h, w) of ``canvas[sample_index]`` (float ``[B, 3, H, W]``) resized to
    ``size x size`` with torchvision's antialiased resize (``F.interpolate(crop, antialias=True)``, ``mode =
    interpolation``), vectorised over crops: two separable passes of gathered rows (columns first, on the
    transposed canvas), no host synchronisation. ``flip``: rows mirrored horizontally (the taps reversed). Taps
    never leave a crop, so padding outside it is never read. ``quantize``: values in [0, 1] rounded to the 1/255
    grid and clipped after each pass, as the uint8 kernels (and Pillow) do: within two levels of
    :func:`crop_resize_uint8` (its weights are fixed-point), mostly equal."""
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"crop_resize: interpolation must be one of {list(INTERPOLATIONS)}, got {interpolation!r}")
    device = canvas.device
    _, ch, hc, wc = canvas.shape
    top, left, h, w = boxes.to(device).unbind(1)
    col_index, col_weight = resize_taps(left, w, size, wc, interpolation)
    row_index, row_weight = resize_taps(top, h, size, hc, interpolation)
    if flip is not None:
        fl = flip.to(device)[:, None, None]
        col_index = torch.where(fl, col_index.flip(1), col_index)
        col_weight = torch.where(fl, col_weight.flip(1), col_weight)
    channels = torch.arange(ch, device=device)[None]
    n = boxes.shape[0]
    planes = sample_index.to(device)[:, None] * ch + channels  # [N, 3] planes of the canvas
    columns = _resample_rows(canvas.transpose(-1, -2).contiguous(), planes, col_index, col_weight)  # [N, 3, S, H]
    if quantize:
        columns = _to_uint8_grid(columns)
    crops = torch.arange(n, device=device)[:, None] * ch + channels
    out = _resample_rows(columns.transpose(-1, -2).contiguous(), crops, row_index, row_weight)
    return _to_uint8_grid(out) if quantize else out


def _to_uint8_grid(x: torch.Tensor) -> torch.Tensor:
    return x.mul_(255.0).round_().clamp_(0.0, 255.0).mul_(1.0 / 255.0)


def crop_resize_uint8(
    images: torch.Tensor, boxes: list[list[int]], sample_index: list[int], size: int, flip: list[bool],
    interpolation: str = "bilinear",
    as_float: bool = False,
) -> torch.Tensor:
    """The same crops as :func:`crop_resize` from uint8 images on the CPU, one ``F.interpolate`` per crop on
    its uint8 slice (PyTorch's vectorised Pillow-SIMD resampling kernels; at 224 / 96 px about 5x faster than
    ``roi_align`` or :func:`crop_resize` over all crops, measured) -> uint8 ``[N, 3, S, S]`` channels-last, rounded
    as Pillow rounds. Parameters are host lists. ``as_float``: float32 channels-first ``view / 255`` instead,
    converted crop by crop (at 224 / 96 px 1.9x / 1.6x faster than converting the channels-last uint8 batch in
    one strided pass on this CPU, and faster than transposing it as uint8 first, measured)."""
    shape = (len(boxes), images.shape[1], size, size)
    if as_float:
        out = torch.empty(shape, dtype=torch.float32)
    else:
        out = torch.empty(shape, dtype=torch.uint8, memory_format=torch.channels_last)
    for i, ((top, left, h, w), b, mirrored) in enumerate(zip(boxes, sample_index, flip)):
        crop = images[b : b + 1, :, top : top + h, left : left + w]
        view = F.interpolate(crop, size=(size, size), mode=interpolation, antialias=True, align_corners=False)[0]
        view = view.flip(-1) if mirrored else view
        if as_float:
            torch.mul(view, 1.0 / 255.0, out=out[i])
        else:
            out[i] = view
    return out


def _crop_source(images: torch.Tensor, per_crop: bool) -> torch.Tensor:
    """What :func:`_crops` resamples: on the CPU with ``per_crop``, the uint8 images channels-last (the per-crop
    uint8 kernels are fastest on such slices); otherwise float images in [0, 1] for the vectorised resampler."""
    if per_crop and images.device.type == "cpu":
        return images.contiguous(memory_format=torch.channels_last)
    return images.float().mul_(1.0 / 255.0)


def _crops(
    source: torch.Tensor, boxes: torch.Tensor, sample_index: torch.Tensor, size: int, flip: torch.Tensor | None,
    interpolation: str,
) -> torch.Tensor:
    """Resized crops as float in [0, 1], on the 1/255 grid on every device: on the CPU from the uint8 images
    (:func:`crop_resize_uint8`), elsewhere from the float images (:func:`crop_resize`, quantised as uint8 is)."""
    if source.dtype == torch.uint8:
        flips = flip.tolist() if flip is not None else [False] * boxes.shape[0]
        # float, channels-first (the pointwise steps are slower on channels-last tensors), converted per crop
        return crop_resize_uint8(source, boxes.tolist(), sample_index.tolist(), size, flips, interpolation, True)
    return crop_resize(source, boxes, sample_index, size, flip, interpolation, quantize=True)


# ---- the module's API --------------------------------------------------------------------------------------
class BatchViews:
    """Builds a method's training views from a uint8 batch on its device (see the module docstring).

    :param groups: keyword argument of the method's training ``forward`` -> its views: a
        :class:`methods.views.ViewGroup` (``single=True``: one tensor) or a sequence of recipes (a list of
        ``[B, 3, S, S]`` tensors, one per recipe), as :meth:`methods.base.SSLMethod.training_views` declares them.
    :param mean, std: normalisation (default ``ssl_platform.data.small_sets.MEAN / STD``).
    :param sparse: run the randomly applied steps only on the rows that draw them (data-dependent shapes: cheap on
        a CPU, a host synchronisation on a GPU) instead of on every row with identity parameters, and, on the CPU,
        resample each crop from the uint8 image (:func:`crop_resize_uint8`) instead of with the vectorised float
        resampler (:func:`crop_resize`). Default (None): sparse on the CPU, dense elsewhere. Both give the same views
        up to the uint8 kernels' fixed-point rounding (a level or two in a few pixels).
    """

    def __init__(
        self,
        groups: Mapping[str, ViewGroup | Sequence[ViewRecipe]],
        mean: Sequence[float] = MEAN,
        std: Sequence[float] = STD,
        sparse: bool | None = None,
    ):
        if not groups:
            raise ValueError("BatchViews needs at least one output key")
        self.groups = {k: v if isinstance(v, ViewGroup) else ViewGroup(tuple(v)) for k, v in groups.items()}
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.sparse = sparse

    @property
    def views_per_image(self) -> int:
        return sum(len(g.recipes) for g in self.groups.values())

    def __call__(
        self, images: torch.Tensor, sizes: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """``images`` uint8 ``[B, 3, C, C]`` canvases, ``sizes`` ``[B, 2]`` valid (height, width), each in
        ``[1, C]`` (not checked: that would synchronise a GPU) -> the keyword arguments of the method's training
        ``forward``, float32, normalised, on ``images.device``."""
        images, sizes = _check_batch(images, sizes)
        b = images.shape[0]
        pdev = generator.device if generator is not None else images.device
        sparse = self.sparse if self.sparse is not None else images.device.type == "cpu"
        source = _crop_source(images, per_crop=sparse)
        heights, widths = sizes[:, 0].to(pdev), sizes[:, 1].to(pdev)
        out: dict[str, torch.Tensor | list[torch.Tensor]] = {}
        for key, group in self.groups.items():
            recipes = list(group.recipes)
            params = sample_view_params(recipes, heights, widths, generator)
            views = self._render(source, params, recipes, b, sparse)
            out[key] = views[0] if group.single else views
        return out

    def _render(
        self, source: torch.Tensor, p: ViewParams, recipes: list[ViewRecipe], b: int, sparse: bool
    ) -> list[torch.Tensor]:
        """Views of one output key: one ``[B, 3, S, S]`` tensor per recipe (row ``v * B + i`` of the parameters =
        view ``v`` of sample ``i``).

        On the CPU with rows of at least ``CPU_PER_ROW_MIN_VALUES`` values, one output tensor per view rather than
        one for all views: glibc serves allocations above 32 MiB (64 global views at 224 px are 38.5 MB) with a
        fresh ``mmap`` every call, and first-touching its pages cost 17 ms per batch on this CPU (26.5 vs 9.5 ms to
        fill 38.5 MB fresh vs as two reused 19 MB halves, measured); per-view tensors come back from the heap."""
        device = source.device
        size = recipes[0].size
        n = len(recipes) * b
        p = ViewParams(**{k: v.to(device, non_blocking=True) for k, v in vars(p).items()})
        sample_index = torch.arange(b, device=device).repeat(len(recipes))
        has = {name: any(getattr(r, name) > 0 for r in recipes) for name in ("color_jitter_p", "grayscale_p",
                                                                          "blur_p", "solarize_p")}  # fmt: skip
        jitter = JitterSchedule.build(p.factors, p.order, p.jitter)
        # sparse: rows sorted by the jitter key, so that each jitter slot is a contiguous range of rows, then the
        # blurred rows first within each key, so that the blur runs on a few contiguous ranges (no gather / scatter)
        sort_key = jitter.key * 2 + (~p.blur).long() if has["blur_p"] else jitter.key
        order = torch.argsort(sort_key, stable=True) if sparse else torch.arange(n, device=device)
        # On the CPU, blocks of rows that fit in cache (every op is a pass over memory); one block on a GPU.
        step = max(1, CPU_BLOCK_VALUES // (3 * size * size)) if device.type == "cpu" else n
        per_row_copies = sparse and 3 * size * size >= CPU_PER_ROW_MIN_VALUES
        if per_row_copies:
            views = [torch.empty(b, 3, size, size, device=device) for _ in recipes]
        elif step < n or sparse:  # blocks (CPU): written into one tensor
            flat = torch.empty(n, 3, size, size, device=device)
            views = list(flat.split(b))
        for start in range(0, n, step):
            rows = order[start : start + step]
            x = _crops(source, p.boxes[rows], sample_index[rows], size, p.flip[rows], recipes[0].interpolation)
            if has["color_jitter_p"]:
                x = color_jitter_(x, jitter.rows(rows), sparse)
            if has["grayscale_p"]:
                x = self._apply(x, p.grayscale[rows], sparse, lambda y, m, _: grayscale(y, m))
            if has["blur_p"]:
                kernel = recipes[0].blur_kernel or blur_kernel_size(size)
                blur = functools.partial(_blur_rows, sigma=p.sigma[rows], kernel_size=kernel)
                x = self._apply(x, p.blur[rows], sparse, blur)
            if has["solarize_p"]:
                x = self._apply(x, p.solarize[rows], sparse, lambda y, m, _: solarize(y, m))
            x = normalize_(x, self.mean, self.std)
            if per_row_copies:  # rows in jitter order: one contiguous copy per row (2x faster than index_copy_)
                for j, r in enumerate(rows.tolist()):
                    views[r // b][r % b].copy_(x[j])
            elif sparse:  # small rows in jitter order: one call
                flat.index_copy_(0, rows, x)
            elif step >= n:  # one block in row order (GPUs): the block is the output
                return list(x.split(b))
            else:
                flat[start : start + x.shape[0]].copy_(x)
        return views

    @staticmethod
    def _apply(x: torch.Tensor, mask: torch.Tensor, sparse: bool, fn) -> torch.Tensor:
        """``fn(rows, mask, selection)`` on every row (identity where ``mask`` is False), or, sparse, only on the
        masked rows (``selection`` indexes the block's per-row parameters): on each contiguous range of them in
        place when there are at most ``MAX_RUNS`` (no gather / scatter: 8% of a DINO batch), else gathered."""
        if not sparse:
            return fn(x, mask, slice(None))
        runs = _true_runs(mask.tolist())
        if len(runs) <= MAX_RUNS:
            for lo, hi in runs:
                part = x[lo:hi]
                result = fn(part, torch.ones(hi - lo, dtype=torch.bool, device=x.device), slice(lo, hi))
                if result is not part:
                    part.copy_(result)
            return x
        idx = mask.nonzero().squeeze(1)
        x[idx] = fn(x[idx], torch.ones(idx.numel(), dtype=torch.bool, device=x.device), idx)
        return x


def _runs(values: list, offset: int = 0) -> list[tuple[int, int, object]]:
    """``(lo, hi, value)`` of each run of equal consecutive values, indices shifted by ``offset``."""
    runs: list[tuple[int, int, object]] = []
    for i, v in enumerate(values):
        if runs and runs[-1][2] == v:
            runs[-1] = (runs[-1][0], offset + i + 1, v)
        else:
            runs.append((offset + i, offset + i + 1, v))
    return runs


def _true_runs(flags: list[bool]) -> list[tuple[int, int]]:
    """``[lo, hi)`` of each run of consecutive True values."""
    return [(lo, hi) for lo, hi, v in _runs(flags) if v]


EVAL_CROP_FRACTION = 224 / 256  # DINO / iBOT / MAE evaluation: Resize(256) (short side) + CenterCrop(224)


def eval_views(
    images: torch.Tensor, sizes: torch.Tensor | None, image_size: int, mean: Sequence[float] = MEAN,
    std: Sequence[float] = STD, crop_fraction: float = EVAL_CROP_FRACTION, interpolation: str = "bicubic",
) -> torch.Tensor:
    """Un-augmented evaluation input (kNN / linear probe) -> normalised float ``[B, 3, S, S]``, ``S = image_size``.

    The reference protocol (DINO ``eval_linear.py`` / ``eval_knn.py``, MAE ``main_linprobe.py``): ``Resize(S / f,
    bicubic)`` of the short side, then ``CenterCrop(S)``, with ``f = crop_fraction`` (224 / 256). Here in one
    resampling from the decoded image: the centred square of side ``round(f * min(h, w))`` of each valid region,
    resized to ``S`` (antialiased ``interpolation``); the same pixels up to the half-pixel rounding of the box.
    ``crop_fraction=1``: the largest centred square (e.g. APL's STL-10 test transform, no crop)."""
    if not 0.0 < crop_fraction <= 1.0:
        raise ValueError(f"eval_views: crop_fraction must be in (0, 1], got {crop_fraction}")
    images, sizes = _check_batch(images, sizes)
    b = images.shape[0]
    side = torch.minimum(sizes[:, 0], sizes[:, 1])
    side = torch.round(side.double() * crop_fraction).long().clamp_(min=1)
    boxes = torch.stack([(sizes[:, 0] - side) // 2, (sizes[:, 1] - side) // 2, side, side], dim=1)
    source = _crop_source(images, per_crop=True)
    x = _crops(source, boxes, torch.arange(b, device=images.device), int(image_size), None, interpolation)
    return normalize_(x, mean, std)
