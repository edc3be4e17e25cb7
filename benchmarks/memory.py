"""``memory`` section: peak memory per worker of MAE with a ViT-B/16 encoder at 224x224, batch 16 per worker, on the
CPU, 2 workers (gloo): ``scaling.strategy`` ddp vs fsdp, each with and without ``scaling.activation_checkpointing``.

Each variant runs in 2 fresh processes (``torch.multiprocessing``, 1 thread each) through the worker loop's own
``build_training`` / ``train_step``, on generated images. Per worker, measured (Linux ``/proc/self``):

* ``baseline_mb``: RSS after imports, the process group and the data, before the model is built;
* ``state_mb``: RSS above the baseline after 2 steps with the gradients freed (``malloc_trim`` first): parameters
  (student, buffers) + AdamW state + whatever the strategy keeps (DDP's gradient buckets);
* ``step_peak_mb``: peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs`` before the step) above the baseline
  during one more step;
* ``activation_peak_mb``: ``step_peak_mb - state_mb - grads_mb`` (``grads_mb``: this worker's gradient bytes), an
  estimate of the peak of activations and temporaries;
* ``step_s``: median step time of the 3 steps (both workers run together on the 2 cores).

On a GPU the same figures would come from ``torch.cuda.max_memory_allocated``; this section measures the CPU only.
``python -m benchmarks.memory`` runs it alone (about 3 minutes on 2 cores).
"""

from __future__ import annotations

import ctypes
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ssl_platform.spec import spec_from_dict
from ssl_platform.training.hooks import StepInfo
from ssl_platform.training.sharding import local
from ssl_platform.training.trainer import LoopConfig, Worker, build_training, setup_data, train_step

VARIANTS = {"ddp": ("ddp", False), "ddp_ckpt": ("ddp", True), "fsdp": ("fsdp", False), "fsdp_ckpt": ("fsdp", True)}
VIT_B = {"img_size": 224, "patch_size": 16, "embed_dim": 768, "depth": 12, "num_heads": 12}
TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2}


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _rss_mb() -> float:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap pages back to the OS: RSS = live memory
    except OSError:
        pass
    return _status_kb("VmRSS") / 1024


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0: VmHWM := current RSS


def _spec(strategy: str, ckpt: bool, batch: int, tiny: bool, workdir: str):
    enc = TINY if tiny else VIT_B
    return spec_from_dict({
        "name": "memory", "seed": 0,
        "method": {"name": "mae", "encoder_name": "vit_base_patch16_224", "encoder_kwargs": dict(enc),
                   "decoder_embed_dim": 512 if not tiny else 32, "decoder_depth": 8 if not tiny else 1,
                   "decoder_num_heads": 16 if not tiny else 2},
        "data": {"name": "synthetic", "num_samples": 4 * batch, "image_size": enc["img_size"], "batch_size": 2 * batch},
        "optim": {"lr": 1e-4, "warmup_epochs": 0, "epochs": 1, "clip_grad": 1.0},
        "scaling": {"num_workers": 2, "strategy": strategy, "activation_checkpointing": ckpt},
        "checkpoint": {"uri": workdir}, "tracking": {"uri": workdir},
    })  # fmt: skip


def _worker(rank: int, port: int, variant: str, batch: int, tiny: bool, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    strategy, ckpt = VARIANTS[variant]
    spec = _spec(strategy, ckpt, batch, tiny, str(Path(out).parent))
    worker = Worker(spec, LoopConfig(spec={}, run_name="memory"), rank, 2, torch.device("cpu"), None)
    data = setup_data(worker)
    batches = list(data.train(0))
    dist.barrier()
    baseline = _rss_mb()
    training = build_training(worker, data)
    if strategy == "ddp":
        training.model = torch.nn.parallel.DistributedDataParallel(training.method)
    times = []
    for i in range(3):
        if i == 2:
            state = _rss_mb() - baseline
            _reset_peak()
        t0 = time.perf_counter()
        train_step(worker, data, training, batches[i % len(batches)], torch.Generator().manual_seed(i),
                   StepInfo("memory", rank, 0, i, 3, i), 1.0)
        times.append(time.perf_counter() - t0)
        peak = _status_kb("VmHWM") / 1024 - baseline
        grads = sum(local(p.grad).numel() * p.grad.element_size() for p in training.method.parameters()
                    if p.grad is not None)
        training.optimizer.zero_grad(set_to_none=True)
    local_params = sum(local(p).numel() * p.element_size() for p in training.method.parameters())  # FSDP: shards
    res = {"baseline_mb": baseline, "state_mb": state, "step_peak_mb": peak, "grads_mb": grads / 2**20,
           "params_mb": local_params / 2**20, "step_s": statistics.median(times)}
    res["activation_peak_mb"] = res["step_peak_mb"] - res["state_mb"] - res["grads_mb"]
    Path(out + f".{rank}").write_text(json.dumps(res))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(variant: str, batch: int = 16, tiny: bool = False) -> list[dict[str, float]]:
    """Both workers' figures for one variant (fresh processes)."""
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        out = str(Path(tmp) / "worker")
        mp.spawn(_worker, args=(_free_port(), variant, batch, tiny, out), nprocs=2)
        return [json.loads(Path(f"{out}.{r}").read_text()) for r in range(2)]


def run_memory(batch: int = 16, tiny: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every variant, the per-worker maxima, and the ratios the targets name."""
    res: dict[str, Any] = {"model": "MAE, ViT-B/16 encoder (8-block 512-d decoder)" if not tiny else "MAE, tiny ViT",
                           "image_size": (TINY if tiny else VIT_B)["img_size"], "batch_per_worker": batch,
                           "workers": 2, "threads_per_worker": 1, "variants": {}}
    for name in VARIANTS:
        workers = measure(name, batch, tiny)
        worst = {k: round(max(w[k] for w in workers), 3) for k in workers[0]}
        res["variants"][name] = worst
        log(f"[memory] {name}: state {worst['state_mb']:.0f} MB, step peak {worst['step_peak_mb']:.0f} MB, "
            f"activations ~{worst['activation_peak_mb']:.0f} MB, step {worst['step_s']:.2f} s (per worker, max of 2)")
    v = res["variants"]
    res["fsdp_state_over_ddp"] = round(v["fsdp"]["state_mb"] / v["ddp"]["state_mb"], 3)
    for s in ("ddp", "fsdp"):
        res[f"{s}_ckpt_activation_cut"] = round(v[s]["activation_peak_mb"] / max(v[f"{s}_ckpt"]["activation_peak_mb"], 1e-9), 3)
        res[f"{s}_ckpt_step_time_ratio"] = round(v[f"{s}_ckpt"]["step_s"] / v[s]["step_s"], 3)
    return res


if __name__ == "__main__":
    print(json.dumps(run_memory(tiny="--tiny" in sys.argv), indent=2))
