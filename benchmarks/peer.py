"""``peer`` section: every method's train step against stable-pretraining's (the closest peer library, same seed
APIs), paired round-robin in one run.

The peer runs in its own virtual environment (``.peer-venv/``, created here with ``python -m venv`` and ``pip
install stable-pretraining==0.1.8``; nothing of it enters the project's environment), in a persistent
subprocess (:mod:`benchmarks.peer_worker` run by the peer's interpreter) driven over stdin/stdout. The project's
methods run in this process through the same worker code, so both libraries are built at their seed defaults
with the same backbone, fed the same fixed batch, and stepped the same way (forward, backward, fused AdamW, EMA
teacher update). Per method: build both, warm up both, count the FLOPs of one step of each, then ``repeats``
rounds, each timing one project step and one peer step (which goes first alternates between rounds), with the
same torch threads. Reported: images/s of both, the paired per-round ratio project / peer (median and IQR), the
FLOPs, and the loss of each library's first step on the same inputs (each draws its own initial weights and
masks, so the losses agree in scale only).

``standin=True`` (tests, ``--peer-standin``) runs the project itself in the subprocess in place of the peer: the
protocol, pairing and report are exercised without installing anything.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import ROOT, paired_ratio, summarize
from benchmarks.peer_worker import METHODS, PeerConfig, Runner

PEER_REQUIREMENT = "stable-pretraining==0.1.8"
PEER_LIBRARY = "stable_pretraining"
DEFAULT_PEER_VENV = ROOT / ".peer-venv"
WORKER = Path(__file__).resolve().parent / "peer_worker.py"
TARGET_SPEEDUP = 1.2


def peer_config(device: str, tiny: bool = False) -> PeerConfig:
    """CPU: ViT-tiny/16 at 224 px, batch 16, fp32 (as issue 15 measured); CUDA: ViT-S/16, batch 128, bf16. DINO
    gets 2 global + 6 local 96 px crops, iBOT 2 global views. ``tiny``: a 32-d, depth-1 ViT on 32 px images with
    small heads (tests only; the peer's constructors cannot take it, so only with the stand-in)."""
    if tiny:
        enc = {"img_size": 32, "patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2}
        heads = {"projector_hidden_dim": 32, "projector_bottleneck_dim": 16}
        return PeerConfig(
            encoder_name="vit_tiny_patch16_224", image_size=32, local_size=16, n_local=2, batch_size=2, device=device,
            tiny_kwargs={
                "mae": {"encoder_kwargs": enc, "decoder_embed_dim": 32, "decoder_depth": 1, "decoder_num_heads": 2},
                "data2vec": {"encoder_kwargs": enc, "top_k_blocks": 1},
                "dino": {"encoder_kwargs": enc, "n_prototypes": 64, **heads},
                "ibot": {"encoder_kwargs": enc, "n_cls_prototypes": 64, "n_patch_prototypes": 32, **heads},
                "salt": {"encoder_kwargs": enc, "predictor_embed_dim": 32, "predictor_depth": 1, "predictor_num_heads": 2},
                "simclr": {"encoder_kwargs": enc, "projector_dims": (32, 32, 16)},
                "byol": {"encoder_kwargs": enc, "projector_dims": (32, 16), "predictor_dims": (32, 16)},
                "mocov3": {"encoder_kwargs": enc, "projector_dims": (32, 32, 16), "predictor_hidden_dim": 32},
                "vicreg": {"encoder_kwargs": enc, "projector_dims": (32, 32, 32)},
                "barlow_twins": {"encoder_kwargs": enc, "projector_dims": (32, 32, 32)},
                "ijepa": {"encoder_kwargs": enc, "predictor_embed_dim": 32, "predictor_depth": 1, "predictor_num_heads": 2,
                          "min_keep": 4},
                "dinov2": {"encoder_kwargs": enc, "n_cls_prototypes": 64, "n_patch_prototypes": 32, **heads},
            },
        )  # fmt: skip
    if device == "cuda":
        return PeerConfig(encoder_name="vit_small_patch16_224", batch_size=128, device=device, autocast_bf16=True)
    return PeerConfig(encoder_name="vit_tiny_patch16_224", batch_size=16, device=device)


def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")


def ensure_peer_venv(venv: Path, log: Callable[[str], None] = print) -> Path:
    """The peer's interpreter in ``venv``, created (``python -m venv`` + ``pip install stable-pretraining==0.1.8``)
    when it is missing or cannot import the peer. The project's environment is not touched."""
    python = venv_python(venv)
    check = [str(python), "-c", "import stable_pretraining.methods"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    log(f"[peer] creating {venv} with {PEER_REQUIREMENT} (a few minutes)")
    base = getattr(sys, "_base_executable", None) or sys.executable
    for cmd in ([base, "-m", "venv", str(venv)], [str(python), "-m", "pip", "install", "-q", PEER_REQUIREMENT]):
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"peer venv: `{' '.join(cmd)}` failed (exit {res.returncode}):\n{res.stderr[-3000:]}")
    res = subprocess.run(check, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"peer venv {venv}: stable_pretraining does not import after installing:\n{res.stderr[-3000:]}")
    return python


class PeerProcess:
    """The peer's side: :mod:`benchmarks.peer_worker` in a subprocess, one JSON line per request and answer."""

    def __init__(self, python: Path | str, library: str, threads: int, cfg: PeerConfig):
        cmd = [str(python), str(WORKER), "--library", library]
        if library == "project":
            cmd += ["--project-root", str(ROOT)]
        self.stderr_path = Path(f"/tmp/bench-peer-worker-{time.time_ns()}.log")
        self._stderr = self.stderr_path.open("w")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
                                     text=True, bufsize=1, cwd=str(ROOT))  # fmt: skip
        self.info = self.request({"op": "hello", "threads": threads, "config": asdict(cfg)})

    def request(self, req: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            self._stderr.flush()
            tail = self.stderr_path.read_text()[-3000:]
            raise RuntimeError(f"peer worker exited (code {self.proc.poll()}) on {req['op']!r}; its stderr:\n{tail}")
        reply = json.loads(line)
        if not reply.get("ok"):
            raise RuntimeError(f"peer worker: {req['op']!r} failed: {reply.get('error')}")
        return reply

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.request({"op": "quit"})
                self.proc.wait(timeout=30)
        except (RuntimeError, OSError, subprocess.TimeoutExpired):
            self.proc.kill()
        finally:
            self._stderr.close()
            self.stderr_path.unlink(missing_ok=True)


def run_peer(
    cfg: PeerConfig,
    methods: list[str],
    warmup: int,
    repeats: int,
    log: Callable[[str], None] = print,
    peer_python: Path | str | None = None,
    venv: Path = DEFAULT_PEER_VENV,
    standin: bool = False,
) -> dict[str, Any]:
    methods = [m for m in methods if m in METHODS]
    if not methods:
        raise ValueError(f"peer: no method to compare; the peer implements {list(METHODS)}")
    if cfg.tiny_kwargs and not standin:
        raise ValueError("peer: the tiny configuration runs only with the stand-in (--peer-standin)")
    threads = torch.get_num_threads()
    if standin:
        python, library = sys.executable, "project"
    else:
        python, library = (peer_python or ensure_peer_venv(venv, log)), PEER_LIBRARY
    peer = PeerProcess(python, library, threads, cfg)
    log(f"[peer] {library} {peer.info.get('version')} (torch {peer.info['torch']}, {peer.info['threads']} threads) "
        f"vs the project (torch {torch.__version__}, {threads} threads): {cfg.describe()}")  # fmt: skip
    entries: dict[str, Any] = {}
    try:
        for name in methods:
            entries[name] = _compare(name, cfg, peer, warmup, repeats, log)
    finally:
        peer.close()
    return {
        "config": {**asdict(cfg), "description": cfg.describe()},
        "peer": {"library": library, "requirement": None if standin else PEER_REQUIREMENT, "standin": standin,
                 "version": peer.info.get("version"), "torch": peer.info["torch"], "python": peer.info["python"]},  # fmt: skip
        "project_torch": torch.__version__,
        "threads": threads,
        "warmup_steps": warmup,
        "repeats": repeats,
        "order": "per method: rounds of one project step (in this process) and one peer step (its subprocess), "
        "the first of the two alternating; ratios paired per round",
        "target_speedup": TARGET_SPEEDUP,
        "methods": entries,
    }


def _compare(name: str, cfg: PeerConfig, peer: PeerProcess, warmup: int, repeats: int, log) -> dict[str, Any]:
    ours = Runner("project", name, cfg)
    built = peer.request({"op": "build", "method": name})
    first_ours = float(ours.step())
    first_peer = peer.request({"op": "steps", "method": name, "n": 1})["loss"]
    for _ in range(max(warmup - 1, 0)):
        ours.step()
    if warmup > 1:
        peer.request({"op": "steps", "method": name, "n": warmup - 1})
    flops_ours, flops_peer = ours.flops(), peer.request({"op": "flops", "method": name})["flops"]
    ours_s: list[float] = []
    peer_s: list[float] = []
    for r in range(repeats):
        for side in ("project", "peer") if r % 2 == 0 else ("peer", "project"):
            if side == "project":
                ours_s.append(ours.timed(1)[0])
            else:
                peer_s.append(peer.request({"op": "steps", "method": name, "n": 1})["seconds"])
        log(f"[peer] {name} round {r + 1}/{repeats}: project {ours_s[-1]:.3f}s, peer {peer_s[-1]:.3f}s")
    peer.request({"op": "drop", "method": name})
    _, trainable = ours.params_m()
    b = cfg.batch_size
    speedup = paired_ratio(peer_s, ours_s)  # images/s ratio = inverse time ratio
    log(f"[peer] {name}: project / peer images/s {speedup['median']:.2f}x [{speedup['q1']:.2f}, {speedup['q3']:.2f}], "
        f"GFLOP/step {flops_ours / 1e9:.1f} vs {flops_peer / 1e9:.1f}")  # fmt: skip
    return {
        "project": {"step_s": summarize(ours_s), "images_per_s": summarize([b / s for s in ours_s]),
                    "flops_per_step": flops_ours, "first_step_loss": round(first_ours, 5),
                    "params_trainable_m": round(trainable, 3)},
        "peer": {"step_s": summarize(peer_s), "images_per_s": summarize([b / s for s in peer_s]),
                 "flops_per_step": flops_peer, "first_step_loss": round(first_peer, 5),
                 "params_trainable_m": built["params_trainable_m"]},
        "speedup": speedup,
        "flops_ratio": round(flops_peer / flops_ours, 4) if flops_ours else None,
    }  # fmt: skip
