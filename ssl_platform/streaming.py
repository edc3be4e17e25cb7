"""Training and evaluation images as streams of uint8 batches, the same for every source.

Streamed sources (``image_folder``, ``shards``) are Ray Data datasets built on the driver (nothing is read
before training starts): files are listed and read lazily, shuffled by file every epoch
(``FileShuffleConfig(reseed_after_execution=True)``), decoded by :class:`Decoder` in Ray Data tasks on the
cluster's CPUs, split across the Train workers (``TorchTrainer(datasets=...)`` ->
``ray.train.get_dataset_shard``) and prefetched. The CPU only decodes: each image is fitted into a
``decode_size x decode_size`` uint8 canvas (aspect kept, never enlarged, placed top-left, zero padded) and its
valid ``(height, width)`` travels with it, so the device-side random crops (``ssl_platform.augment``) sample
the real image exactly as torchvision's per-sample transforms would. JPEGs decode at reduced DCT scale when
the canvas is smaller (``PIL.Image.draft``).

A file that cannot be decoded becomes a row with ``ok=False`` and its path: the worker drops it from the batch,
warns naming it and counts it (``bad_images``); past ``data.max_bad_fraction`` of an epoch the run stops
(:class:`BadDataError`).

Small in-memory sources (digits, synthetic, cifar10) keep their arrays as uint8 ``[N, 3, S, S]`` in each
worker (a few MB) and yield the same :class:`ImageBatch`, sharded by rank with a per-epoch permutation.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from ssl_platform.data import DataError

IMAGE_COLUMN, SIZE_COLUMN, LABEL_COLUMN, OK_COLUMN, PATH_COLUMN = "image", "size", "label", "ok", "path"


class BadDataError(DataError):
    """Too many training files could not be decoded."""


@dataclass
class ImageBatch:
    """uint8 images ``[B, 3, C, C]`` (a canvas per image), their valid ``(h, w)`` ``[B, 2]`` (``None``: the whole
    canvas), labels ``[B]``, what identifies each image (``keys``: file paths, or indices of an in-memory set) and
    the paths of the rows dropped because they could not be decoded."""

    images: torch.Tensor
    sizes: torch.Tensor | None
    labels: torch.Tensor
    keys: list[str] = field(default_factory=list)
    bad_paths: list[str] = field(default_factory=list)

    def to(self, device: torch.device) -> ImageBatch:
        if self.images.device == device:
            return self
        non_blocking = device.type == "cuda"
        images = self.images.pin_memory() if non_blocking else self.images
        sizes = None if self.sizes is None else self.sizes.to(device, non_blocking=non_blocking)
        return ImageBatch(images.to(device, non_blocking=non_blocking), sizes, self.labels, self.keys, self.bad_paths)


def canvas_size(data: DictConfig) -> int:
    """The CPU-side canvas: ``data.decode_size``, or 4/3 of ``data.image_size`` rounded up to a multiple of 8 (so
    a 4:3 photo keeps a short side >= image_size: 224 -> 304)."""
    return int(data.decode_size) or int(math.ceil(data.image_size * 4 / 3 / 8) * 8)


# ---- CPU side: decode into a canvas ---------------------------------------------------------------------
def decode_to_canvas(encoded: bytes, canvas: int) -> tuple[np.ndarray, int, int]:
    """Decode an image file's bytes to RGB and fit it into ``canvas x canvas`` (``uint8 [C, C, 3]``, h, w)."""
    from PIL import Image

    with Image.open(io.BytesIO(encoded)) as img:
        w, h = img.size
        scale = min(1.0, canvas / max(w, h))
        tw, th = max(1, round(w * scale)), max(1, round(h * scale))
        if scale < 1.0:
            img.draft("RGB", (tw, th))  # JPEG: decode at a reduced DCT scale, still >= the target size
        rgb = img.convert("RGB")
        if rgb.size != (tw, th):
            rgb = rgb.resize((tw, th), Image.BILINEAR)  # PIL filters over the source footprint (antialiased)
        out = np.zeros((canvas, canvas, 3), dtype=np.uint8)
        out[:th, :tw] = np.asarray(rgb)
    return out, th, tw


def decode_batch(
    batch: dict[str, np.ndarray], *, canvas: int, root: str | None = None, class_index: dict[str, int] | None = None,
    holdout: tuple[float, bool] | None = None,
) -> dict[str, np.ndarray]:
    """Ray Data ``map_batches`` function: encoded rows -> canvas rows.

    Input columns: ``bytes`` (``read_binary_files``) or ``image`` (shards), ``path``, and ``label`` (shards;
    image folders derive it from the class folder under ``root`` with ``class_index``). ``holdout=(fraction,
    test)`` keeps only the files of one side of the hash split (:func:`ssl_platform.sources.in_test_split`).
    """
    from ssl_platform.sources import in_test_split

    encoded = batch["bytes"] if "bytes" in batch else batch[IMAGE_COLUMN]
    paths = [str(p) for p in batch[PATH_COLUMN]]
    given = batch.get(LABEL_COLUMN)
    images, sizes, labels, oks, kept_paths = [], [], [], [], []
    prefix = (root.rstrip("/") + "/") if root else ""
    for i, path in enumerate(paths):
        rel = path[len(prefix):] if prefix and path.startswith(prefix) else path
        if holdout is not None and in_test_split(rel, holdout[0]) != holdout[1]:
            continue
        if given is not None:
            label = int(given[i])
        else:
            cls, sep, _ = rel.partition("/")
            if not sep or cls not in class_index:
                continue  # a file outside the class folders (preflight names them)
            label = class_index[cls]
        try:
            image, h, w = decode_to_canvas(bytes(encoded[i]), canvas)
            ok = True
        except Exception:  # noqa: BLE001 -- any decoder failure makes the file a bad row, named by the worker
            image, h, w, ok = np.zeros((canvas, canvas, 3), dtype=np.uint8), 0, 0, False
        images.append(image)
        sizes.append((h, w))
        labels.append(label)
        oks.append(ok)
        kept_paths.append(path)
    return {
        IMAGE_COLUMN: np.stack(images) if images else np.zeros((0, canvas, canvas, 3), dtype=np.uint8),
        SIZE_COLUMN: np.asarray(sizes, dtype=np.int32).reshape(-1, 2),
        LABEL_COLUMN: np.asarray(labels, dtype=np.int64),
        OK_COLUMN: np.asarray(oks, dtype=bool),
        PATH_COLUMN: np.asarray(kept_paths, dtype=object),
    }


# ---- driver side: Ray Data datasets ---------------------------------------------------------------------
@dataclass
class StreamedSource:
    """A streamed source as the driver knows it before Ray starts: counts, classes and where to read; no pixels.

    :func:`plan_streamed_source` lists the folder (or reads the shard manifests) once and raises
    :class:`DataError` for every problem; :meth:`datasets` then builds the lazy Ray Data pipelines.
    """

    kind: str  # image_folder | shards
    num_train: int
    num_val: int
    classes: list[str]
    root_path: str
    val_path: str | None
    holdout: float | None  # test_fraction of the hash split when there is no val_root
    shard_paths: tuple[list[str], list[str]] | None = None  # shards: (train, val) shard files

    def datasets(self, spec: DictConfig) -> dict[str, Any]:
        """``{"train", "eval_train", "eval_val"}`` Ray Data datasets (lazy: nothing is read here)."""
        import ray.data

        context = ray.data.DataContext.get_current()  # the worker loop prints progress; Ray Data's bars are noise
        context.enable_progress_bars = False
        context.print_on_execution_start = False
        data = spec.data
        endpoint = spec.checkpoint.get("endpoint_url")
        cap = int(spec.eval.knn.max_train_samples)
        # a capped kNN bank is the first `cap` files of one fixed random order (listing order would be a few classes)
        bank_order = _file_shuffle(spec.seed, every_epoch=False) if cap and cap < self.num_train else None
        if self.kind == "shards":
            train_files, val_files = self.shard_paths

            train = _decoded(_read_shards(data.root, train_files, _file_shuffle(spec.seed), endpoint), data)
            eval_train = _decoded(_read_shards(data.root, train_files, bank_order, endpoint), data)
            eval_val = _decoded(_read_shards(data.val_root, val_files, None, endpoint), data)
        else:
            index = {c: i for i, c in enumerate(self.classes)}
            hold_train = None if self.holdout is None else (self.holdout, False)
            hold_val = None if self.holdout is None else (self.holdout, True)
            val_uri, val_root = (data.val_root, self.val_path) if self.val_path else (data.root, self.root_path)

            def folder(uri: str, root: str, hold, shuffle):
                return _decoded(_read_files(uri, shuffle, endpoint), data, root=root, class_index=index, holdout=hold)

            train = folder(data.root, self.root_path, hold_train, _file_shuffle(spec.seed))
            eval_train = folder(data.root, self.root_path, hold_train, bank_order)
            eval_val = folder(val_uri, val_root, hold_val, None)
        return {"train": train, "eval_train": eval_train.limit(cap) if bank_order else eval_train, "eval_val": eval_val}


def plan_streamed_source(spec: DictConfig) -> StreamedSource:
    """List ``data.root`` (and ``data.val_root``) or read their shard manifests; validate. Runs before Ray starts."""
    from ssl_platform.sources import list_image_folder, relabel, split_by_hash

    data = spec.data
    endpoint = spec.checkpoint.get("endpoint_url")
    if data.name == "shards":
        return _plan_shards(spec, endpoint)
    if data.name != "image_folder":
        raise DataError(f"data.name: expected one of image_folder, shards for a streamed source, got {data.name!r}")
    listing = list_image_folder(data.root, "data.root", endpoint)
    if data.val_root:
        val = relabel(list_image_folder(data.val_root, "data.val_root", endpoint), listing.classes)
        return StreamedSource("image_folder", len(listing), len(val), listing.classes, listing.path, val.path, None)
    train, test = split_by_hash(listing, data.test_fraction)
    return StreamedSource("image_folder", len(train), len(test), listing.classes, listing.path, None, data.test_fraction)


def _plan_shards(spec: DictConfig, endpoint: str | None) -> StreamedSource:
    from ssl_platform.shards import read_manifest

    data = spec.data
    train = read_manifest(data.root, "data.root", endpoint=endpoint)
    if not data.val_root:  # a hash hold-out would need every image's path: shards name only their counts
        raise DataError("data.val_root: expected the shards of a validation split for data.name=shards (run prepare-data "
                        "on the val/ folder too), got None")
    val = read_manifest(data.val_root, "data.val_root", endpoint=endpoint)
    if list(val.classes) != list(train.classes):
        raise DataError(f"data.val_root: expected shards with the classes of data.root ({len(train.classes)} classes, "
                        f"labels by the same index), got {data.val_root!r} with {len(val.classes)} classes")
    return StreamedSource("shards", train.num_images, val.num_images, list(train.classes), data.root, data.val_root, None,
                          shard_paths=(list(train.shard_paths), list(val.shard_paths)))


def _file_shuffle(seed: int | None, every_epoch: bool = True):
    """Files in a new order every epoch (each execution of the dataset is reseeded from ``seed``), or in one fixed
    random order (``every_epoch=False``: the same capped kNN bank at every evaluation, a sample of every class)."""
    from ray.data import FileShuffleConfig

    return None if seed is None else FileShuffleConfig(seed=seed, reseed_after_execution=every_epoch)


def _read_files(uri: str, shuffle, endpoint: str | None):
    import ray.data

    from ssl_platform.data import IMAGE_SUFFIXES
    from ssl_platform.sources import data_filesystem

    fs, path = data_filesystem(uri, endpoint)
    return ray.data.read_binary_files(path, filesystem=fs, include_paths=True, shuffle=shuffle,
                                      file_extensions=sorted(s.lstrip(".") for s in IMAGE_SUFFIXES))


def _read_shards(uri: str, files: list[str], shuffle, endpoint: str | None):
    import ray.data

    from ssl_platform.sources import data_filesystem

    fs, _ = data_filesystem(uri, endpoint)
    return ray.data.read_parquet(files, filesystem=fs, columns=[IMAGE_COLUMN, LABEL_COLUMN, PATH_COLUMN],
                                 shuffle=shuffle)


def _decoded(ds, data: DictConfig, **decode_kwargs):
    fn = partial(decode_batch, canvas=canvas_size(data), **decode_kwargs)
    return ds.map_batches(fn, batch_format="numpy", batch_size=32, concurrency=int(data.num_workers) or None)


# ---- worker side: uint8 batches -------------------------------------------------------------------------
def streamed_batches(
    shard, batch_size: int, *, prefetch_batches: int = 2, shuffle_buffer: int = 0, seed: int | None = None,
    drop_last: bool = True,
) -> Iterator[ImageBatch]:
    """One pass over a worker's ``DataIterator`` as :class:`ImageBatch` (undecodable rows dropped, named)."""
    for b in shard.iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=prefetch_batches,
                                drop_last=drop_last, local_shuffle_buffer_size=shuffle_buffer or None,
                                local_shuffle_seed=seed if shuffle_buffer else None):
        ok = b[OK_COLUMN]
        bad = [str(p) for p in b[PATH_COLUMN][~ok]]
        if bad:
            ok_idx = np.flatnonzero(ok)
            images, sizes, labels, paths = (b[c][ok_idx] for c in (IMAGE_COLUMN, SIZE_COLUMN, LABEL_COLUMN, PATH_COLUMN))
        else:
            images, sizes, labels, paths = (b[c] for c in (IMAGE_COLUMN, SIZE_COLUMN, LABEL_COLUMN, PATH_COLUMN))
        yield ImageBatch(
            images=torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2),
            sizes=torch.from_numpy(np.ascontiguousarray(sizes)).long(),
            labels=torch.from_numpy(np.ascontiguousarray(labels)).long(),
            keys=[str(p) for p in paths],
            bad_paths=bad,
        )


@dataclass
class InMemoryImages:
    """A small source held by every worker: uint8 ``[N, 3, S, S]`` and labels ``[N]``."""

    images: torch.Tensor
    labels: torch.Tensor

    @classmethod
    def from_float(cls, images: torch.Tensor, labels: torch.Tensor) -> InMemoryImages:
        return cls((images.clamp(0, 1) * 255).round().to(torch.uint8).contiguous(), labels.long())

    def __len__(self) -> int:
        return len(self.labels)

    def shard_indices(self, rank: int, world: int, epoch: int | None, seed: int) -> torch.Tensor:
        """This rank's equal share: every ``world``-th index of a per-epoch permutation (``epoch=None``: all, in order)."""
        if epoch is None:  # evaluation: every image once, spread over the ranks
            return torch.arange(len(self))[rank::world]
        n = len(self) // world * world
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        return order[:n][rank::world]

    def batches(self, batch_size: int, rank: int, world: int, epoch: int | None, seed: int,
                drop_last: bool = True) -> Iterator[ImageBatch]:
        idx = self.shard_indices(rank, world, epoch, seed)
        stop = len(idx) - len(idx) % batch_size if drop_last else len(idx)
        for start in range(0, stop, batch_size):
            sel = idx[start:start + batch_size]
            yield ImageBatch(self.images[sel], None, self.labels[sel], [str(i) for i in sel.tolist()])


def warn_bad(paths: list[str]) -> None:
    for p in paths:
        warnings.warn(f"skipped an undecodable image: {p}", stacklevel=2)
