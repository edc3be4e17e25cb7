"""Training and evaluation images as streams of uint8 batches, the same for every source.

Streamed sources (``image_folder``, ``shards``) are Ray Data datasets built on the driver (nothing is read
before training starts): an image folder is listed once and its listing becomes blocks of ``(path, label)``
rows, in a new order every epoch (blocks and the rows within them; shards: by file); the files are read and
decoded lazily (:mod:`ssl_platform.data.decode`, which imports no torch) in Ray Data tasks on the
cluster's CPUs, split across the Train workers (``TorchTrainer(datasets=...)`` ->
``ray.train.get_dataset_shard``) and prefetched. The CPU only decodes: each image is fitted into a
``decode_size x decode_size`` uint8 canvas (aspect kept, never enlarged, placed top-left, zero padded) and its
valid ``(height, width)`` travels with it, so the device-side random crops (``ssl_platform.data.augment``) sample
the real image exactly as torchvision's per-sample transforms would: at full resolution when the image's long side
is at most ``decode_size`` (the ImageNet recipes set 512, above ImageNet's typical 500 x 375), so the crops are cut
from regions of the papers' sizes. ``data.decode_draft`` (a speed option, off by default) decodes JPEGs at a reduced
DCT scale when the canvas is smaller (``PIL.Image.draft``).

A file that cannot be decoded becomes a row with ``ok=False`` and its path: the worker drops it from the batch,
warns naming it and counts it (``bad_images``); past ``data.max_bad_fraction`` of an epoch the run stops
(:class:`BadDataError`).

Small in-memory sources (digits, synthetic, cifar10) keep their arrays as uint8 ``[N, 3, S, S]`` in each
worker (a few MB) and yield the same :class:`ImageBatch`, sharded by rank with a per-epoch permutation.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from ssl_platform.data.decode import (
    IMAGE_COLUMN,
    LABEL_COLUMN,
    OK_COLUMN,
    PATH_COLUMN,
    SIZE_COLUMN,
    decode_batch,
    shuffle_block,
)
from ssl_platform.data.shards import read_manifest
from ssl_platform.data.small_sets import DataError
from ssl_platform.data.sources import (
    ImageFolderListing,
    data_filesystem,
    list_image_folder,
    relabel,
    split_by_hash,
)
from ssl_platform.spec import STREAMED_DATASETS, eval_data_section


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


# ---- driver side: Ray Data datasets ---------------------------------------------------------------------
ROWS_PER_BLOCK = 1000  # listing rows per Ray Data block: the unit of the per-epoch block order


@dataclass
class StreamedSource:
    """A streamed source as the driver knows it before Ray starts: its listing (or shard files) and counts, no pixels.

    :func:`plan_streamed_source` lists the folder (or reads the shard manifests) once and raises
    :class:`DataError` for every problem. The listing itself goes to Ray Data as blocks of ``(path, label)`` rows
    (:meth:`train_dataset`, :meth:`eval_datasets`): Ray Data never lists or stats the files again, and a read task
    holds only its block's paths, so start-up and memory do not grow with the number of files.
    """

    kind: str  # image_folder | shards
    uri: str  # data.root
    classes: list[str]  # empty: unlabelled
    train: ImageFolderListing | None = None  # image folders: the training split
    val: ImageFolderListing | None = None  # image folders: the validation split (None: not an evaluation source)
    shard_paths: tuple[list[str], list[str]] | None = None  # shards: (train, val) shard files
    num_shard_rows: tuple[int, int] = (0, 0)
    val_uri: str | None = None

    @property
    def num_train(self) -> int:
        return len(self.train) if self.train is not None else self.num_shard_rows[0]

    @property
    def num_val(self) -> int:
        return len(self.val) if self.val is not None else self.num_shard_rows[1]

    @property
    def labelled(self) -> bool:
        return bool(self.classes)

    def train_dataset(self, data: DictConfig, seed: int | None, endpoint: str | None):
        """The training images in a new order every epoch (lazy: nothing is read here)."""
        if self.kind == "shards":
            return _decoded(_read_shards(self.uri, self.shard_paths[0], _file_shuffle(seed), endpoint), data)
        return _decoded(_listing_dataset(self.train, seed, shuffle=True), data, _filesystem(self.uri, endpoint))

    def eval_datasets(self, data: DictConfig, seed: int | None, cap: int, endpoint: str | None) -> dict[str, Any]:
        """``{"eval_train", "eval_val"}``: the kNN / probe bank (at most ``cap`` images, 0: all) and the validation
        split, each in one fixed order. A capped bank is the first ``cap`` images of one random order (the
        listing's order would hold a few classes only)."""
        if self.kind == "shards":
            bank_order = _file_shuffle(seed, every_epoch=False) if cap and cap < self.num_train else None
            bank = _decoded(_read_shards(self.uri, self.shard_paths[0], bank_order, endpoint), data)
            val = _decoded(_read_shards(self.val_uri, self.shard_paths[1], None, endpoint), data)
            return {"eval_train": bank.limit(cap) if bank_order else bank, "eval_val": val}
        bank_rows = _sample(self.train, cap, seed or 0)
        return {"eval_train": _decoded(_listing_dataset(bank_rows, seed, shuffle=False), data, _filesystem(self.uri, endpoint)),
                "eval_val": _decoded(_listing_dataset(self.val, seed, shuffle=False), data,
                                     _filesystem(self.val_uri or self.uri, endpoint))}


def plan_streamed_source(data: DictConfig, endpoint: str | None, *, evaluate: bool = True,
                         key: str = "data") -> StreamedSource:
    """List ``data.root`` (and ``data.val_root``) or read their shard manifests; validate. Runs before Ray starts.

    ``evaluate``: the source is also the evaluation source (kNN / probe): without ``data.val_root`` a hash hold-out
    of ``data.test_fraction`` is kept out of training. A source that is not evaluated on trains on every image.
    ``key``: the spec section the errors name (``data`` or ``eval.data``)."""
    if data.name == "shards":
        return _plan_shards(data, endpoint, evaluate, key)
    if data.name != "image_folder":
        raise DataError(f"{key}.name: expected one of image_folder, shards for a streamed source, got {data.name!r}")
    labels = data.get("labels", "folders")
    listing = list_image_folder(data.root, f"{key}.root", endpoint, labels=labels)
    base = StreamedSource("image_folder", data.root, listing.classes, val_uri=data.val_root)
    if not evaluate or not listing.labelled:
        base.train = listing
        return base
    if data.val_root:
        base.train = listing
        base.val = relabel(list_image_folder(data.val_root, f"{key}.val_root", endpoint, labels=labels),
                           listing.classes, key=f"{key}.val_root")
        return base
    base.train, base.val = split_by_hash(listing, data.test_fraction)
    return base


@dataclass
class DataPlan:
    """What a run reads, planned on the driver before Ray starts: the training source and the evaluation source.

    ``train``: the streamed training source (None: an in-memory set, loaded by each worker). ``eval_data``: the data
    section kNN and the probe use (None: no labels anywhere, no evaluation). ``evaluation``: its streamed source
    (the training source itself when they are the same data; None when the evaluation data is in memory)."""

    train: StreamedSource | None
    eval_data: DictConfig | None
    evaluation: StreamedSource | None

    @property
    def streamed(self) -> bool:
        """Whether Ray Data reads anything (its decode tasks then need CPUs the Train workers leave free)."""
        return self.train is not None or self.evaluation is not None

    @property
    def no_evaluation_reason(self) -> str | None:
        """Why kNN and the linear probe are skipped (None: they run)."""
        if self.eval_data is not None:
            return None
        return ("the training data has no labels (data.labels=none, or shards prepared with --labels none) and "
                "eval.data is not set")

    @property
    def num_classes(self) -> int | None:
        """Classes of a streamed evaluation source (in-memory sets know theirs); 0: no evaluation."""
        if self.eval_data is None:
            return 0
        return len(self.evaluation.classes) if self.evaluation is not None else None

    def datasets(self, spec: DictConfig) -> dict[str, Any] | None:
        """The Ray Data datasets of the streamed parts (lazy: nothing is read here); None when all is in memory."""
        import ray.data

        context = ray.data.DataContext.get_current()  # the worker loop prints progress; Ray Data's bars are noise
        context.enable_progress_bars = False
        context.print_on_execution_start = False
        endpoint = spec.checkpoint.get("endpoint_url")
        out: dict[str, Any] = {}
        if self.train is not None:
            out["train"] = self.train.train_dataset(spec.data, spec.seed, endpoint)
        if self.evaluation is not None:
            out.update(self.evaluation.eval_datasets(self.eval_data, spec.seed, int(spec.eval.knn.max_train_samples),
                                                     endpoint))
        return out or None


def plan_data(spec: DictConfig) -> DataPlan:
    """List / read the manifests of every streamed source of ``spec`` once, and decide the evaluation data: a
    separate ``eval.data`` must have labels; training data without labels (``data.labels: none``, shards prepared
    with ``--labels none``) means no kNN / probe unless ``eval.data`` is set."""
    endpoint = spec.checkpoint.get("endpoint_url")
    eval_data = eval_data_section(spec.data, spec.eval)
    same = eval_data is not None and spec.eval.data is None
    train = (plan_streamed_source(spec.data, endpoint, evaluate=same) if spec.data.name in STREAMED_DATASETS else None)
    if same:
        if train is not None and not train.labelled:
            return DataPlan(train, None, None)
        return DataPlan(train, eval_data, train)
    if eval_data is None or eval_data.name not in STREAMED_DATASETS:
        return DataPlan(train, eval_data, None)
    evaluation = plan_streamed_source(eval_data, endpoint, evaluate=True, key="eval.data")
    if not evaluation.labelled:
        raise DataError(f"eval.data: expected a labelled source for kNN and the linear probe, got "
                        f"{eval_data.root!r} without labels (data.labels=none or shards prepared with --labels none)")
    return DataPlan(train, eval_data, evaluation)


def _plan_shards(data: DictConfig, endpoint: str | None, evaluate: bool, key: str) -> StreamedSource:
    train = read_manifest(data.root, f"{key}.root", endpoint=endpoint)
    classes = list(train.classes) if data.get("labels", "folders") != "none" else []
    source = StreamedSource("shards", data.root, classes, val_uri=data.val_root,
                            shard_paths=(list(train.shard_paths), []), num_shard_rows=(train.num_images, 0))
    if not evaluate or not classes:
        return source
    if not data.val_root:  # a hash hold-out would need every image's path: shards name only their counts
        raise DataError(f"{key}.val_root: expected the shards of a validation split for data.name=shards (run prepare-data "
                        "on the val/ folder too), got None")
    val = read_manifest(data.val_root, f"{key}.val_root", endpoint=endpoint)
    if list(val.classes) != list(train.classes):
        raise DataError(f"{key}.val_root: expected shards with the classes of {key}.root ({len(train.classes)} classes, "
                        f"labels by the same index), got {data.val_root!r} with {len(val.classes)} classes")
    source.shard_paths = (list(train.shard_paths), list(val.shard_paths))
    source.num_shard_rows = (train.num_images, val.num_images)
    return source


def _sample(listing: ImageFolderListing, cap: int, seed: int) -> ImageFolderListing:
    """At most ``cap`` files of ``listing`` (0: all), drawn in one fixed random order from ``seed``."""
    if not cap or cap >= len(listing):
        return listing
    pick = np.sort(np.random.default_rng(seed).permutation(len(listing))[:cap])
    return ImageFolderListing(listing.uri, listing.path, [listing.files[i] for i in pick],
                              [listing.labels[i] for i in pick], listing.classes)


def _listing_dataset(listing: ImageFolderListing, seed: int | None, *, shuffle: bool):
    """``(path, label)`` rows as Ray Data blocks of ``ROWS_PER_BLOCK``. ``shuffle``: the files are dealt to blocks
    in one random order from ``seed``, and every epoch the blocks come in a new order and each block's rows too
    (:func:`shuffle_block`), reproducibly from ``seed``."""
    import pyarrow as pa
    import ray.data

    n = len(listing)
    order = np.random.default_rng(seed or 0).permutation(n) if shuffle else np.arange(n)
    paths = pa.array(listing.files, type=pa.string()).take(pa.array(order))
    labels = pa.array(np.asarray(listing.labels, dtype=np.int64)[order])
    table = pa.table({PATH_COLUMN: paths, LABEL_COLUMN: labels})
    blocks = [table.slice(start, ROWS_PER_BLOCK) for start in range(0, n, ROWS_PER_BLOCK)]
    ds = ray.data.from_arrow(blocks)
    if shuffle and seed is not None:
        ds = ds.randomize_block_order(seed=ray.data.RandomSeedConfig(seed=seed, reseed_after_execution=True))
        ds = ds.map_batches(partial(shuffle_block, seed=seed), batch_format="numpy", batch_size=None)
    return ds


def _filesystem(uri: str, endpoint: str | None):
    fs, _ = data_filesystem(uri, endpoint)
    return fs


def _file_shuffle(seed: int | None, every_epoch: bool = True):
    """Files in a new order every epoch (each execution of the dataset is reseeded from ``seed``), or in one fixed
    random order (``every_epoch=False``: the same capped kNN bank at every evaluation, a sample of every class)."""
    from ray.data import FileShuffleConfig

    return None if seed is None else FileShuffleConfig(seed=seed, reseed_after_execution=every_epoch)


def _read_shards(uri: str, files: list[str], shuffle, endpoint: str | None):
    import ray.data

    fs, _ = data_filesystem(uri, endpoint)
    return ray.data.read_parquet(files, filesystem=fs, columns=[IMAGE_COLUMN, LABEL_COLUMN, PATH_COLUMN],
                                 shuffle=shuffle)


def _decoded(ds, data: DictConfig, filesystem=None):
    fn = partial(decode_batch, canvas=canvas_size(data), filesystem=filesystem, draft=bool(data.get("decode_draft", False)))
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
        # Arrow hands out read-only views; a tensor over them would let torch write into Arrow's buffers (and warns):
        # writable, C-contiguous arrays, copied only when they are not already
        yield ImageBatch(
            images=torch.from_numpy(np.require(images, requirements=("C", "W"))).permute(0, 3, 1, 2),
            sizes=torch.from_numpy(np.require(sizes, requirements=("C", "W"))).long(),
            labels=torch.from_numpy(np.require(labels, requirements=("C", "W"))).long(),
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
