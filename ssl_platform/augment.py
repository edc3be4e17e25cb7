"""TEMPORARY per-sample stand-in for the batched device augmentation (replaced by branch issue14-augment)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from ssl_platform.data import MEAN, STD, build_view_transform


def _valid(images: torch.Tensor, sizes: torch.Tensor | None, i: int) -> torch.Tensor:
    x = images[i].float() / 255.0
    if sizes is None:
        return x
    h, w = int(sizes[i, 0]), int(sizes[i, 1])
    return x[:, :h, :w]


class BatchViews:
    def __init__(self, transform):
        self.transform = transform

    @classmethod
    def from_spec(cls, view_kind: str, data: DictConfig) -> BatchViews:
        return cls(build_view_transform(view_kind, data))

    def __call__(self, images, sizes=None, generator=None) -> dict:
        from torch.utils.data import default_collate

        return default_collate([self.transform(_valid(images, sizes, i)) for i in range(len(images))])


def eval_views(images: torch.Tensor, sizes: torch.Tensor | None, image_size: int) -> torch.Tensor:
    out = []
    for i in range(len(images)):
        x = _valid(images, sizes, i)
        h, w = x.shape[-2:]
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        x = x[:, top:top + s, left:left + s]
        if s != image_size:
            x = F.interpolate(x[None], size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)[0]
        out.append(x)
    x = torch.stack(out)
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std
