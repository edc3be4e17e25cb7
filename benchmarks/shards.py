"""Sharded datasets (``prepare-data``): write and read images/s of the Parquet shards on a generated ImageFolder
tree of JPEGs around 500x375 (mixed sizes and orientations, ~ImageNet's bytes per image), and the format choice.

* **write** = ``ssl_platform.data.shards.prepare_shards`` end to end (listing, parallel read + PIL check of every
  file, Parquet encoding, SHA-256, atomic rename, progress file, manifest) into a fresh local DEST.
* **read** = every shard's encoded images and labels back as Python ``bytes`` / ints, warm page cache, one
  process: Parquet with pyarrow (``ParquetFile.iter_batches``, column projection ``image, label``: what a Ray Data
  read task does per file) against the same rows in WebDataset-style tar shards (``<key>.jpg`` + ``<key>.cls``
  members) read with the stdlib ``tarfile`` streaming reader, the way the ``webdataset`` package reads them. The
  two readers alternate per round; the ratio is paired per round.
* **decode** = PIL decode to RGB of the same JPEGs on one thread, for scale: a reader far above it never bounds
  the data path.
"""

from __future__ import annotations

import io
import os
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import paired_ratio, summarize


def make_jpeg_tree(root: Path, num_images: int, num_classes: int = 10, seed: int = 0,
                   size: tuple[int, int] = (500, 375), quality: int = 95) -> dict[str, Any]:  # fmt: skip
    """An ImageFolder tree of JPEGs with smooth random content plus fine noise (~110 KB at 500x375 and quality 95, like
    ImageNet's average); widths and heights vary +-25% around ``size`` and a quarter of the images are portrait."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    total = 0
    for i in range(num_images):
        w, h = (int(v * rng.uniform(0.75, 1.25)) for v in size)
        if rng.random() < 0.25:
            w, h = h, w
        coarse = rng.random((max(2, h // 32), max(2, w // 32), 3)) * 255
        img = np.asarray(Image.fromarray(coarse.astype(np.uint8)).resize((w, h), Image.BICUBIC), dtype=np.float32)
        img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
        d = root / f"class_{i % num_classes:03d}"
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"img_{i:06d}.jpg"
        Image.fromarray(img).save(path, quality=quality)
        total += path.stat().st_size
    return {"num_images": num_images, "num_classes": num_classes, "size_around": list(size),
            "mean_kb": round(total / num_images / 1024, 1), "total_mb": round(total / 2**20, 1)}  # fmt: skip


def write_tar_shards(manifest, directory: Path) -> list[Path]:
    """The rows of a Parquet shard dataset as WebDataset-style tar shards (same shards, same row order)."""
    from ssl_platform.data.shards import iter_shard_rows

    directory.mkdir(parents=True, exist_ok=True)
    rows = iter_shard_rows(manifest)
    out = []
    for k, info in enumerate(manifest.shards):
        path = directory / f"shard-{k:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for _ in range(info.num_images):
                row = next(rows)
                key = row["path"].rsplit(".", 1)[0].replace("/", "__")
                for suffix, data in ((".jpg", row["image"]), (".cls", str(row["label"]).encode())):
                    member = tarfile.TarInfo(key + suffix)
                    member.size, member.mtime = len(data), 0
                    tar.addfile(member, io.BytesIO(data))
        out.append(path)
    return out


def read_parquet_images(paths: list[str]) -> tuple[int, int]:
    """(images, image bytes) of Parquet shards, as Python bytes and ints."""
    import pyarrow.parquet as pq

    n = nbytes = 0
    for path in paths:
        for batch in pq.ParquetFile(path).iter_batches(columns=["image", "label"], batch_size=64):
            images, labels = batch.column(0).to_pylist(), batch.column(1).to_pylist()
            n += len(labels)
            nbytes += sum(map(len, images))
    return n, nbytes


def read_tar_images(paths: list[Path]) -> tuple[int, int]:
    """(images, image bytes) of WebDataset-style tar shards through the stdlib streaming reader, grouped by key."""
    n = nbytes = 0
    for path in paths:
        with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
            sample: dict[str, bytes] = {}
            key = None
            for member in tar:
                k, _, ext = member.name.rpartition(".")
                if key is not None and k != key:
                    n, nbytes = n + 1, nbytes + len(sample["jpg"])
                    int(sample["cls"])
                    sample = {}
                key = k
                sample[ext] = tar.extractfile(member).read()
            if sample:
                n, nbytes = n + 1, nbytes + len(sample["jpg"])
    return n, nbytes


def _decode_rate(files: list[Path]) -> float:
    from PIL import Image

    t0 = time.perf_counter()
    for f in files:
        with Image.open(f) as img:
            img.convert("RGB").load()
    return len(files) / (time.perf_counter() - t0)


def run_shards(work: Path, num_images: int, repeats: int, log: Callable[[str], None], shard_size: int = 250,
               write_repeats: int = 2, image_size: tuple[int, int] = (500, 375)) -> dict[str, Any]:  # fmt: skip
    from ssl_platform.data.shards import DEFAULT_WORKERS, prepare_shards

    root = work / "shards-src"
    log(f"shards: generating {num_images} JPEGs around {image_size[0]}x{image_size[1]}")
    tree = make_jpeg_tree(root, num_images, size=image_size)
    write_rates, result = [], None
    for r in range(write_repeats):
        t0 = time.perf_counter()
        result = prepare_shards(str(root), str(work / "shards-parquet"), shard_size=shard_size, overwrite=True,
                                progress=False, workers=DEFAULT_WORKERS)  # fmt: skip
        write_rates.append(num_images / (time.perf_counter() - t0))
        log(f"shards: prepare-data {r + 1}/{write_repeats}: {write_rates[-1]:.0f} images/s")
    manifest = result.manifest
    tar_paths = write_tar_shards(manifest, work / "shards-tar")
    parquet_paths = manifest.shard_paths
    rates: dict[str, list[float]] = {"parquet": [], "tar": []}
    mb: dict[str, list[float]] = {"parquet": [], "tar": []}
    readers = {"parquet": lambda: read_parquet_images(parquet_paths), "tar": lambda: read_tar_images(tar_paths)}
    for r in range(repeats + 1):  # round 0 warms the page cache and is dropped
        for name, read in (readers.items() if r % 2 == 0 else reversed(readers.items())):
            t0 = time.perf_counter()
            n, nbytes = read()
            dt = time.perf_counter() - t0
            if n != manifest.num_images:
                raise RuntimeError(f"{name} reader returned {n} images, expected {manifest.num_images}")
            if r > 0:
                rates[name].append(n / dt)
                mb[name].append(nbytes / dt / 2**20)
    files = sorted(root.rglob("*.jpg"))[: min(num_images, 200)]
    decode = [_decode_rate(files) for _ in range(max(1, repeats // 2))]
    log(f"shards: read parquet {np.median(rates['parquet']):.0f}, tar {np.median(rates['tar']):.0f} images/s; "
        f"PIL decode {np.median(decode):.0f} images/s")  # fmt: skip
    sizes = {"parquet": sum(s.bytes for s in manifest.shards), "tar": sum(os.path.getsize(p) for p in tar_paths)}
    return {
        "tree": tree,
        "shard_size": shard_size,
        "num_shards": len(manifest.shards),
        "workers": DEFAULT_WORKERS,
        "write_images_per_s": summarize(write_rates),
        "read": {name: {"images_per_s": summarize(rates[name]), "mb_per_s": summarize(mb[name]),
                        "bytes_on_disk": sizes[name]} for name in rates},  # fmt: skip
        "parquet_vs_tar_read": paired_ratio(rates["parquet"], rates["tar"]),
        "decode_pil_1_thread_images_per_s": summarize(decode),
        "chosen_format": "parquet",
    }
