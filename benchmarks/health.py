"""``health`` section: what the health metrics (``eval.health``, issue 30) cost per step.

The worker loop's own epoch (:func:`ssl_platform.training.trainer.train_one_epoch`, one process, no Ray) of a digits
recipe, with the readings on (``eval.health.enabled: true``, the default: references kept every step, metrics computed
and read every log interval) and off, in interleaved rounds on the same data and weights. Reported: the per-round
ratio of epoch times (on / off), its median and IQR; target < 1.03. On a busy machine the epochs' noise is larger
than the cost, so the section also times the reading itself (``RunWatch.read`` on a step's output) against the step
it is amortised over (one reading per log interval).

The online linear probe (``eval.online_probe: true``, off by default) is timed the same way: epochs with it against
epochs without it (health metrics on in both), interleaved; its cost is one no-grad forward of the batch's clean
evaluation input through the evaluated encoder plus the head's step, per step.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.common import ROOT, summarize

RECIPES = {"mae": "experiments/mae_vit_tiny_digits.yaml", "dino": "experiments/dino_vit_tiny_digits.yaml"}


def _epoch_seconds(recipe: str, enabled: bool, epoch: int, batch_size: int, probe: bool = False) -> float:
    from ssl_platform.spec import load_spec
    from ssl_platform.training.trainer import local_worker, train_one_epoch

    spec = load_spec(ROOT / recipe, [f"eval.health.enabled={str(enabled).lower()}", f"data.batch_size={batch_size}",
                                     f"eval.online_probe={str(probe).lower()}", "checkpoint.uri=/tmp/bench-health"])
    torch.manual_seed(0)
    worker, data, training = local_worker(spec)
    t0 = time.perf_counter()
    train_one_epoch(worker, data, training, epoch)
    return time.perf_counter() - t0


def read_share(recipe: str, batch_size: int, steps: int = 5, reads: int = 50) -> dict[str, float]:
    """Milliseconds of one health reading and of one training step, and the reading's share of the step time at one
    reading per log interval (``default_log_every``)."""
    from ssl_platform.spec import load_spec
    from ssl_platform.training.hooks import StepInfo
    from ssl_platform.training.progress import default_log_every
    from ssl_platform.training.trainer import local_worker, train_step

    spec = load_spec(ROOT / recipe, [f"data.batch_size={batch_size}", "checkpoint.uri=/tmp/bench-health"])
    worker, data, training = local_worker(spec)
    gen, batch = torch.Generator().manual_seed(0), next(iter(data.train(0)))
    info = StepInfo("bench", 0, 0, 0, data.steps_per_epoch, 0)
    for _ in range(2):
        train_step(worker, data, training, batch, gen, info, 0.0)
    t0 = time.perf_counter()
    for _ in range(steps):
        train_step(worker, data, training, batch, gen, info, 0.0)
    step_s = (time.perf_counter() - t0) / steps
    t0 = time.perf_counter()
    for _ in range(reads):
        training.watch.read(0)
    read_s = (time.perf_counter() - t0) / reads
    every = default_log_every(data.steps_per_epoch)
    return {"step_ms": round(step_s * 1e3, 2), "read_ms": round(read_s * 1e3, 3), "log_every": every,
            "share": read_s / every / step_s}


def _paired_epochs(rounds: int, timed: Callable[[bool, int], float]) -> tuple[list[float], list[float], list[float]]:
    """``rounds`` pairs of epochs with a feature on and off (the order alternating): ``(on, off, on / off)``."""
    on, off, ratios = [], [], []
    for r in range(rounds):
        first_on = r % 2 == 0
        a, b = timed(first_on, r), timed(not first_on, r)
        t_on, t_off = (a, b) if first_on else (b, a)
        on.append(t_on)
        off.append(t_off)
        ratios.append(t_on / t_off)
    return on, off, ratios


def run_health(rounds: int, log: Callable[[str], None], methods: tuple[str, ...] = ("mae", "dino"),
               batch_size: int = 64) -> dict[str, Any]:
    out: dict[str, Any] = {"rounds": rounds, "batch_size": batch_size, "methods": {}}
    for method in methods:
        recipe = RECIPES[method]
        _epoch_seconds(recipe, True, 0, batch_size)  # warm-up (kernels, data)
        on, off, ratios = _paired_epochs(rounds, lambda enabled, r, recipe=recipe: _epoch_seconds(recipe, enabled, r, batch_size))
        p_on, p_off, p_ratios = _paired_epochs(
            rounds, lambda probe, r, recipe=recipe: _epoch_seconds(recipe, True, r, batch_size, probe=probe))
        entry = {"on_s": summarize(on), "off_s": summarize(off), "ratio": summarize(ratios),
                 "reading": read_share(recipe, batch_size),
                 "online_probe": {"on_s": summarize(p_on), "off_s": summarize(p_off), "ratio": summarize(p_ratios)}}
        out["methods"][method] = entry
        log(f"[health] {method}: epoch {entry['on_s']['median']:.2f} s with health metrics, "
            f"{entry['off_s']['median']:.2f} s without: ratio {entry['ratio']['median']:.3f} "
            f"(IQR {entry['ratio']['iqr']:.3f}, {rounds} paired rounds); one reading "
            f"{entry['reading']['read_ms']:.2f} ms every {entry['reading']['log_every']} steps of "
            f"{entry['reading']['step_ms']:.0f} ms: {entry['reading']['share']:.3%} of the step time; online probe: "
            f"epoch ratio {entry['online_probe']['ratio']['median']:.3f} (IQR {entry['online_probe']['ratio']['iqr']:.3f})")
    return out


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run_health(int(sys.argv[1]) if len(sys.argv) > 1 else 5, print), indent=1))
