"""The training views a method declares: data, not code (rendered by the platform's batched augmentation).

A method's :meth:`methods.base.SSLMethod.training_views` maps each keyword argument of its training ``forward`` to a
:class:`ViewGroup` of :class:`ViewRecipe` s, one recipe per view. The platform (``ssl_platform.data.augment``)
renders whatever is declared, batched on the device, and interprets no method name or view name: a group with
``single=True`` is passed as one ``[B, 3, S, S]`` tensor, any other as a list of them, one per recipe.

The recipes below follow the papers' torchvision pipelines:

* :func:`dino_recipes` -- DINO's multi-crop (Caron et al. 2021, ``DataAugmentationDINO``), also iBOT's;
* :func:`byol_recipes` -- BYOL's two asymmetric views (Grill et al. 2020, Table 6): blur 1.0 / 0.1, solarisation
  0 / 0.2, jitter (0.4, 0.4, 0.2, 0.1) at 0.8, grey 0.2, flip 0.5 (used by BYOL, MoCo v3, VICReg, Barlow Twins);
* :func:`simclr_recipes` -- SimCLR's two identical views (Chen et al. 2020, Appendix A): jitter with strength
  ``s`` (0.8 s, 0.8 s, 0.8 s, 0.2 s) at 0.8, grey 0.2, blur 0.5, flip 0.5;
* :func:`single_view` -- one random-resized crop from the spec's ``data.augment`` (MAE, SALT, data2vec, APL).

``data`` arguments are the spec's ``data`` section (any mapping with ``image_size``, ``augment`` and
``multicrop``), so a user's overrides of those keys reach every method's views.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

INTERPOLATIONS = ("bilinear", "bicubic")
RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)
BLUR_SIGMA = (0.1, 2.0)


@dataclass(frozen=True)
class ViewRecipe:
    """The augmentation of one view (one entry of DINO's ``DataAugmentationDINO``), probabilities per sample.

    :param size: output side (pixels).
    :param scale: random-resized-crop area range, relative to the sample's valid region.
    :param ratio: aspect-ratio range (width / height), sampled log-uniformly.
    :param hflip_p: horizontal-flip probability.
    :param color_jitter_p: probability of colour jitter (brightness / contrast / saturation / hue below).
    :param grayscale_p: probability of a grey conversion (after the jitter).
    :param blur_p: probability of a Gaussian blur, sigma ~ U(blur_sigma).
    :param blur_kernel: odd kernel side of the blur, or 0 (default): ``blur_kernel_size(size)``, about 10% of the view.
    :param solarize_p: probability of solarisation at 0.5.
    :param interpolation: resampling of the crop, ``bilinear`` or ``bicubic``, antialiased as torchvision's resize.
    """

    size: int
    scale: tuple[float, float]
    ratio: tuple[float, float] = RRC_RATIO
    hflip_p: float = 0.0
    color_jitter_p: float = 0.0
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.0
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = BLUR_SIGMA
    solarize_p: float = 0.0
    interpolation: str = "bilinear"
    blur_kernel: int = 0

    def __post_init__(self) -> None:
        if self.blur_kernel != 0 and (self.blur_kernel < 3 or self.blur_kernel % 2 == 0):
            raise ValueError(f"ViewRecipe.blur_kernel must be 0 (auto) or an odd integer >= 3, got {self.blur_kernel}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"ViewRecipe.interpolation must be one of {list(INTERPOLATIONS)}, got {self.interpolation!r}")
        if self.size < 1:
            raise ValueError(f"ViewRecipe.size must be >= 1, got {self.size}")
        lo, hi = self.scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"ViewRecipe.scale must be (min, max) with 0 < min <= max <= 1, got {self.scale}")
        if not 0.0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ViewRecipe.ratio must be (min, max) with 0 < min <= max, got {self.ratio}")
        for name in ("hflip_p", "color_jitter_p", "grayscale_p", "blur_p", "solarize_p"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"ViewRecipe.{name} must be a probability in [0, 1], got {p}")
        for name, bound in (("brightness", math.inf), ("contrast", math.inf), ("saturation", math.inf), ("hue", 0.5)):
            v = getattr(self, name)
            if not 0.0 <= v <= bound:
                raise ValueError(f"ViewRecipe.{name} must be in [0, {bound}], got {v}")
        if not 0.0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ValueError(f"ViewRecipe.blur_sigma must be (min, max) with 0 < min <= max, got {self.blur_sigma}")


def dino_recipes(
    global_size: int,
    local_size: int,
    n_global: int = 2,
    n_local: int = 6,
    global_scale: tuple[float, float] = (0.4, 1.0),
    local_scale: tuple[float, float] = (0.05, 0.4),
    hflip_p: float = 0.5,
    color_jitter_p: float = 0.8,
    solarize_p: float = 0.2,
) -> dict[str, list[ViewRecipe]]:
    """DINO's multi-crop (Caron et al. 2021, ``DataAugmentationDINO``) with ``MultiCropTransform``'s probabilities:
    flip ``hflip_p``, jitter (0.4, 0.4, 0.2, 0.1) ``color_jitter_p``, grey 0.2 on every view; blur 1.0 on the first
    global view, 0.1 on the others, 0.5 on local views; solarisation ``solarize_p`` on the globals after the first.
    ``n_local=0``: iBOT's global views only."""
    if n_global < 1:
        raise ValueError(f"n_global must be >= 1, got {n_global}")
    if n_local < 0:
        raise ValueError(f"n_local must be >= 0, got {n_local}")
    common = dict(hflip_p=hflip_p, color_jitter_p=color_jitter_p, grayscale_p=0.2, interpolation="bicubic")
    first = ViewRecipe(global_size, tuple(global_scale), blur_p=1.0, **common)
    other = ViewRecipe(global_size, tuple(global_scale), blur_p=0.1, solarize_p=solarize_p, **common)
    out = {"global_views": [first] + [other] * (n_global - 1)}
    if n_local > 0:
        out["local_views"] = [ViewRecipe(local_size, tuple(local_scale), blur_p=0.5, **common)] * n_local
    return out


@dataclass(frozen=True)
class ViewGroup:
    """The views passed to the training ``forward`` as one keyword argument.

    :param recipes: one recipe per view; all share ``size``, ``interpolation`` and ``blur_kernel`` (one resampling
        and one blur call render the group).
    :param single: pass the one view as a tensor ``[B, 3, S, S]`` (exactly one recipe) instead of a list of them.
    """

    recipes: tuple[ViewRecipe, ...]
    single: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "recipes", tuple(self.recipes))
        if not self.recipes:
            raise ValueError("ViewGroup needs at least one ViewRecipe")
        if self.single and len(self.recipes) != 1:
            raise ValueError(f"ViewGroup(single=True) takes exactly one recipe, got {len(self.recipes)}")
        for name in ("size", "interpolation", "blur_kernel"):
            values = [getattr(r, name) for r in self.recipes]
            if len(set(values)) != 1:
                raise ValueError(f"ViewGroup: the views differ in {name}: {values} (one call renders a group)")

    @property
    def size(self) -> int:
        return self.recipes[0].size


TrainingViews = dict[str, ViewGroup]


def _section(data: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = data.get(key) if isinstance(data, Mapping) else getattr(data, key, None)
    return value if value is not None else {}


def single_view(data: Mapping[str, Any], interpolation: str = "bilinear") -> TrainingViews:
    """``{"images": one view}`` from ``data.augment``: random-resized crop ``crop_scale``, flip 0.5 when ``hflip``,
    grey ``grayscale_p``, blur ``blur_p`` (``blur_sigma``, ``blur_kernel``), resampled with ``interpolation``."""
    aug = _section(data, "augment")
    recipe = ViewRecipe(
        int(data["image_size"]), tuple(aug.get("crop_scale", (0.6, 1.0))), hflip_p=0.5 if aug.get("hflip") else 0.0,
        grayscale_p=float(aug.get("grayscale_p", 0.0)), blur_p=float(aug.get("blur_p", 0.0)),
        blur_sigma=tuple(aug.get("blur_sigma", BLUR_SIGMA)), blur_kernel=int(aug.get("blur_kernel", 0)),
        interpolation=interpolation,
    )
    return {"images": ViewGroup((recipe,), single=True)}


def multicrop_views(data: Mapping[str, Any], with_locals: bool = True) -> TrainingViews:
    """``{"global_views": ..., "local_views": ...}`` from ``data.multicrop`` (:func:`dino_recipes`, bicubic as DINO's
    and iBOT's ``RandomResizedCrop``); no ``local_views`` when ``n_local`` is 0 or ``with_locals`` is False."""
    mc = _section(data, "multicrop")
    recipes = dino_recipes(
        int(data["image_size"]), int(mc.get("local_size", 16)), int(mc.get("n_global", 2)),
        int(mc.get("n_local", 4)) if with_locals else 0, tuple(mc.get("global_scale", (0.4, 1.0))),
        tuple(mc.get("local_scale", (0.1, 0.4))), float(mc.get("hflip_p", 0.5)), float(mc.get("color_jitter_p", 0.8)),
        float(mc.get("solarize_p", 0.2)),
    )
    return {key: ViewGroup(tuple(r)) for key, r in recipes.items()}


def byol_recipes(size: int, scale: Sequence[float] = (0.08, 1.0), interpolation: str = "bicubic") -> tuple[ViewRecipe, ViewRecipe]:
    """BYOL's two views (Grill et al. 2020, Appendix B, Table 6): random-resized crop ``scale``, flip 0.5, colour
    jitter (0.4, 0.4, 0.2, 0.1) with p 0.8, grey 0.2, Gaussian blur p 1.0 / 0.1 and solarisation p 0.0 / 0.2
    (view 1 / view 2). MoCo v3, VICReg and Barlow Twins use the same asymmetric pair."""
    common = dict(hflip_p=0.5, color_jitter_p=0.8, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1,
                  grayscale_p=0.2, interpolation=interpolation)
    return (ViewRecipe(int(size), tuple(scale), blur_p=1.0, solarize_p=0.0, **common),
            ViewRecipe(int(size), tuple(scale), blur_p=0.1, solarize_p=0.2, **common))


def simclr_recipes(
    size: int, scale: Sequence[float] = (0.08, 1.0), strength: float = 1.0, blur_p: float = 0.5,
    interpolation: str = "bicubic",
) -> tuple[ViewRecipe, ViewRecipe]:
    """SimCLR's two views (Chen et al. 2020, Appendix A; google-research/simclr ``data_util.py``): random-resized
    crop ``scale``, flip 0.5, colour jitter (0.8 s, 0.8 s, 0.8 s, 0.2 s) with p 0.8, grey 0.2, blur ``blur_p``
    (0.5 on ImageNet; CIFAR-10 drops it)."""
    s = float(strength)
    recipe = ViewRecipe(int(size), tuple(scale), hflip_p=0.5, color_jitter_p=0.8, brightness=0.8 * s,
                        contrast=0.8 * s, saturation=0.8 * s, hue=min(0.5, 0.2 * s), grayscale_p=0.2,
                        blur_p=float(blur_p), interpolation=interpolation)
    return recipe, recipe


def two_views(recipes: Sequence[ViewRecipe]) -> TrainingViews:
    """``{"views": [view 1, view 2, ...]}``: the joint-embedding methods' ``forward(views=[...])``."""
    return {"views": ViewGroup(tuple(recipes))}
