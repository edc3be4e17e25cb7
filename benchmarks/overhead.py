"""Platform overhead: the same epochs through ``TorchTrainer`` (1 worker) and through a bare PyTorch loop.

Both sides run the default experiment's spec (``experiments/mae_vit_tiny_digits.yaml``, no kNN evaluation, one
checkpoint at the end, no MLflow run) on the same data with the same uint8 batches, device-side views, method, AdamW + schedule,
hooks and clipping. Compared:

* per epoch: the worker's own ``epoch_time_s`` against the bare loop's epoch time (first epoch of each side
  dropped as warm-up); target <= 1.10x;
* per run: ``trainer.fit()`` wall time (worker start, data, model build, reports, checkpoint) against the bare
  loop's wall time including its own set-up;
* Ray start-up (``ssl_platform.training.ray_runtime.init_ray``: local instance with dashboard) and shutdown, separately.

The bare loop runs in a Python thread, as Ray Train V2 runs the loop in a thread of its worker actor, before
Ray starts and again after Ray has shut down (bracketing slow drifts of a shared machine); Ray's daemons are
counted as platform cost. Both sides use the same torch threads (``--threads``, default
``scaling.cpus_per_worker``), through ``OMP_NUM_THREADS``, which the train loop applies in the worker.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from ray.train import UserCallback

from benchmarks.common import ROOT, in_python_thread, summarize

SPEC = "experiments/mae_vit_tiny_digits.yaml"


def overhead_spec(epochs: int, batch_size: int, test_fraction: float, storage: Path, device: str):
    from ssl_platform.spec import read_yaml, spec_from_dict

    raw = read_yaml(ROOT / SPEC)
    raw["data"].update(batch_size=batch_size, test_fraction=test_fraction)
    raw["optim"].update(epochs=epochs, warmup_epochs=min(1, epochs))
    raw["checkpoint"] = {"uri": str(storage), "every_epochs": epochs, "keep": 1}
    raw["tracking"] = {"uri": f"sqlite:///{storage / 'unused-mlflow.db'}", "experiment": "bench"}
    raw["eval"] = {"knn": {"enabled": False}, "linear": {"enabled": False}, "random_init_baseline": False}
    raw["scaling"]["use_gpu"] = device == "cuda"
    return spec_from_dict(raw, source=f"{SPEC} (overhead benchmark)")


def bare_loop(spec, device: torch.device, threads: int | None) -> dict[str, Any]:
    """What ``train_loop_per_worker`` does for 1 worker, without Ray: the same seeds, uint8 batches, device-side
    views and the platform's own :func:`ssl_platform.training.trainer.train_step`, with the loss read once per epoch."""
    from ssl_platform.training.trainer import local_worker, train_step

    t_start = time.perf_counter()
    if threads:
        torch.set_num_threads(threads)  # the worker's OMP_NUM_THREADS (set for both sides by run_overhead)
    worker, data, training = local_worker(spec, device)
    method, steps_per_epoch = training.method, data.steps_per_epoch
    epoch_times = []
    for epoch in range(spec.optim.epochs):
        method.train()
        generator = torch.Generator(device=device).manual_seed(spec.seed + epoch)
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        for i, batch in enumerate(data.train(epoch)):
            info = None  # no step hooks
            loss, _, _ = train_step(worker, data, training, batch, generator, info, epoch + i / steps_per_epoch)
            loss_sum += loss.float()
            training.global_step += 1
        float(loss_sum)  # the platform reads the epoch's mean loss: one host sync per epoch
        epoch_times.append(time.perf_counter() - t0)
    return {"epoch_time_s": epoch_times, "wall_s": time.perf_counter() - t_start, "steps_per_epoch": steps_per_epoch}


class ReportLog(UserCallback):
    """Runs in the Train controller process: appends rank 0's reported metrics of every epoch to a JSON-lines
    file (``Result.metrics_dataframe`` holds only the checkpointed reports)."""

    def __init__(self, path: str):
        self.path = path

    def after_report(self, run_context, metrics, checkpoint):
        with open(self.path, "a") as f:
            f.write(json.dumps({k: v for k, v in metrics[0].items() if isinstance(v, (int, float))}) + "\n")


def run_overhead(epochs: int, batch_size: int, test_fraction: float, device: str, threads: int | None = None,
                 log: Callable[[str], None] = print) -> dict[str, Any]:  # fmt: skip
    import ray

    from ssl_platform.training.ray_runtime import init_ray
    from ssl_platform.training.trainer import build_trainer

    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp:
        storage = Path(tmp)
        spec = overhead_spec(epochs, batch_size, test_fraction, storage, device)
        if device == "cpu":
            threads = threads or int(spec.scaling.cpus_per_worker)
        already = ray.is_initialized()
        old_omp = os.environ.get("OMP_NUM_THREADS")
        if threads and not already:
            os.environ["OMP_NUM_THREADS"] = str(threads)  # the Ray worker then sets the same torch threads
        threads_before = torch.get_num_threads()
        try:
            bare = [in_python_thread(lambda: bare_loop(spec, torch.device(device), threads))]
            torch.set_num_threads(threads_before)
            log(f"[overhead] bare loop (before Ray): epochs {[round(t, 2) for t in bare[0]['epoch_time_s']]} s, wall {bare[0]['wall_s']:.1f} s")

            t0 = time.perf_counter()
            init_ray()
            ray_start = None if already else time.perf_counter() - t0
            log(f"[overhead] Ray start-up: {ray_start if ray_start is None else round(ray_start, 2)} s")
            report_log = storage / "reports.jsonl"
            trainer = build_trainer(spec, f"bench-overhead-{os.getpid()}", None, storage_path=str(storage),
                                    callbacks=[ReportLog(str(report_log))])  # fmt: skip
            t0 = time.perf_counter()
            result = trainer.fit()
            fit_wall = time.perf_counter() - t0
            if result.error is not None:
                raise result.error
            reports = [json.loads(line) for line in report_log.read_text().splitlines() if line.strip()]
            platform_epochs = [float(h["epoch_time_s"]) for h in sorted(reports, key=lambda h: h["epoch"])]
            log(f"[overhead] TorchTrainer: epochs {[round(t, 2) for t in platform_epochs]} s, fit wall {fit_wall:.1f} s")
            ray_stop = None
            if not already:
                t0 = time.perf_counter()
                ray.shutdown()
                ray_stop = time.perf_counter() - t0
                bare.append(in_python_thread(lambda: bare_loop(spec, torch.device(device), threads)))
                torch.set_num_threads(threads_before)
                log(f"[overhead] bare loop (after Ray): epochs {[round(t, 2) for t in bare[1]['epoch_time_s']]} s, wall {bare[1]['wall_s']:.1f} s")
        finally:
            if old_omp is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = old_omp

    skip = 1 if epochs > 1 else 0
    b = [t for run in bare for t in run["epoch_time_s"][skip:]]
    pf = platform_epochs[skip:]
    bare_med, plat_med = summarize(b), summarize(pf)
    epoch_ratio = plat_med["median"] / bare_med["median"] if bare_med["median"] and plat_med["median"] else None
    bare_wall = statistics.median(run["wall_s"] for run in bare)
    return {
        "spec": SPEC,
        "overrides": {"data.batch_size": batch_size, "data.test_fraction": test_fraction, "optim.epochs": epochs,
                      "eval": "off", "checkpoint": "last epoch only", "tracking": "none"},  # fmt: skip
        "device": device,
        "torch_threads": threads,
        "steps_per_epoch": bare[0]["steps_per_epoch"],
        "images_per_epoch": bare[0]["steps_per_epoch"] * batch_size,
        "warmup_epochs_dropped": skip,
        "bare_runs": len(bare),
        "bare_epoch_s": bare_med,
        "platform_epoch_s": plat_med,
        "epoch_ratio": round(epoch_ratio, 4) if epoch_ratio else None,
        "epoch_ratio_target": 1.10,
        "bare_wall_s": round(bare_wall, 3),
        "platform_fit_wall_s": round(fit_wall, 3),
        "run_ratio": round(fit_wall / bare_wall, 4),
        "platform_fixed_cost_s": round(fit_wall - sum(platform_epochs), 3),
        "bare_fixed_cost_s": round(statistics.median(run["wall_s"] - sum(run["epoch_time_s"]) for run in bare), 3),
        "ray_startup_s": round(ray_start, 3) if ray_start is not None else None,
        "ray_shutdown_s": round(ray_stop, 3) if ray_stop is not None else None,
    }
