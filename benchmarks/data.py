"""The data path at dataset scale (``--only data``), on generated ImageFolder trees of ~500x375 JPEGs.

* **CPU throughput**, side by side, round-robin over ``repeats`` rounds, on the same files and cores:
  the platform's CPU side (the listing as Ray Data blocks -> :func:`ssl_platform.data.streaming.decode_batch` into
  304 px canvases, all cores) against a torch ``DataLoader`` (``num_workers`` = cores) over torchvision's
  ``ImageFolder`` with (a) the per-sample DINO multi-crop the platform used to run on the CPU and (b) only a
  decode + resize (the same CPU work as the platform's). Reported as images/s per core.
* **Scale**: time to the first training step and peak RSS of the Train worker process, through
  ``run_experiment`` (1 worker, ``data.name=image_folder``, evaluation off) at two dataset sizes. A step hook
  (:class:`FirstSteps`) records the wall-clock time of step 1 and the worker's ``ru_maxrss`` after a few steps,
  then stops the run.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import summarize, usable_cores
from benchmarks.image_tree import write_image_tree
from ssl_platform.data.streaming import ImageBatch
from ssl_platform.training.hooks import StepHook, StepInfo

CACHE = Path(os.environ.get("SSL_PLATFORM_BENCH_CACHE", Path.home() / ".cache" / "ssl_platform_bench"))
CANVAS = 304  # the platform's default canvas for image_size 224


def image_tree(n: int, log: Callable[[str], None], mean_size: tuple[int, int] = (375, 500)) -> Path:
    """A cached tree of ``n`` JPEGs (10 classes) around ``mean_size`` (h, w; default 500x375)."""
    root = CACHE / f"tree-{n}-{mean_size[0]}x{mean_size[1]}"
    done = root / ".complete"
    if not done.exists():
        log(f"data: generating {n} JPEGs under {root}")
        write_image_tree(root, num_classes=10, per_class=n // 10, mean_size=mean_size, seed=n)
        done.write_text("ok")
    return root


# ---- CPU throughput -------------------------------------------------------------------------------------
def _platform_pass(root: Path) -> tuple[int, float]:
    from pyarrow.fs import LocalFileSystem

    from ssl_platform.data.sources import list_image_folder
    from ssl_platform.data.streaming import _decoded, _listing_dataset

    listing = list_image_folder(str(root))
    ds = _decoded(_listing_dataset(listing, 0, shuffle=True), _canvas_data(), LocalFileSystem())
    t0 = time.perf_counter()
    n = sum(int(b["ok"].sum()) for b in ds.iter_batches(batch_size=64, batch_format="numpy", prefetch_batches=4))
    return n, time.perf_counter() - t0


def _canvas_data():
    from omegaconf import OmegaConf

    return OmegaConf.create({"decode_size": CANVAS, "image_size": CANVAS, "num_workers": 0})


def _dataloader_pass(root: Path, transform, workers: int) -> tuple[int, float]:
    from torch.utils.data import DataLoader
    from torchvision import datasets

    from benchmarks.per_sample_views import multicrop_collate

    ds = datasets.ImageFolder(str(root), transform=transform)
    collate = multicrop_collate if not hasattr(transform, "size_only") else None
    loader = DataLoader(ds, batch_size=64, num_workers=workers, collate_fn=collate, prefetch_factor=4)
    t0 = time.perf_counter()
    n = sum(len(labels) for _, labels in loader)
    return n, time.perf_counter() - t0


class _DecodeResize:
    """The platform's CPU work per image as a torchvision transform: fit into the canvas, to a tensor."""

    size_only = True

    def __call__(self, img):
        import torch
        from PIL import Image

        w, h = img.size
        scale = min(1.0, CANVAS / max(w, h))
        img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
        out = torch.zeros(3, CANVAS, CANVAS, dtype=torch.uint8)
        t = torch.from_numpy(__import__("numpy").asarray(img.convert("RGB"))).permute(2, 0, 1)
        out[:, : t.shape[1], : t.shape[2]] = t
        return out


def cpu_throughput(root: Path, repeats: int, log: Callable[[str], None]) -> dict[str, Any]:
    from benchmarks.per_sample_views import MultiCropTransform

    cores = usable_cores()
    multicrop = MultiCropTransform(224, 96, n_global=2, n_local=6)
    variants = {
        "platform_ray_data_decode": lambda: _platform_pass(root),
        "dataloader_multicrop_per_sample": lambda: _dataloader_pass(root, multicrop, cores),
        "dataloader_decode_resize": lambda: _dataloader_pass(root, _DecodeResize(), cores),
    }
    rates: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(repeats):
        for name, fn in variants.items():
            n, seconds = fn()
            rates[name].append(n / seconds / cores)
            log(f"data: round {r + 1}/{repeats} {name}: {n / seconds:.1f} images/s ({n} images, {cores} cores)")
    out: dict[str, Any] = {"cores": cores, "images": len(list(root.rglob("*.jpg"))), "canvas": CANVAS, "tree": root.name,
                           "images_per_s_per_core": {k: summarize(v) for k, v in rates.items()}}
    base = rates["dataloader_multicrop_per_sample"]
    out["platform_vs_multicrop_dataloader"] = summarize([p / b for p, b in zip(rates["platform_ray_data_decode"], base)])
    out["platform_vs_decode_dataloader"] = summarize(
        [p / b for p, b in zip(rates["platform_ray_data_decode"], rates["dataloader_decode_resize"])])
    return out


# ---- time to first step and worker memory at two sizes --------------------------------------------------
class StopBenchmark(RuntimeError):
    """Raised by :class:`FirstSteps` once it has measured: ends the benchmark run early."""


@dataclass
class FirstSteps(StepHook):
    """Records the wall-clock time of the first step and the worker's peak RSS after ``steps`` steps."""

    path: str
    steps: int = 8

    def before_step(self, info: StepInfo, batch: ImageBatch) -> None:
        record = Path(self.path)
        if info.global_step == 0:
            record.write_text(json.dumps({"first_step_at": time.time()}))
        if info.global_step == self.steps:
            data = json.loads(record.read_text())
            data["worker_max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            record.write_text(json.dumps(data))
            raise StopBenchmark(f"measured {self.steps} steps")


def first_step(root: Path, work: Path, batch_size: int = 32) -> dict[str, float]:
    from ssl_platform.launch.run import run_experiment
    from ssl_platform.spec import read_yaml, spec_from_dict

    raw = read_yaml(Path(__file__).resolve().parents[1] / "experiments" / "mae_vit_tiny_digits.yaml")
    raw["data"] = {"name": "image_folder", "root": str(root), "image_size": 64, "batch_size": batch_size,
                   "test_fraction": 0.1}
    raw["method"]["encoder_kwargs"]["img_size"] = 64
    raw["method"]["encoder_kwargs"]["patch_size"] = 8
    raw["optim"].update(epochs=1, warmup_epochs=0)
    raw["scaling"]["cpus_per_worker"] = 1  # the other CPU decodes (Ray Data)
    raw["checkpoint"] = {"uri": str(work / "ckpt"), "every_epochs": 1, "keep": 1}
    raw["tracking"] = {"uri": f"sqlite:///{work / 'mlflow.db'}", "experiment": "bench-data"}
    raw["eval"] = {"knn": {"enabled": False}, "linear": {"enabled": False}, "random_init_baseline": False}
    spec = spec_from_dict(raw, source="benchmarks/data.py")
    record = work / f"first-{root.name}.json"
    t0 = time.time()
    try:
        run_experiment(spec, run_name=f"bench-data-{root.name}-{os.getpid()}", step_hooks=[FirstSteps(str(record))])
    except Exception as err:  # noqa: BLE001 -- the hook stops the run once it has measured
        if "StopBenchmark" not in repr(err) and "measured" not in str(err):
            raise
    data = json.loads(record.read_text())
    return {"time_to_first_step_s": data["first_step_at"] - t0, "worker_max_rss_mb": data["worker_max_rss_mb"]}


def scale(sizes: tuple[int, ...], repeats: int, work: Path, log: Callable[[str], None]) -> dict[str, Any]:
    roots = {n: image_tree(n, log) for n in sizes}  # ImageNet-like 500x375 JPEGs
    runs: dict[int, list[dict[str, float]]] = {n: [] for n in sizes}
    for r in range(repeats):
        for n, root in roots.items():
            res = first_step(root, work / f"scale-{n}-{r}")
            runs[n].append(res)
            log(f"data: {n} images, round {r + 1}: first step after {res['time_to_first_step_s']:.1f} s, "
                f"worker peak RSS {res['worker_max_rss_mb']:.0f} MB")
    out: dict[str, Any] = {str(n): {k: summarize([x[k] for x in v]) for k in v[0]} for n, v in runs.items()}
    small, large = min(sizes), max(sizes)
    for key in ("time_to_first_step_s", "worker_max_rss_mb"):
        out[f"{key}_ratio_{large}_vs_{small}"] = round(
            statistics.median(x[key] for x in runs[large]) / statistics.median(x[key] for x in runs[small]), 3)
    return out


# ---- start-up and memory against the number of files (hard-linked trees) -------------------------------
def hardlinked_tree(sources: list[Path], dest: Path, n: int, classes: int = 1000, log: Callable[[str], None] = print) -> Path:
    """``dest/class_XXXX/img_N.jpg``: ``n`` hard links to ``sources`` (cycled) in ``classes`` folders. A million
    files in seconds and no data written (``os.link``); kept under ``dest`` for later runs."""
    done = dest / ".complete"
    if done.exists():
        return dest
    t0 = time.perf_counter()
    for c in range(classes):
        (dest / f"class_{c:04d}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        target = dest / f"class_{i % classes:04d}" / f"img_{i:07d}.jpg"
        if not target.exists():
            os.link(sources[i % len(sources)], target)
    done.write_text("ok")
    log(f"data: {n} hard links under {dest} in {time.perf_counter() - t0:.1f} s")
    return dest


def _pss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def descendants(root_pid: int) -> list[int]:
    """``root_pid`` and every process below it (Ray's raylet, GCS, dashboard, workers, Ray Data tasks)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [root_pid]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


@dataclass
class FirstStepMemory(StepHook):
    """At the first step: the wall-clock time and the summed PSS of the driver ``driver_pid`` and every process
    below it (RSS would count the object store's shared pages once per process); then stops the run."""

    path: str
    driver_pid: int

    def before_step(self, info: StepInfo, batch: ImageBatch) -> None:
        if info.global_step != 0:
            return
        pids = descendants(self.driver_pid)
        pss = {pid: _pss_kb(pid) for pid in pids}
        Path(self.path).write_text(json.dumps({
            "first_step_at": time.time(), "summed_pss_mb": sum(pss.values()) / 1024,
            "driver_pss_mb": pss.get(self.driver_pid, 0) / 1024, "largest_process_pss_mb": max(pss.values()) / 1024,
            "processes": len(pids)}))
        raise StopBenchmark("measured the first step")


def first_step_memory(root: Path, work: Path, labels: str = "folders") -> dict[str, float]:
    """Time to the first step and summed PSS there, for a streamed MAE run over ``root`` (as :func:`first_step`)."""
    from ssl_platform.launch.run import run_experiment
    from ssl_platform.spec import read_yaml, spec_from_dict

    raw = read_yaml(Path(__file__).resolve().parents[1] / "experiments" / "mae_vit_tiny_digits.yaml")
    raw["data"] = {"name": "image_folder", "labels": labels, "root": str(root), "image_size": 64, "batch_size": 16,
                   "test_fraction": 0.1}
    raw["method"]["encoder_kwargs"].update(img_size=64, patch_size=8)
    raw["optim"].update(epochs=1, warmup_epochs=0)
    raw["scaling"]["cpus_per_worker"] = 1
    raw["checkpoint"] = {"uri": str(work / "ckpt"), "every_epochs": 1, "keep": 1}
    raw["tracking"] = {"uri": f"sqlite:///{work / 'mlflow.db'}", "experiment": "bench-files"}
    raw["eval"] = {"knn": {"enabled": False}, "linear": {"enabled": False}, "random_init_baseline": False}
    spec = spec_from_dict(raw, source="benchmarks/data.py")
    record = work / "first.json"
    t0 = time.time()
    try:
        run_experiment(spec, run_name=f"bench-files-{os.getpid()}-{int(t0)}",
                       step_hooks=[FirstStepMemory(str(record), os.getpid())])
    except Exception as err:  # noqa: BLE001 -- the hook stops the run once it has measured
        if "measured" not in str(err) and "StopBenchmark" not in repr(err):
            raise
    data = json.loads(record.read_text())
    data["time_to_first_step_s"] = data.pop("first_step_at") - t0
    return data


def file_count_scale(sizes: tuple[int, ...], repeats: int, work: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """Each size in a fresh Ray instance, sizes alternated over ``repeats`` rounds: time to the first step and
    summed PSS at 2k and 1M files (1,000 class folders of hard links to 1,000 small JPEGs)."""
    import ray

    sources = sorted(image_tree(1000, log, (96, 128)).rglob("*.jpg"))
    roots = {n: hardlinked_tree(sources, work / f"links-{n}", n, log=log) for n in sizes}
    runs: dict[int, list[dict[str, float]]] = {n: [] for n in sizes}
    for r in range(repeats):
        for n, root in roots.items():
            ray.shutdown()
            res = first_step_memory(root, work / f"files-{n}-{r}")
            runs[n].append(res)
            log(f"data: {n} files, round {r + 1}: first step after {res['time_to_first_step_s']:.1f} s, summed PSS "
                f"{res['summed_pss_mb']:.0f} MB ({res['processes']} processes), driver {res['driver_pss_mb']:.0f} MB")
    ray.shutdown()
    out: dict[str, Any] = {str(n): {k: summarize([x[k] for x in v]) for k in v[0]} for n, v in runs.items()}
    small, large = min(sizes), max(sizes)
    for key in ("time_to_first_step_s", "summed_pss_mb", "driver_pss_mb"):
        out[f"{key}_ratio_{large}_vs_{small}"] = round(
            statistics.median(x[key] for x in runs[large]) / statistics.median(x[key] for x in runs[small]), 3)
    return out


def run_data(work: Path, repeats: int, sizes: tuple[int, ...], throughput_images: int,
             log: Callable[[str], None] = print, mean_size: tuple[int, int] = (375, 500),
             with_scale: bool = True, file_counts: tuple[int, ...] = ()) -> dict[str, Any]:  # fmt: skip
    import ray

    from ssl_platform.training.ray_runtime import init_ray

    started = not ray.is_initialized()
    init_ray()
    try:
        out = {"throughput": cpu_throughput(image_tree(throughput_images, log, mean_size), repeats, log)}
        if with_scale:
            out["scale"] = scale(sizes, max(1, repeats - 1), work, log)
        if file_counts:
            out["file_count_scale"] = file_count_scale(file_counts, max(1, repeats - 1), work, log)
        return out
    finally:
        if started:
            ray.shutdown()


# ---- decode resolution: what the canvas and the DCT draft cost and leave of the crops (issue 26) -------------
DECODE_SETTINGS = (  # (label, decode_size, draft)
    ("512 full decode (ImageNet recipes)", 512, False),
    ("304 full decode (auto canvas at 224 px)", 304, False),
    ("256 full decode + resize", 256, False),
    ("256 draft", 256, True),
    ("128 full decode + resize", 128, False),
    ("128 draft (1/2 DCT scale)", 128, True),
)


def decode_resolution(n_images: int = 200, repeats: int = 3, log: Callable[[str], None] = print,
                      size: tuple[int, int] = (375, 500)) -> dict[str, Any]:
    """Decode images/s of one process (:func:`ssl_platform.data.decode.decode_to_canvas`) on ``n_images`` JPEGs of
    ``size`` (h, w; ImageNet's typical 500x375) per canvas setting, median of ``repeats`` round-robin rounds, and
    what the crops are then cut from: the valid ``(h, w)`` and the side of a DINO local crop's region,
    ``sqrt(s h w)`` for ``s`` in (0.05, 0.4) (the paper, on the full image: 97-274 px)."""
    import numpy as np

    from benchmarks.image_tree import class_image, encode_image
    from ssl_platform.data.decode import decode_to_canvas

    rng = np.random.default_rng(0)
    files = [encode_image(class_image(i % 10, 10, size[0], size[1], rng)) for i in range(n_images)]
    times: dict[str, list[float]] = {label: [] for label, _, _ in DECODE_SETTINGS}
    out: dict[str, Any] = {"images": n_images, "source_hw": list(size), "settings": {}}
    for _ in range(repeats):
        for label, canvas, draft in DECODE_SETTINGS:
            t0 = time.perf_counter()
            for data in files:
                _, h, w = decode_to_canvas(data, canvas, draft)
            times[label].append(time.perf_counter() - t0)
            out["settings"][label] = {"decode_size": canvas, "draft": draft, "valid_hw": [h, w],
                                      "dino_local_region_px": [round((0.05 * h * w) ** 0.5), round((0.4 * h * w) ** 0.5)]}
    for label, entry in out["settings"].items():
        entry["images_per_s"] = round(n_images / statistics.median(times[label]), 1)
        log(f"[data] decode {label}: {entry['images_per_s']} images/s, view source {entry['valid_hw']}, "
            f"DINO local regions {entry['dino_local_region_px']} px")
    return out


if __name__ == "__main__":  # python -m benchmarks.data [n_images] [repeats]: the decode-resolution table only
    import sys

    print(json.dumps(decode_resolution(*(int(a) for a in sys.argv[1:3])), indent=1))
