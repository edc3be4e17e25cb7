"""A/B measurements behind the platform's performance choices (each pair timed round-robin, ratios paired):

* AdamW implementation: for-loop vs ``foreach`` vs ``fused`` (``optimizer.step()`` alone, MAE's parameters);
* attention: PyTorch SDPA (timm's fused attention) vs timm's explicit softmax(QK^T)V, MAE and DINO steps;
* autocast: bf16 vs fp32 (the platform autocasts on CUDA only);
* ``torch.compile`` of the method (``scaling.compile: true``): compile time and step throughput, MAE
  (``--only compile``: minutes of compilation on a small CPU, so not in the default sections there).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    BenchConfig,
    Prepared,
    in_python_thread,
    paired_ratio,
    prepare,
    summarize,
    sync,
    timed,
    train_step,
    usable_cores,
)


def _round_robin(fns: dict[str, Callable[[], Any]], repeats: int, calls: int, device: str) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            out[k].append(timed(fn, calls, device) / calls)
    return out


def adamw(cfg: BenchConfig, workdir: Path, repeats: int, log: Callable[[str], None] = print) -> dict[str, Any]:
    from ssl_platform.training.optim import param_groups

    p = prepare("mae", cfg, workdir)
    train_step(p)  # gradients to step with
    variants = {"for_loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
    opts = {}
    for name, kw in variants.items():
        try:
            opts[name] = torch.optim.AdamW(param_groups(p.method, p.spec.optim.weight_decay), lr=1e-6, **kw)
            opts[name].step()
        except (RuntimeError, ValueError) as err:  # fused unsupported on this device / build
            log(f"[opt] AdamW {name}: unavailable ({err})")
            opts.pop(name, None)
    times = _round_robin({k: o.step for k, o in opts.items()}, repeats, 3, cfg.device)
    res: dict[str, Any] = {"params_m": round(sum(x.numel() for x in p.method.parameters()) / 1e6, 3)}
    for k, v in times.items():
        res[f"{k}_ms"] = summarize([t * 1e3 for t in v])
    base = "foreach" if cfg.device == "cuda" else "for_loop"  # PyTorch's default for these tensors
    res["default_without_fused"] = base
    if "fused" in times:
        res["fused_vs_default_time"] = paired_ratio(times["fused"], times[base])
    res["platform_uses"] = "fused (ssl_platform.training.optim.build_optimizer)"
    log("[opt] AdamW step ms: " + ", ".join(f"{k} {res[f'{k}_ms']['median']:.1f}" for k in times))
    return res


def _prepare_with(method: str, cfg: BenchConfig, workdir: Path, fused_attn: bool | None = None) -> Prepared:
    from timm.layers import config as timm_config

    old = timm_config._USE_FUSED_ATTN
    try:
        if fused_attn is not None:
            timm_config.set_fused_attn(fused_attn)
        return prepare(method, cfg, workdir)  # timm's Attention reads the flag when it is built
    finally:
        timm_config._USE_FUSED_ATTN = old


def attention(cfg: BenchConfig, workdir: Path, warmup: int, repeats: int, methods=("mae", "dino"),
              log: Callable[[str], None] = print) -> dict[str, Any]:  # fmt: skip
    res: dict[str, Any] = {}
    for m in methods:
        sdpa = _prepare_with(m, cfg, workdir, True)
        explicit = _prepare_with(m, cfg, workdir, False)
        for p in (sdpa, explicit):
            for _ in range(warmup):
                train_step(p)
        t = _round_robin({"sdpa": lambda a=sdpa: train_step(a), "explicit": lambda b=explicit: train_step(b)}, repeats, 1, cfg.device)
        res[m] = {
            "sdpa_images_per_s": summarize([cfg.batch_size / s for s in t["sdpa"]]),
            "explicit_images_per_s": summarize([cfg.batch_size / s for s in t["explicit"]]),
            "sdpa_speedup": paired_ratio(t["explicit"], t["sdpa"]),
        }
        log(f"[opt] attention {m}: SDPA speed-up x{res[m]['sdpa_speedup']['median']}")
    return res


def autocast(cfg: BenchConfig, workdir: Path, warmup: int, repeats: int, method: str = "mae",
             log: Callable[[str], None] = print) -> dict[str, Any]:  # fmt: skip
    on, off = copy.deepcopy(cfg), copy.deepcopy(cfg)
    on.autocast_bf16, off.autocast_bf16 = True, False
    p_on, p_off = prepare(method, on, workdir), prepare(method, off, workdir)
    for p in (p_on, p_off):
        for _ in range(warmup):
            train_step(p)
    t = _round_robin({"bf16": lambda: train_step(p_on), "fp32": lambda: train_step(p_off)}, repeats, 1, cfg.device)
    res = {
        "method": method,
        "bf16_images_per_s": summarize([cfg.batch_size / s for s in t["bf16"]]),
        "fp32_images_per_s": summarize([cfg.batch_size / s for s in t["fp32"]]),
        "bf16_speedup": paired_ratio(t["fp32"], t["bf16"]),
        "platform_uses": "bf16 autocast on CUDA (scaling.precision=bf16), fp32 on CPU",
    }
    log(f"[opt] autocast {method}: bf16 speed-up x{res['bf16_speedup']['median']} on {cfg.device}")
    return res


def compile_step(cfg: BenchConfig, workdir: Path, warmup: int, repeats: int, method: str = "mae",
                 log: Callable[[str], None] = print) -> dict[str, Any]:  # fmt: skip
    """``torch.compile`` of the method as train.py does it, with an empty inductor cache (a cold compile: a warm
    on-disk cache from an earlier run makes the first step seconds instead of minutes)."""
    from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

    torch._dynamo.reset()
    with temporary_cache_dir(str(workdir / "inductor-cold-cache")):
        eager = prepare(method, cfg, workdir)
        comp = prepare(method, cfg, workdir)
        comp.method = torch.compile(comp.method)  # what train.py does with scaling.compile: true
        sync(cfg.device)
        t0 = time.perf_counter()
        train_step(comp)
        sync(cfg.device)
        compile_s = time.perf_counter() - t0
        log(f"[opt] compile {method}: first step (cold compilation) {compile_s:.1f} s")
        for p in (eager, comp):
            for _ in range(warmup):
                train_step(p)
        t = _round_robin({"compiled": lambda: train_step(comp), "eager": lambda: train_step(eager)}, repeats, 1, cfg.device)
    res = {
        "method": method,
        "first_step_s": round(compile_s, 2),
        "inductor_cache": "cold (empty temporary cache directory)",
        "compiled_images_per_s": summarize([cfg.batch_size / s for s in t["compiled"]]),
        "eager_images_per_s": summarize([cfg.batch_size / s for s in t["eager"]]),
        "compile_speedup": paired_ratio(t["eager"], t["compiled"]),
    }
    log(f"[opt] compile {method}: speed-up x{res['compile_speedup']['median']}")
    return res


def threads(cfg: BenchConfig, workdir: Path, warmup: int, repeats: int, method: str = "mae",
            log: Callable[[str], None] = print) -> dict[str, Any] | None:  # fmt: skip
    """Intra-op threads on CPU: 1 against N = the usable cores, in the main thread and in a Python thread (Ray
    Train V2 runs ``train_loop_per_worker`` in a thread of the worker actor). On a machine shared with other busy
    processes, N OpenMP threads that wait for each other at every small op can be much slower than one."""
    n = usable_cores()
    if cfg.device != "cpu" or n < 2:
        return None
    current = torch.get_num_threads()
    p = prepare(method, cfg, workdir)

    def with_threads(k: int, side_thread: bool = False):
        def body():
            torch.set_num_threads(k)
            try:
                train_step(p)
            finally:
                torch.set_num_threads(current)

        def run():
            in_python_thread(body) if side_thread else body()

        return run

    fns = {"one": with_threads(1), "n_main": with_threads(n), "n_python_thread": with_threads(n, True)}
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    t = _round_robin(fns, repeats, 1, cfg.device)
    res = {
        "method": method,
        "threads": n,
        "one_thread_images_per_s": summarize([cfg.batch_size / s for s in t["one"]]),
        "n_threads_images_per_s": summarize([cfg.batch_size / s for s in t["n_main"]]),
        "n_threads_python_thread_images_per_s": summarize([cfg.batch_size / s for s in t["n_python_thread"]]),
        "n_threads_speedup": paired_ratio(t["one"], t["n_main"]),
        "n_threads_python_thread_speedup": paired_ratio(t["one"], t["n_python_thread"]),
    }
    log(f"[opt] threads {method}: {n} threads vs 1: x{res['n_threads_speedup']['median']} (main thread), "
        f"x{res['n_threads_python_thread_speedup']['median']} (in a Python thread)")
    return res
