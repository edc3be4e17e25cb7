"""In-memory datasets: embedded digits, generated images, clear data errors (image folders: test_streaming.py)."""

from __future__ import annotations

import pytest
import torch

from benchmarks.per_sample_views import SingleViewTransform, ViewDataset
from ssl_platform.data.small_sets import (
    DataError,
    _check_images,
    load_digits_split,
    make_synthetic_split,
)


def test_digits_is_the_bundled_dataset_with_a_fixed_stratified_split():
    a = load_digits_split(32)
    b = load_digits_split(32)
    assert len(a.train.labels) + len(a.test.labels) == 1797 and a.num_classes == 10
    assert a.train.images.shape[1:] == (3, 32, 32) and 0.0 <= float(a.train.images.min()) <= float(a.train.images.max()) <= 1.0
    assert torch.equal(a.test.labels, b.test.labels) and torch.equal(a.test.images, b.test.images)
    counts = torch.bincount(a.test.labels, minlength=10).float()
    assert counts.min() >= 33 and counts.max() <= 38  # stratified: ~36 per class in 360


def test_synthetic_images_are_class_conditional():
    s = make_synthetic_split(num_samples=60, num_classes=3, image_size=16)
    assert s.train.images.shape[1:] == (3, 16, 16) and s.num_classes == 3
    assert set(s.train.labels.tolist()) == {0, 1, 2}


def test_wrong_shapes_and_channels_are_rejected():
    with pytest.raises(DataError, match=r"expected images \[N, C, H, W\]"):
        _check_images(torch.zeros(4, 8, 8), "x")
    with pytest.raises(DataError, match="1, 3 or 4 channels, got 5"):
        _check_images(torch.zeros(2, 5, 8, 8), "x")
    with pytest.raises(DataError, match="empty"):
        _check_images(torch.zeros(0, 3, 8, 8), "x")


def test_single_view_transform_gives_normalised_crops():
    s = make_synthetic_split(num_samples=60, image_size=16)
    ds = ViewDataset(s.train, SingleViewTransform(16, (0.5, 1.0)))
    item = ds[0]
    assert item["images"].shape == (3, 16, 16)
    assert float(item["images"].min()) >= -1.0 - 1e-5 and float(item["images"].max()) <= 1.0 + 1e-5
