"""Batched device-side augmentation (``ssl_platform.data.augment.BatchViews``) against the per-sample path it replaces
(``views_multicrop.MultiCropTransform`` per image + ``multicrop_collate``), DINO multi-crop, side by side.

Both get the same decoded uint8 images: the per-sample path one ``[3, h, w]`` tensor per image (as a loader would
hand it over), the batched path the same images as a padded ``[B, 3, C, C]`` canvas with their valid sizes, on the
benchmark's device (the GPU when there is one; the per-sample path always runs on the CPU, where loaders run it).
One call of each per round, round-robin, ratios paired per round. Settings: ImageNet-sized (natural photographs,
scikit-learn's two bundled 427x640 samples, 375x500 windows fitted into the 304 px canvas that
``streaming.canvas_size`` gives at 224 px, 224 px global / 96 px local views) and
digits-sized (scikit-learn's digits at 32 px, 32 / 16 px views), both 2 global + 6 local crops.

Also measured, without timing: how far the batched path's resampling (roi_align: bilinear, area prefilter when
downsampling) is from the per-sample path's (bicubic with antialias) on the same crop boxes, as PSNR in dB.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from benchmarks.common import paired_ratio, summarize, sync, usable_cores


@dataclass(frozen=True)
class AugmentSetting:
    name: str
    global_size: int
    local_size: int
    n_local: int
    canvas: int
    batch: int  # images per batched call
    per_sample_images: int  # images per per-sample call (the slow path: fewer, rates are per image)


SETTINGS = {
    "imagenet": AugmentSetting("imagenet", 224, 96, 6, 304, 32, 8),  # canvas: streaming.canvas_size at 224
    "digits": AugmentSetting("digits", 32, 16, 6, 32, 128, 32),
}
TINY = {"tiny": AugmentSetting("tiny", 16, 8, 2, 20, 4, 2)}


def natural_canvases(n: int, canvas: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` crops of scikit-learn's bundled photographs (random 375x500 windows), each resized to fit the canvas
    with its aspect ratio kept, top-left -> uint8 ``[n, 3, C, C]`` and ``[n, 2]`` valid sizes."""
    import torch.nn.functional as F
    from sklearn.datasets import load_sample_images

    photos = [torch.tensor(im).permute(2, 0, 1) for im in load_sample_images().images]
    g = torch.Generator().manual_seed(seed)
    out = torch.zeros(n, canvas, canvas, 3, dtype=torch.uint8).permute(0, 3, 1, 2)  # channels-last, as streamed
    sizes = torch.zeros(n, 2, dtype=torch.long)
    for i in range(n):
        photo = photos[i % len(photos)]
        top = int(torch.randint(0, photo.shape[1] - 375 + 1, (1,), generator=g))
        left = int(torch.randint(0, photo.shape[2] - 500 + 1, (1,), generator=g))
        window = photo[:, top : top + 375, left : left + 500].float()
        h, w = round(375 * canvas / 500), canvas
        resized = F.interpolate(window[None], size=(h, w), mode="bilinear", antialias=True, align_corners=False)
        out[i, :, :h, :w] = resized[0].round().clamp(0, 255).to(torch.uint8)
        sizes[i] = torch.tensor([h, w])
    return out, sizes


def digits_canvases(n: int, canvas: int) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits (8x8, grey 0..16) resized to the canvas, as the platform's digits source."""
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    images = torch.as_tensor(load_digits().images[:n], dtype=torch.float32)[:, None] / 16.0
    images = F.interpolate(images, size=(canvas, canvas), mode="bilinear", align_corners=False).clamp(0, 1)
    out = (images.expand(-1, 3, -1, -1) * 255).round().to(torch.uint8).contiguous()
    return out, torch.full((n, 2), canvas, dtype=torch.long)


def resample_difference(canvases: torch.Tensor, sizes: torch.Tensor, setting: AugmentSetting) -> dict[str, Any]:
    """PSNR (dB, images in [0, 1]) of the batched path's crops (CPU: uint8 per-crop kernels; GPU: the vectorised
    float resampling, rounded) against torchvision's per-sample resized crops of the same boxes on the float image:
    bicubic + antialias (DINO's ``MultiCropTransform``, what the batched DINO views use) and bilinear + antialias
    (``SingleViewTransform``); the difference left is uint8 rounding."""
    import torchvision.transforms.v2.functional as TF
    from torchvision.transforms import InterpolationMode

    from ssl_platform.data import augment as A

    g = torch.Generator().manual_seed(0)
    image = canvases.float() / 255.0
    out: dict[str, Any] = {}
    for kind, size, scale in (("global", setting.global_size, (0.4, 1.0)), ("local", setting.local_size, (0.05, 0.4))):
        recipe = A.ViewRecipe(size, scale)
        p = A.sample_view_params([recipe], sizes[:, 0], sizes[:, 1], g)
        index = torch.arange(len(sizes))
        for name, mode in (("bicubic_aa", InterpolationMode.BICUBIC), ("bilinear_aa", InterpolationMode.BILINEAR)):
            ours = A.crop_resize_uint8(canvases, p.boxes.tolist(), index.tolist(), size, [False] * len(sizes),
                                       mode.value).float() / 255.0  # fmt: skip
            ref = torch.stack([TF.resized_crop(image[i], *p.boxes[i].tolist(), [size, size], interpolation=mode,
                                               antialias=True).clamp(0, 1) for i in range(len(sizes))])  # fmt: skip
            mse = (ours - ref).pow(2).flatten(1).mean(1)
            out[f"{kind}_vs_{name}_psnr_db"] = summarize((-10 * torch.log10(mse.clamp(min=1e-12))).tolist())
        scale_down = (p.boxes[:, 2:].double().amax(1) / size).tolist()
        out[f"{kind}_crop_to_output_side"] = summarize(scale_down)
    return out


def measure_setting(s: AugmentSetting, device: str, repeats: int) -> dict[str, Any]:
    """Images/s and views/s of both paths for one setting, round-robin, and their paired ratio."""
    from benchmarks.per_sample_views import MultiCropTransform, multicrop_collate
    from ssl_platform.data.augment import BatchViews, dino_recipes
    from ssl_platform.data.small_sets import MEAN, STD

    dev = torch.device(device)
    canvases, sizes = digits_canvases(s.batch, s.canvas) if s.name == "digits" else natural_canvases(s.batch, s.canvas)
    inputs = [canvases[i, :, :h, :w].clone() for i, (h, w) in enumerate(sizes.tolist())]
    per_sample = MultiCropTransform(s.global_size, s.local_size, n_global=2, n_local=s.n_local, mean=MEAN, std=STD)
    batched = BatchViews(dino_recipes(s.global_size, s.local_size, n_global=2, n_local=s.n_local))
    canvases_dev, sizes_dev = canvases.to(dev), sizes.to(dev)
    generator = torch.Generator(device=dev).manual_seed(0)
    cursor = 0

    def run_batched() -> int:
        batched(canvases_dev, sizes_dev, generator)
        sync(dev)
        return s.batch

    def run_per_sample() -> int:
        nonlocal cursor
        chosen = [inputs[(cursor + j) % len(inputs)] for j in range(s.per_sample_images)]
        cursor = (cursor + s.per_sample_images) % len(inputs)
        multicrop_collate([per_sample(x) for x in chosen])
        return s.per_sample_images

    variants = {"batched": run_batched, "per_sample": run_per_sample}
    rates: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(repeats + 1):  # round 0 warms up
        for key, fn in variants.items():
            t0 = time.perf_counter()
            n = fn()
            dt = time.perf_counter() - t0
            if r > 0:
                rates[key].append(n / dt)
    vpi = 2 + s.n_local
    entry: dict[str, Any] = {
        "global_size": s.global_size, "local_size": s.local_size, "n_global": 2, "n_local": s.n_local,
        "canvas": s.canvas, "batch": s.batch, "per_sample_images_per_call": s.per_sample_images,
        "views_per_image": vpi, "batched_device": device, "per_sample_device": "cpu",
        "source": "digits" if s.name == "digits" else "natural photographs",
    }  # fmt: skip
    for key in variants:
        entry[key] = {"images_per_s": summarize(rates[key]), "views_per_s": summarize([x * vpi for x in rates[key]])}
    entry["speedup"] = paired_ratio(rates["batched"], rates["per_sample"])
    if s.name != "digits":
        k = min(16, s.batch)
        entry["resample_difference"] = resample_difference(canvases[:k], sizes[:k], s)
    return entry


def run_augment(device: str, repeats: int, tiny: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name, s in (TINY if tiny else SETTINGS).items():
        entry = measure_setting(s, device, repeats)
        log(f"[augment] {name}: DINO multi-crop views/s batched on {device} {entry['batched']['views_per_s']['median']:.0f}"
            f" vs per-sample {entry['per_sample']['views_per_s']['median']:.0f}: {entry['speedup']['median']:.2f}x")  # fmt: skip
        results[name] = entry
    return {"usable_cores": usable_cores(), "torch_threads": torch.get_num_threads(), "settings": results,
            "order": "round-robin (one batched call, one per-sample call per round), ratios paired per round"}  # fmt: skip
