"""The per-sample view path: the reference that ``ssl_platform.data.augment``'s batched views are measured and tested
against (benchmarks and tests only; the platform makes every view in batches on the worker's device).

- :class:`SingleViewTransform`: one random resized crop (+ optional flip), normalised (MAE, SALT, data2vec, APL).
- :class:`MultiCropTransform`: DINO / iBOT multi-crop, per image, as ``DataAugmentationDINO``.
- :class:`ViewDataset`: a small split -> per-sample view dicts for a ``DataLoader``.

Multi-crop view generation for DINO / iBOT (Caron et al. 2021, arXiv 2104.14294, ``DataAugmentationDINO``;
Zhou et al. 2022, arXiv 2111.07832).

Each image gives ``n_global`` global crops (``RandomResizedCrop`` to ``global_size`` with scale in
``global_scale``) and ``n_local`` local crops (``local_size``, scale in ``local_scale``), each followed by
horizontal flip (p=0.5), colour jitter (0.4, 0.4, 0.2, 0.1; p=0.8), grayscale (p=0.2), Gaussian blur
(sigma in [0.1, 2]; p=1.0 on the first global crop, 0.1 on the other globals, 0.5 on local crops),
solarisation (p=0.2, on the globals after the first) and normalisation.

- :class:`DeclaredViewsTransform` / :func:`build_view_transform`: any method's declared views
  (:meth:`methods.base.SSLMethod.training_views`) rendered per image with torchvision.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from omegaconf import DictConfig
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from methods.base import SSLMethod
from methods.views import TrainingViews, ViewRecipe
from ssl_platform.data.small_sets import MEAN, STD, Split, normalize

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _blur_kernel(size: int) -> int:
    """An odd Gaussian kernel about 10% of the crop size (at least 3)."""
    k = max(3, size // 10)
    return k if k % 2 == 1 else k + 1


class _Clamp01(torch.nn.Module):
    """Clamp to [0, 1]: bicubic resizing overshoots, and colour jitter's hue step turns such values into NaN."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(0.0, 1.0)


class MultiCropTransform:
    """``image [3, H, W] float in [0, 1] -> {"global_views": [...], "local_views": [...]}`` (normalised).

    :param global_size: side of the global crops.
    :param local_size: side of the local crops.
    :param n_global: number of global crops (default 2).
    :param n_local: number of local crops (0 for iBOT: then only ``global_views`` is returned).
    :param global_scale: ``RandomResizedCrop`` area range of global crops (default (0.4, 1.0)).
    :param local_scale: area range of local crops (default (0.05, 0.4)).
    :param mean: normalisation mean (default ImageNet).
    :param std: normalisation std (default ImageNet).
    :param hflip_p: horizontal-flip probability (DINO: 0.5; 0 for data where mirroring changes the class, e.g. digits).
    :param color_jitter_p: colour-jitter probability (DINO: 0.8).
    :param solarize_p: solarisation probability of the second global crop (DINO: 0.2).
    """

    def __init__(
        self,
        global_size: int,
        local_size: int,
        n_global: int = 2,
        n_local: int = 6,
        global_scale: tuple[float, float] = (0.4, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.4),
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        hflip_p: float = 0.5,
        color_jitter_p: float = 0.8,
        solarize_p: float = 0.2,
    ):
        if n_global < 1:
            raise ValueError(f"n_global must be >= 1, got {n_global}")
        if n_local < 0:
            raise ValueError(f"n_local must be >= 0, got {n_local}")
        for name, p in (("hflip_p", hflip_p), ("color_jitter_p", color_jitter_p), ("solarize_p", solarize_p)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {p}")
        self.global_size, self.local_size = int(global_size), int(local_size)
        self.n_global, self.n_local = int(n_global), int(n_local)

        def flip_color() -> list[Any]:
            return [
                T.RandomHorizontalFlip(p=hflip_p),
                T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=color_jitter_p),
                T.RandomGrayscale(p=0.2),
            ]

        def blur(size: int, p: float) -> Any:
            return T.RandomApply([T.GaussianBlur(kernel_size=_blur_kernel(size), sigma=(0.1, 2.0))], p=p)

        normalize = T.Normalize(mean=list(mean), std=list(std))
        crop = dict(interpolation=InterpolationMode.BICUBIC, antialias=True)
        self.global1 = T.Compose(
            [
                T.RandomResizedCrop(global_size, scale=global_scale, **crop),
                _Clamp01(),
                *flip_color(),
                blur(global_size, 1.0),
                normalize,
            ]
        )
        self.global2 = T.Compose(
            [
                T.RandomResizedCrop(global_size, scale=global_scale, **crop),
                _Clamp01(),
                *flip_color(),
                blur(global_size, 0.1),
                T.RandomSolarize(threshold=0.5, p=solarize_p),
                normalize,
            ]
        )
        self.local = T.Compose(
            [
                T.RandomResizedCrop(local_size, scale=local_scale, **crop),
                _Clamp01(),
                *flip_color(),
                blur(local_size, 0.5),
                normalize,
            ]
        )

    @staticmethod
    def _to_float_rgb(image: Any) -> torch.Tensor:
        x = T.ToImage()(image) if not isinstance(image, torch.Tensor) else image
        if not x.is_floating_point():
            x = x.float() / 255.0
        x = x.float()
        if x.ndim != 3:
            raise ValueError(f"MultiCropTransform expects one image [C, H, W], got shape {tuple(x.shape)}")
        if x.shape[0] == 1:
            x = x.expand(3, -1, -1)
        if x.shape[0] != 3:
            raise ValueError(f"MultiCropTransform expects 1 or 3 channels, got {x.shape[0]}")
        return x.clamp(0.0, 1.0).contiguous()

    def __call__(self, image: Any) -> dict[str, list[torch.Tensor]]:
        x = self._to_float_rgb(image)
        out: dict[str, list[torch.Tensor]] = {
            "global_views": [self.global1(x)] + [self.global2(x) for _ in range(self.n_global - 1)]
        }
        if self.n_local > 0:
            out["local_views"] = [self.local(x) for _ in range(self.n_local)]
        return out


def multicrop_collate(samples: Sequence[Any]) -> Any:
    """Stack per-sample view dicts into batched lists: ``{"global_views": [[B,3,G,G], ...], ...}``.

    ``samples`` are either dicts from :class:`MultiCropTransform` or ``(dict, label)`` pairs; in the second case
    ``(batched dict, labels tensor)`` is returned.
    """
    if not samples:
        raise ValueError("multicrop_collate got an empty batch")
    if isinstance(samples[0], dict):
        views, labels = list(samples), None
    else:
        views = [s[0] for s in samples]
        labels = torch.as_tensor([int(s[1]) for s in samples])
    out: dict[str, list[torch.Tensor]] = {}
    for key in views[0]:
        counts = {len(v[key]) for v in views}
        if len(counts) != 1:
            raise ValueError(f"multicrop_collate: samples have different numbers of {key}: {sorted(counts)}")
        out[key] = [torch.stack([v[key][i] for v in views]) for i in range(counts.pop())]
    return out if labels is None else (out, labels)


class SingleViewTransform:
    """One augmented view (MAE, SALT, data2vec, APL): random resized crop (+ optional flip), normalised."""

    def __init__(self, size: int, crop_scale: tuple[float, float] = (0.6, 1.0), hflip: bool = False):
        ops = [T.RandomResizedCrop(size, scale=tuple(crop_scale), antialias=True)]
        if hflip:
            ops.append(T.RandomHorizontalFlip())
        self.transform = T.Compose(ops)

    def __call__(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"images": normalize(self.transform(image))}


def recipe_transform(recipe: ViewRecipe, mean: Sequence[float], std: Sequence[float]) -> Any:
    """One :class:`methods.views.ViewRecipe` as torchvision's per-image pipeline: ``RandomResizedCrop``, flip,
    ``RandomApply(ColorJitter)``, ``RandomGrayscale``, ``RandomApply(GaussianBlur)``, ``RandomSolarize(0.5)``,
    normalisation (the steps and probabilities the batched views draw per sample)."""
    mode = InterpolationMode.BICUBIC if recipe.interpolation == "bicubic" else InterpolationMode.BILINEAR
    ops: list[Any] = [T.RandomResizedCrop(recipe.size, scale=tuple(recipe.scale), ratio=tuple(recipe.ratio),
                                          interpolation=mode, antialias=True), _Clamp01()]
    if recipe.hflip_p > 0:
        ops.append(T.RandomHorizontalFlip(p=recipe.hflip_p))
    if recipe.color_jitter_p > 0:
        jitter = T.ColorJitter(recipe.brightness, recipe.contrast, recipe.saturation, recipe.hue)
        ops.append(T.RandomApply([jitter], p=recipe.color_jitter_p))
    if recipe.grayscale_p > 0:
        ops.append(T.RandomGrayscale(p=recipe.grayscale_p))
    if recipe.blur_p > 0:
        kernel = recipe.blur_kernel or _blur_kernel(recipe.size)
        ops.append(T.RandomApply([T.GaussianBlur(kernel, sigma=tuple(recipe.blur_sigma))], p=recipe.blur_p))
    if recipe.solarize_p > 0:
        ops.append(T.RandomSolarize(threshold=0.5, p=recipe.solarize_p))
    ops.append(T.Normalize(mean=list(mean), std=list(std)))
    return T.Compose(ops)


class DeclaredViewsTransform:
    """``image [3, H, W] float in [0, 1]`` -> the keyword arguments of a method's training ``forward``, per image,
    from the views it declares (:meth:`methods.base.SSLMethod.training_views`): a ``single`` group gives a tensor,
    any other a list of tensors (one per recipe)."""

    def __init__(self, views: TrainingViews, mean: Sequence[float] = MEAN, std: Sequence[float] = STD):
        self.groups = {key: (g.single, [recipe_transform(r, mean, std) for r in g.recipes]) for key, g in views.items()}

    def __call__(self, image: torch.Tensor) -> dict[str, Any]:
        x = image.float().clamp(0.0, 1.0)
        if x.shape[0] == 1:
            x = x.expand(3, -1, -1)
        out: dict[str, Any] = {}
        for key, (single, transforms) in self.groups.items():
            views = [t(x) for t in transforms]
            out[key] = views[0] if single else views
        return out


def build_view_transform(method: type[SSLMethod] | SSLMethod, data: DictConfig) -> DeclaredViewsTransform:
    """The per-sample path of ``method``'s declared training views for the spec's ``data`` section, normalised with
    the data's statistics (the same as the small sets' evaluation tensors)."""
    return DeclaredViewsTransform(type(method).training_views(data) if isinstance(method, SSLMethod)
                                  else method.training_views(data))


class ViewDataset(Dataset):
    """Training split -> per-sample view dicts (``default_collate`` batches dicts and lists of views).

    ``transform_threads``: torch intra-op threads while a batch's per-sample augmentations run (``DataLoader``
    fetches a batch through :meth:`__getitems__`); ``None`` (default) keeps the process setting. On a busy
    machine, 1 thread makes multi-crop 5-30x faster when the loader runs in a process's main thread, but not
    in a Ray Train worker, whose loop runs in another thread (benchmarks/README.md): the platform keeps None.
    """

    def __init__(self, split: Split, transform, transform_threads: int | None = None):
        self.split = split
        self.transform = transform
        self.transform_threads = transform_threads

    def __len__(self) -> int:
        return len(self.split.labels)

    def __getitem__(self, index: int):
        return self.transform(self.split.images[index])

    def __getitems__(self, indices: list[int]) -> list:
        threads = self.transform_threads
        previous = torch.get_num_threads()
        if threads is None or previous <= threads:
            return [self[i] for i in indices]
        torch.set_num_threads(threads)
        try:
            return [self[i] for i in indices]
        finally:
            torch.set_num_threads(previous)
