"""Datasets and per-method views.

* ``digits``: scikit-learn's bundled digits (1797 real 8x8 images, 10 classes), the embedded default: grey
  values 0..16 -> [0, 1], replicated to RGB and resized to ``image_size``; a fixed stratified train/test split.
* ``synthetic``: generated class-conditional images (oriented gratings + noise) for fast tests.
* ``cifar10``: torchvision's CIFAR-10 from an existing local copy under ``root`` (no download here).

These small sources are held in memory by every worker (``ssl_platform.data.streaming.InMemoryImages``); real
datasets (``image_folder``, ``shards``) are streamed (``ssl_platform.data.streaming``). Both reach the same
device-side augmentation (``ssl_platform.data.augment``). The per-sample torchvision transforms below are the
reference that augmentation reproduces (tests compare the distributions; ``benchmarks`` times both).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}


class DataError(ValueError):
    """The data is not usable (empty folder, wrong shape or channels)."""


@dataclass
class Split:
    """Images in [0, 1] as a float tensor ``[N, 3, S, S]`` and integer labels ``[N]``."""

    images: torch.Tensor
    labels: torch.Tensor


@dataclass
class TrainTest:
    train: Split
    test: Split
    num_classes: int


def normalize(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(MEAN, dtype=images.dtype).view(-1, 1, 1)
    std = torch.tensor(STD, dtype=images.dtype).view(-1, 1, 1)
    return (images - mean) / std


def _check_images(images: torch.Tensor, what: str) -> torch.Tensor:
    if images.ndim != 4:
        raise DataError(f"{what}: expected images [N, C, H, W], got shape {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise DataError(f"{what}: the dataset is empty")
    c = images.shape[1]
    if c == 1:
        images = images.expand(-1, 3, -1, -1)
    elif c == 4:
        images = images[:, :3]
    elif c != 3:
        raise DataError(f"{what}: expected 1, 3 or 4 channels, got {c} (shape {tuple(images.shape)})")
    return images.contiguous()


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)


def _stratified_split(labels: np.ndarray, test_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    counts = np.bincount(labels)
    n_test = int(np.ceil(len(labels) * test_fraction))
    n_classes = int((counts > 0).sum())
    stratify = labels if counts[counts > 0].min() >= 2 and min(n_test, len(labels) - n_test) >= n_classes else None
    train_idx, test_idx = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=stratify)
    return np.sort(train_idx), np.sort(test_idx)


def _from_arrays(images: torch.Tensor, labels: np.ndarray, size: int, test_fraction: float, what: str) -> TrainTest:
    images = _resize(_check_images(images.float(), what), size)
    train_idx, test_idx = _stratified_split(labels, test_fraction)
    lab = torch.as_tensor(labels, dtype=torch.long)
    return TrainTest(
        train=Split(images[train_idx], lab[train_idx]),
        test=Split(images[test_idx], lab[test_idx]),
        num_classes=int(labels.max()) + 1,
    )


def load_digits_split(image_size: int = 32, test_fraction: float = 0.2) -> TrainTest:
    """scikit-learn's bundled digits as RGB tensors; fixed stratified split (random_state=0)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return _from_arrays(images, digits.target.astype(np.int64), image_size, test_fraction, "digits")


def make_synthetic_split(
    num_samples: int = 512, num_classes: int = 10, image_size: int = 32, test_fraction: float = 0.2, seed: int = 0
) -> TrainTest:
    """Class-conditional gratings: class ``c`` has orientation ``pi * c / C`` and a class colour, plus noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_samples) % num_classes
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, image_size), torch.linspace(-1, 1, image_size), indexing="ij")
    angle = np.pi * labels.float() / num_classes
    phase = torch.rand(num_samples, generator=g) * 2 * np.pi
    freq = 3.0 + torch.rand(num_samples, generator=g)
    proj = xx[None] * torch.cos(angle)[:, None, None] + yy[None] * torch.sin(angle)[:, None, None]
    wave = 0.5 + 0.5 * torch.sin(freq[:, None, None] * np.pi * proj + phase[:, None, None])
    hue = torch.stack([torch.cos(angle), torch.sin(angle), -torch.cos(angle)], dim=1) * 0.25 + 0.5
    images = wave[:, None] * hue[:, :, None, None] + 0.1 * torch.randn(num_samples, 3, image_size, image_size, generator=g)
    return _from_arrays(images.clamp(0, 1), labels.numpy(), image_size, test_fraction, "synthetic")


def load_cifar10_split(root: str, image_size: int = 32) -> TrainTest:
    """CIFAR-10 from an existing local copy (``download=False``); its own train/test split."""
    from torchvision import datasets

    if not root or not Path(root).is_dir():
        raise DataError(f"data.root: expected a directory holding cifar-10-batches-py, got {root!r}")
    try:
        tr = datasets.CIFAR10(root, train=True, download=False)
        te = datasets.CIFAR10(root, train=False, download=False)
    except RuntimeError as err:
        raise DataError(f"data.root: {root!r}: {err}") from None

    def split(ds) -> Split:
        imgs = torch.as_tensor(ds.data).permute(0, 3, 1, 2).float() / 255.0
        return Split(_resize(imgs, image_size), torch.as_tensor(ds.targets, dtype=torch.long))

    return TrainTest(split(tr), split(te), 10)


def load_split(data: DictConfig) -> TrainTest:
    """The spec's ``data`` section of a small in-memory source -> train/test tensors in [0, 1] (``image_folder`` and
    ``shards`` are streamed: ``ssl_platform.data.streaming``)."""
    if data.name == "digits":
        return load_digits_split(data.image_size, data.test_fraction)
    if data.name == "synthetic":
        return make_synthetic_split(data.num_samples, data.num_classes, data.image_size, data.test_fraction)
    if data.name == "cifar10":
        return load_cifar10_split(data.root, data.image_size)
    raise DataError(f"data.name: unknown dataset {data.name!r}")


def eval_tensors(split: Split) -> torch.Tensor:
    """Un-augmented, normalised images for embedding (kNN / linear probe)."""
    return normalize(split.images)
