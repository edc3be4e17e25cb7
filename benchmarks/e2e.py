"""``e2e`` section: one epoch over a generated JPEG folder, as a user runs it, against stable-pretraining's own
training entry point, side by side.

The data: ``num_images`` generated JPEGs around 500x375 (mixed sizes) in 10 class folders
(:func:`benchmarks.data.image_tree`, cached). Per method (DINO 2 global + 6 local crops, iBOT 2 global crops, MAE,
SALT stage 2), at 224 px, batch 32, ViT-tiny/16 at the methods' seed defaults, one epoch each side:

* **the project**: ``python -m ssl_platform run <spec>`` (the real command line, a fresh local Ray instance) on an
  ``image_folder`` spec (:func:`project_spec`) with one Train worker of ``cpus_per_worker`` CPUs (default: all but
  one, leaving a CPU for Ray Data's decode tasks); evaluation off. Timed by the run itself: ``epoch_time_s`` minus
  ``first_batch_wait_s`` (MLflow metrics of the epoch), i.e. from the first step (its batch in hand) to the end of
  the epoch's last step. SALT's frozen teacher: a freshly initialised MAE encoder saved as a stage-1 checkpoint
  (:func:`benchmarks.common.fresh_teacher`'s way; its weights do not change the cost).
* **the peer**: ``benchmarks/e2e_peer.py`` in the peer's own venv (as the ``peer`` section): ``spt.Manager`` + its
  Lightning trainer + ``spt.data.DataModule`` over torchvision's ``ImageFolder`` with ``spt.data.transforms``,
  the DataLoader workers its docs recommend (``get_num_workers()``), torch's default threads; timed by a Lightning
  callback from the start of the first step to the end of the last.

Both sides count ``steps x batch`` images (``drop_last``). The two runs of a method follow each other (which goes
first alternates between methods); ``lock`` (a file path) is held around each pair so that other heavy jobs of a
shared machine do not run between or during them. Ratio = project images/s / peer images/s.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT

METHODS = ("dino", "ibot", "mae", "salt")
TARGETS = {"dino": 1.3, "ibot": 1.3, "mae": 1.0, "salt": 1.0}
PEER_SCRIPT = Path(__file__).resolve().parent / "e2e_peer.py"
RUN_ID_LINE = re.compile(r"^MLflow run id\s*\|\s*([0-9a-f]{32})\s*$", re.MULTILINE)


@dataclass
class E2EConfig:
    """What both sides run: the folder's size, the views, the batch, the backbone and the project's CPUs."""

    num_images: int = 2000
    mean_size: tuple[int, int] = (375, 500)  # (h, w)
    image_size: int = 224
    local_size: int = 96
    n_local: int = 6
    batch_size: int = 32
    encoder_name: str = "vit_tiny_patch16_224"
    encoder_kwargs: dict[str, Any] = field(default_factory=dict)
    cpus_per_worker: float = 0.0  # 0: all CPUs but one (one left for decoding)
    peer_workers: int = -1  # -1: the peer's get_num_workers()

    def describe(self) -> str:
        return (f"{self.num_images} JPEGs ~{self.mean_size[1]}x{self.mean_size[0]} in 10 folders, {self.encoder_name} "
                f"at {self.image_size} px, batch {self.batch_size}; DINO 2x{self.image_size} + "
                f"{self.n_local}x{self.local_size}, iBOT 2x{self.image_size}")  # fmt: skip


def project_spec(method: str, cfg: E2EConfig, root: Path, workdir: Path, teacher: str | None = None) -> dict[str, Any]:
    """The project's spec for one epoch of ``method`` over ``root`` (its views as :mod:`benchmarks.e2e_peer` draws
    the peer's; labels unused, evaluation off; MLflow and checkpoints under ``workdir``)."""
    m: dict[str, Any] = {"name": method, "encoder_name": cfg.encoder_name, "encoder_kwargs": dict(cfg.encoder_kwargs)}
    if method == "dino":
        m["encoder_kwargs"]["dynamic_img_size"] = True
    if method == "ibot":
        m["image_size"] = cfg.image_size
    if method == "salt":
        m["teacher"] = teacher
    cpus = cfg.cpus_per_worker or max(1, (os.cpu_count() or 2) - 1)
    return {
        "name": f"e2e-{method}", "seed": 0, "method": m,
        "data": {"name": "image_folder", "root": str(root), "labels": "none", "image_size": cfg.image_size,
                 "batch_size": cfg.batch_size,
                 "multicrop": {"n_global": 2, "n_local": cfg.n_local if method == "dino" else 0,
                               "local_size": cfg.local_size, "global_scale": [0.4, 1.0], "local_scale": [0.05, 0.4]},
                 "augment": {"crop_scale": [0.2, 1.0], "hflip": True}},
        "optim": {"name": "adamw", "lr": 1.0e-4, "weight_decay": 0.05, "warmup_epochs": 0, "epochs": 1},
        "scaling": {"num_workers": 1, "use_gpu": False, "cpus_per_worker": cpus},
        "checkpoint": {"uri": str(workdir / "checkpoints"), "every_epochs": 1, "keep": 1},
        "tracking": {"uri": f"sqlite:///{workdir / 'mlruns.db'}", "experiment": "e2e"},
        "eval": {"knn": {"enabled": False}, "random_init_baseline": False, "pictures": False},
    }  # fmt: skip


def salt_teacher(cfg: E2EConfig, directory: Path) -> str:
    """A freshly initialised MAE encoder of ``cfg``'s backbone saved as SALT's stage-1 checkpoint."""
    from methods import checkpoint_io
    from methods import vit as V

    encoder = V.create_vit(cfg.encoder_name, dict(cfg.encoder_kwargs))
    checkpoint_io.save_encoder(directory, "mae", {"encoder_name": cfg.encoder_name,
                                                  "encoder_kwargs": dict(cfg.encoder_kwargs)}, encoder.state_dict())
    return str(directory)


def run_id_from_output(output: str) -> str:
    """The MLflow run id from the result table ``ssl_platform run`` prints at the end."""
    found = RUN_ID_LINE.findall(output)
    if not found:
        raise RuntimeError(f"e2e: no 'MLflow run id' line in the run's output; its tail:\n{output[-3000:]}")
    return found[-1]


def epoch_timing(metrics: dict[str, float], batch_size: int) -> dict[str, float]:
    """From the run's epoch metrics: seconds from the first step to the epoch's end, its images and images/s."""
    missing = [k for k in ("epoch_time_s", "first_batch_wait_s", "global_step") if k not in metrics]
    if missing:
        raise RuntimeError(f"e2e: the run reported no {missing} (metrics seen: {sorted(metrics)})")
    seconds = float(metrics["epoch_time_s"]) - float(metrics["first_batch_wait_s"])
    images = int(metrics["global_step"]) * batch_size
    return {"seconds": round(seconds, 3), "images": images, "images_per_s": round(images / max(seconds, 1e-9), 4),
            "first_batch_wait_s": round(float(metrics["first_batch_wait_s"]), 3)}


def run_project(spec: dict[str, Any], workdir: Path, timeout_s: float = 3600) -> dict[str, Any]:
    """``python -m ssl_platform run`` on ``spec``; the epoch's timing from its MLflow metrics."""
    import mlflow
    import yaml

    path = workdir / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "ssl_platform", "run", str(path)], cwd=str(ROOT), capture_output=True,
                         text=True, timeout=timeout_s, env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})  # fmt: skip
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"e2e: `ssl_platform run {path}` failed (exit {res.returncode}):\n{res.stderr[-3000:]}")
    run = mlflow.MlflowClient(tracking_uri=spec["tracking"]["uri"]).get_run(run_id_from_output(res.stdout))
    return {**epoch_timing(run.data.metrics, int(spec["data"]["batch_size"])), "wall_s": round(wall, 1),
            "loss": run.data.metrics.get("loss")}


def run_peer_epoch(python: Path | str, method: str, cfg: E2EConfig, root: Path, timeout_s: float = 3600) -> dict[str, Any]:
    """:mod:`benchmarks.e2e_peer` in the peer's interpreter; its JSON answer."""
    cmd = [str(python), str(PEER_SCRIPT), "--method", method, "--root", str(root), "--encoder-name", cfg.encoder_name,
           "--image-size", str(cfg.image_size), "--batch-size", str(cfg.batch_size), "--n-local", str(cfg.n_local),
           "--local-size", str(cfg.local_size), "--workers", str(cfg.peer_workers)]  # fmt: skip
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=str(ROOT), capture_output=True, text=True, timeout=timeout_s)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    reply = json.loads(lines[-1]) if lines else {"ok": False, "error": f"exit {res.returncode}, no answer"}
    if not reply.get("ok"):
        raise RuntimeError(f"e2e: the peer's {method} epoch failed: {reply.get('error')}\n{res.stderr[-3000:]}")
    reply["images_per_s"] = round(reply["images"] / max(reply["seconds"], 1e-9), 4)
    reply["wall_s_outside"] = round(time.perf_counter() - t0, 1)
    return reply


@contextmanager
def held(lock: Path | None) -> Iterator[None]:
    """``lock`` (a file) held exclusively for the block (None: nothing)."""
    if lock is None:
        yield
        return
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def compare(ours: dict[str, Any], peer: dict[str, Any], target: float) -> dict[str, Any]:
    """One method's entry: both sides, the images/s ratio and whether it meets ``target``."""
    ratio = ours["images_per_s"] / peer["images_per_s"] if peer["images_per_s"] else None
    return {"project": ours, "peer": peer, "ratio": None if ratio is None else round(ratio, 3), "target": target,
            "met": ratio is not None and ratio >= target}


def run_e2e(cfg: E2EConfig, methods: list[str], work: Path, log: Callable[[str], None] = print,
            peer_python: Path | str | None = None, venv: Path | None = None, lock: Path | None = None) -> dict[str, Any]:
    """The section: per method, one project epoch and one peer epoch, back to back."""
    from benchmarks import peer as P
    from benchmarks.data import image_tree

    methods = [m for m in methods if m in METHODS]
    if not methods:
        raise ValueError(f"e2e: no method to run; the section covers {list(METHODS)}")
    python = peer_python or P.ensure_peer_venv(venv or P.DEFAULT_PEER_VENV, log)
    root = image_tree(cfg.num_images, log, cfg.mean_size)
    teacher = salt_teacher(cfg, work / "e2e-teacher") if "salt" in methods else None
    entries: dict[str, Any] = {}
    for k, name in enumerate(methods):
        workdir = work / f"e2e-{name}"
        workdir.mkdir(parents=True, exist_ok=True)
        spec = project_spec(name, cfg, root, workdir, teacher)
        with held(lock):
            sides: dict[str, dict[str, Any]] = {}
            for side in ("project", "peer") if k % 2 == 0 else ("peer", "project"):
                log(f"[e2e] {name}: {side} epoch")
                sides[side] = (run_project(spec, workdir) if side == "project"
                               else run_peer_epoch(python, name, cfg, root))  # fmt: skip
        entries[name] = compare(sides["project"], sides["peer"], TARGETS[name])
        e = entries[name]
        log(f"[e2e] {name}: project {e['project']['images_per_s']:.2f} img/s, peer {e['peer']['images_per_s']:.2f} "
            f"img/s: {e['ratio']}x (target {e['target']}x: {'met' if e['met'] else 'NOT met'})")  # fmt: skip
    return {"config": {**asdict(cfg), "description": cfg.describe()}, "cores": os.cpu_count(),
            "project_cpus_per_worker": project_spec("mae", cfg, root, work)["scaling"]["cpus_per_worker"],
            "order": "per method: one project epoch and one peer epoch back to back, the first alternating",
            "timing": "from the first step (its batch in hand) to the end of the epoch's last step, both sides",
            "methods": entries}
