"""Train-step throughput of every method at one fixed configuration, FLOPs per step, MFU on CUDA, and SALT
stage 2's cost against DINO and MAE.

All methods are built first; after warm-up the repeats run round-robin (one repeat of every method, then the
next round), so a slow drift of a shared machine affects every method alike and the per-round ratios
(SALT / DINO, method / MAE) are paired. A step is forward + backward + clipping + AdamW + LR schedule + EMA,
on one fixed collated batch (the model's cost alone; the loader is measured in ``pipeline``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    BenchConfig,
    config_dict,
    count_flops,
    paired_ratio,
    peak_bf16_flops,
    prepare,
    summarize,
    sync,
    timed,
    train_step,
)


def views_per_image(p) -> int:
    """Views per image of the method's declared training views (:meth:`methods.base.SSLMethod.training_views`)."""
    return sum(len(group.recipes) for group in type(p.method).training_views(p.spec.data).values())


def run_steps(
    cfg: BenchConfig,
    methods: list[str],
    workdir: Path,
    warmup: int,
    repeats: int,
    steps_per_repeat: int,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    device = cfg.device
    prepared = {}
    entries: dict[str, dict[str, Any]] = {}
    for name in methods:
        p = prepared[name] = prepare(name, cfg, workdir)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for _ in range(warmup):
            train_step(p)
        sync(device)
        flops = count_flops(lambda p=p: train_step(p))
        params = list(p.method.parameters())
        entries[name] = {
            "views_per_image": views_per_image(p),
            "params_total_m": round(sum(x.numel() for x in params) / 1e6, 3),
            "params_trainable_m": round(sum(x.numel() for x in params if x.requires_grad) / 1e6, 3),
            "flops_per_step": flops,
            "gflops_per_image": round(flops / p.batch_size / 1e9, 4),
        }
        if device == "cuda":
            entries[name]["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        log(f"[steps] {name}: built, {warmup} warm-up steps, {flops / 1e9:.2f} GFLOP/step")

    step_s: dict[str, list[float]] = {m: [] for m in methods}
    for r in range(repeats):
        for name in methods:
            p = prepared[name]
            dt = timed(lambda p=p: train_step(p), steps_per_repeat, device)
            step_s[name].append(dt / steps_per_repeat)
        log(f"[steps] round {r + 1}/{repeats}: " + ", ".join(f"{m} {step_s[m][-1]:.3f}s" for m in methods))

    gpu_name, peak = peak_bf16_flops(device)
    for name in methods:
        b = prepared[name].batch_size
        e = entries[name]
        e["images_per_s"] = summarize([b / s for s in step_s[name]])
        e["step_s"] = summarize(step_s[name])
        med = e["step_s"]["median"]
        e["achieved_gflops_per_s"] = float(f"{e['flops_per_step'] / med / 1e9:.4g}") if med else None
        e["mfu"] = round(e["flops_per_step"] / med / peak, 4) if (peak and med and cfg.autocast_bf16) else None
        if "mae" in step_s and name != "mae":
            e["throughput_vs_mae"] = paired_ratio(step_s["mae"], step_s[name])  # images/s ratio = inverse time ratio
        if name == "apl":
            e["note"] = "APL has its own encoder (G x G grid of patches, no ViT patch embedding): width/depth matched only"

    out: dict[str, Any] = {
        "config": config_dict(cfg),
        "warmup_steps": warmup,
        "repeats": repeats,
        "steps_per_repeat": steps_per_repeat,
        "order": "round-robin over methods, per-round ratios paired",
        "gpu": gpu_name,
        "peak_bf16_flops": peak,
        "methods": entries,
    }
    if "salt" in prepared:
        out["salt"] = salt_comparison(prepared["salt"], entries, step_s)
    return out


def salt_comparison(salt, entries: dict[str, dict[str, Any]], step_s: dict[str, list[float]]) -> dict[str, Any]:
    """SALT stage 2 (frozen teacher forward on the full image + student on the context patches only + predictor)
    against DINO and MAE at the same backbone and batch: per-step time and FLOP ratios."""
    images = salt.batch["images"]

    def teacher_forward():
        with torch.autocast(salt.device.type, dtype=torch.bfloat16, enabled=salt.autocast_bf16):
            salt.method.teacher_latents(images)

    teacher_flops = count_flops(teacher_forward)
    total = entries["salt"]["flops_per_step"]
    out: dict[str, Any] = {
        "teacher_forward_flops": teacher_flops,
        "teacher_share_of_step_flops": round(teacher_flops / total, 4) if total else None,
        "teacher_trainable_params": sum(p.numel() for p in salt.method.teacher.parameters() if p.requires_grad),
    }
    for ref in ("dino", "mae"):
        if ref in step_s:
            out[f"step_time_vs_{ref}"] = paired_ratio(step_s["salt"], step_s[ref])
            out[f"flops_vs_{ref}"] = round(total / entries[ref]["flops_per_step"], 4)
    return out
