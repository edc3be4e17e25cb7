"""Shared parts of the benchmarks: the fixed configurations, spec building, one bare train step, timing stats,
machine description.

The fixed configuration comes from the experiment specs in ``experiments/`` (each method's own heads, views and
optimiser settings), with the backbone, image size and batch size overridden identically for every method:

* CPU: ViT-tiny width (192-d, 3 heads) at depth 6 (the ViT-tiny recipe the digits specs used before they moved to 96-d, depth 3), 32x32 images in 4x4 patches
  (64 tokens), batch 64, fp32 (the platform autocasts on CUDA only).
* CUDA: ViT-S/16 (384-d, 6 heads, depth 12) at 224x224 (196 tokens), batch 128, bf16 autocast.
* tiny (tests only): a 32-d, depth-1 ViT on 16x16 images, batch 8.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = Path(__file__).resolve().parent / "results"
SCHEMA = "ssl_platform.bench/v1"
METHODS = ("mae", "dino", "ibot", "data2vec", "salt", "apl", "simclr", "byol", "mocov3", "vicreg", "barlow_twins", "ijepa",
           "dinov2")
SPEC_FILES = {
    "mae": "experiments/mae_vit_tiny_digits.yaml",
    "dino": "experiments/dino_vit_tiny_digits.yaml",
    "ibot": "experiments/ibot_vit_tiny_digits.yaml",
    "data2vec": "experiments/data2vec_vit_tiny_digits.yaml",
    "salt": "experiments/salt_stage2_vit_tiny_digits.yaml",
    "apl": "experiments/apl_digits.yaml",
    **{m: f"experiments/{m}_vit_tiny_digits.yaml"
       for m in ("simclr", "byol", "mocov3", "vicreg", "barlow_twins", "ijepa", "dinov2")},
}
# Dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, in FLOP/s. Matched in this order
# against torch.cuda.get_device_name() (so "H100 PCIe" is not taken for the SXM part).
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.4e12),
    ("H100 NVL", 835.0e12),
    ("H100 PCIe", 756.0e12),
    ("H100", 989.4e12),  # SXM5
    ("A100", 312.0e12),
)


@dataclass
class BenchConfig:
    """One fixed configuration shared by every method."""

    name: str
    device: str
    encoder_name: str
    encoder_kwargs: dict[str, Any]
    image_size: int
    local_size: int
    batch_size: int
    autocast_bf16: bool
    apl: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        k = self.encoder_kwargs
        return (
            f"{self.encoder_name} (dim {k['embed_dim']}, depth {k['depth']}, heads {k['num_heads']}), "
            f"{self.image_size}x{self.image_size} images, patch {k['patch_size']} "
            f"({(self.image_size // k['patch_size']) ** 2} tokens), batch {self.batch_size}, "
            f"{'bf16 autocast' if self.autocast_bf16 else 'fp32'} on {self.device}"
        )


def bench_config(device: str, tiny: bool = False, batch_size: int | None = None) -> BenchConfig:
    if tiny:
        cfg = BenchConfig(
            name="tiny", device=device, encoder_name="vit_tiny_patch16_224",
            encoder_kwargs={"img_size": 16, "patch_size": 2, "embed_dim": 32, "num_heads": 2, "depth": 1},
            image_size=16, local_size=8, batch_size=8, autocast_bf16=False,
            apl={"image_size": 16, "grid_size": 4, "embed_dim": 32, "heads": 2, "n_blocks": 1},
        )  # fmt: skip
    elif device == "cuda":
        cfg = BenchConfig(
            name="cuda-vit-s16-224", device=device, encoder_name="vit_small_patch16_224",
            encoder_kwargs={"img_size": 224, "patch_size": 16, "embed_dim": 384, "num_heads": 6, "depth": 12},
            image_size=224, local_size=96, batch_size=128, autocast_bf16=True,
            apl={"image_size": 224, "grid_size": 14, "embed_dim": 384, "heads": 6, "n_blocks": 12},
        )  # fmt: skip
    else:
        cfg = BenchConfig(
            name="cpu-vit-tiny-32", device=device, encoder_name="vit_tiny_patch16_224",
            encoder_kwargs={"img_size": 32, "patch_size": 4, "embed_dim": 192, "num_heads": 3, "depth": 6},
            image_size=32, local_size=16, batch_size=64, autocast_bf16=False,
            apl={"image_size": 32, "grid_size": 4, "embed_dim": 192, "heads": 3, "n_blocks": 6},
        )  # fmt: skip
    if batch_size:
        cfg.batch_size = int(batch_size)
    return cfg


# ---- specs and methods ---------------------------------------------------------------------------------
def method_raw_spec(method: str, cfg: BenchConfig, teacher: str | None = None) -> dict[str, Any]:
    """The method's experiment spec with the shared backbone / image size / batch size of ``cfg``."""
    from ssl_platform.spec import read_yaml

    raw = read_yaml(ROOT / SPEC_FILES[method])
    data = raw.setdefault("data", {})
    data.update(batch_size=cfg.batch_size, image_size=cfg.image_size, num_workers=0)
    data.setdefault("multicrop", {})["local_size"] = cfg.local_size
    m = raw["method"]
    if method == "apl":
        m.update(cfg.apl)
    else:
        m["encoder_name"] = cfg.encoder_name
        m["encoder_kwargs"] = {**(m.get("encoder_kwargs") or {}), **cfg.encoder_kwargs}
        if "image_size" in m:
            m["image_size"] = cfg.image_size
        if "top_k_blocks" in m:  # data2vec averages the top-k of the encoder's blocks
            m["top_k_blocks"] = min(m["top_k_blocks"], cfg.encoder_kwargs["depth"])
    if method == "salt":
        m["teacher"] = teacher or "unset"
    raw.setdefault("scaling", {})["use_gpu"] = cfg.device == "cuda"
    raw["eval"] = {"knn": {"enabled": False}, "random_init_baseline": False}
    return raw


def method_spec(method: str, cfg: BenchConfig, teacher: str | None = None, overrides: dict | None = None):
    from ssl_platform.spec import spec_from_dict

    raw = method_raw_spec(method, cfg, teacher)
    for section, values in (overrides or {}).items():
        raw.setdefault(section, {}).update(values)
    return spec_from_dict(raw, source=f"{SPEC_FILES[method]} (benchmark overrides)")


def fresh_teacher(cfg: BenchConfig, directory: Path) -> str:
    """SALT stage 2's frozen teacher: a freshly initialised MAE encoder saved as a stage-1 checkpoint.

    Its weights do not matter for the cost of a step, only its architecture (the same as the student's).
    """
    from methods import checkpoint_io
    from methods import vit as V

    kwargs = method_raw_spec("salt", cfg)["method"]["encoder_kwargs"]
    encoder = V.create_vit(cfg.encoder_name, kwargs)
    checkpoint_io.save_encoder(
        directory, "mae", {"encoder_name": cfg.encoder_name, "encoder_kwargs": kwargs}, encoder.state_dict()
    )
    return str(directory)


_SPLITS: dict[Any, Any] = {}


def train_split(spec):
    """The training split of a spec's data section (cached: every method uses the same images)."""
    from ssl_platform.data.small_sets import load_split

    key = (spec.data.name, spec.data.image_size, spec.data.test_fraction)
    if key not in _SPLITS:
        _SPLITS[key] = load_split(spec.data).train
    return _SPLITS[key]


@dataclass
class Prepared:
    """A built method with its optimiser and one fixed collated batch on the device."""

    name: str
    spec: Any
    method: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    batch: Any
    device: torch.device
    autocast_bf16: bool
    step_index: int = 0

    @property
    def batch_size(self) -> int:
        return int(self.spec.data.batch_size)


def prepare(method: str, cfg: BenchConfig, workdir: Path, seed: int = 0, optimizer_kwargs: dict | None = None) -> Prepared:
    from torch.utils.data import default_collate

    from benchmarks.per_sample_views import ViewDataset, build_view_transform
    from ssl_platform.training.optim import build_optimizer, build_scheduler, param_groups
    from ssl_platform.training.trainer import build_method_from_spec, seed_everything

    teacher = fresh_teacher(cfg, workdir / f"teacher-{cfg.name}") if method == "salt" else None
    spec = method_spec(method, cfg, teacher)
    device = torch.device(cfg.device)
    seed_everything(seed)
    model = build_method_from_spec(spec.method).to(device)
    split = train_split(spec)
    ds = ViewDataset(split, build_view_transform(model, spec.data))
    batch = to_device(default_collate([ds[i] for i in range(cfg.batch_size)]), device)
    if optimizer_kwargs is None:
        optimizer = build_optimizer(model, spec.optim, device)
    else:
        kwargs = {"lr": spec.optim.lr, "betas": tuple(spec.optim.betas), **optimizer_kwargs}
        optimizer = torch.optim.AdamW(param_groups(model, spec.optim.weight_decay), **kwargs)
    scheduler = build_scheduler(optimizer, spec.optim, steps_per_epoch=1000)
    model.train()
    return Prepared(method, spec, model, optimizer, scheduler, batch, device, cfg.autocast_bf16)


def train_step(p: Prepared) -> torch.Tensor:
    """One training step as ``ssl_platform.training.trainer`` runs it: schedules hook, forward (bf16 autocast on CUDA),
    backward, hook, gradient clipping, AdamW, LR schedule, EMA hook. No host synchronisation."""
    i = p.step_index
    epoch = 1.0 + i / 1000.0  # past DINO/iBOT's first epoch (last-layer freezing), as in most of a run
    p.method.on_train_step(i, 100_000, epoch)
    with torch.autocast(p.device.type, dtype=torch.bfloat16, enabled=p.autocast_bf16):
        out = p.method(**p.batch)
    p.optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    p.method.before_optimizer_step(epoch)
    from ssl_platform.training.optim import clip_gradients

    clip_gradients(p.method, p.spec.optim)
    p.optimizer.step()
    p.scheduler.step()
    p.method.after_optimizer_step()
    p.step_index += 1
    return out.loss.detach()


def to_device(batch: Any, device: torch.device) -> Any:
    """Tensors of a (nested) view batch on ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call (matmuls, convolutions, attention: forward and backward) by ``FlopCounterMode``."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def peak_bf16_flops(device: str) -> tuple[str | None, float | None]:
    """``(gpu name, peak dense bf16 FLOP/s)`` of the current CUDA device, ``(name, None)`` if not in the table."""
    if device != "cuda" or not torch.cuda.is_available():
        return None, None
    name = torch.cuda.get_device_name()
    for key, peak in PEAK_BF16_FLOPS:
        if key.lower() in name.lower():
            return name, peak
    return name, None


def in_python_thread(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` in a new Python thread, as Ray Train V2 runs ``train_loop_per_worker`` in a thread of the worker
    actor: OpenMP behaves differently there than in the main thread on a busy machine (see benchmarks/README.md)."""
    box: dict[str, Any] = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as err:  # re-raised in the caller
            box["error"] = err

    th = threading.Thread(target=target, name="bare-train-loop")
    th.start()
    th.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


# ---- timing --------------------------------------------------------------------------------------------
def sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], calls: int, device: str | torch.device) -> float:
    """Seconds for ``calls`` calls of ``fn`` (device synchronised before and after)."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    sync(device)
    return time.perf_counter() - t0


def summarize(values: list[float], digits: int = 4) -> dict[str, Any]:
    """Median, quartiles, IQR and the raw values of repeated measurements."""
    vals = [float(v) for v in values]
    if not vals:
        return {"median": None, "q1": None, "q3": None, "iqr": None, "n": 0, "values": []}
    if len(vals) >= 2:
        q1, _, q3 = statistics.quantiles(vals, n=4, method="inclusive")
    else:
        q1 = q3 = vals[0]

    def r(x: float) -> float:
        return float(f"{x:.{digits}g}")

    return {"median": r(statistics.median(vals)), "q1": r(q1), "q3": r(q3), "iqr": r(q3 - q1), "n": len(vals),
            "values": [r(v) for v in vals]}  # fmt: skip


def paired_ratio(num: list[float], den: list[float]) -> dict[str, Any]:
    """Per-repeat ratios ``num[i] / den[i]`` (measured in the same round, so slow drifts of a shared machine
    cancel), summarised."""
    return summarize([a / b for a, b in zip(num, den) if b])


# ---- machine and results -------------------------------------------------------------------------------
def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _slug(text: str) -> str:
    out = "".join(c.lower() if c.isalnum() else "-" for c in text)
    while "--" in out:
        out = out.replace("--", "-")
    return out.strip("-")


def machine_info() -> dict[str, Any]:
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            gpus.append({"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1)})
    cores = os.cpu_count() or 1
    info = {
        "hostname": socket.gethostname(),
        "cpu_model": cpu_model(),
        "logical_cores": cores,
        "usable_cores": usable_cores(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": _memory_gib(),
        "gpus": gpus,
        "os": platform.platform(),
    }
    if gpus:
        info["label"] = _slug(f"{gpus[0]['name']}-x{len(gpus)}")
    else:
        info["label"] = _slug(f"cpu-{info['cpu_model']}-{info['usable_cores']}c")
    return info


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for mod in ("torch", "torchvision", "timm", "ray", "numpy"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # a missing optional package is reported as None
            out[mod] = None
    out["cuda"] = torch.version.cuda if torch.cuda.is_available() else None
    return out


def git_commit() -> str | None:
    """``HEAD`` (``-dirty`` with uncommitted changes); ``$BENCH_GIT_COMMIT`` where the tree is a copy without
    ``.git`` (a container or a remote GPU machine given the sources only)."""
    if os.environ.get("BENCH_GIT_COMMIT"):
        return os.environ["BENCH_GIT_COMMIT"]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                               text=True, timeout=10).stdout.strip()  # fmt: skip
        return (sha + ("-dirty" if dirty else "")) or None
    except (OSError, subprocess.SubprocessError):
        return None


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def command_line(argv: list[str] | None = None) -> str:
    args = sys.argv[1:] if argv is None else argv
    return " ".join([Path(sys.executable).name, "-m", "benchmarks.run", *args])


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)


def config_dict(cfg: BenchConfig) -> dict[str, Any]:
    d = asdict(cfg)
    d["description"] = cfg.describe()
    return d
