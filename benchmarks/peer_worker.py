"""One side of the ``peer`` benchmark: builds the SSL methods of one library at the seed defaults and times train
steps on request. Run as a script by the peer's own interpreter (``.peer-venv/bin/python
benchmarks/peer_worker.py --library stable_pretraining``), it serves JSON-line requests on stdin and answers on
its original stdout (anything the library prints goes to stderr); imported by ``benchmarks.peer`` it is the
project's side, so both libraries are built, fed and stepped by the same code.

This file imports only the standard library and torch at module level (it must run in the peer's venv, where
the project is not installed); a library is imported when a method of it is built.

A train step (both libraries): forward on one fixed batch, backward, AdamW (same settings both sides), then the
method's EMA teacher update (the project's ``on_train_step`` / ``before_optimizer_step`` /
``after_optimizer_step`` hooks; the peer's ``TeacherStudentWrapper.update_ema_coefficient`` + ``update_teacher``
on every wrapper, as its ``TeacherStudentCallback`` does after each step).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

LIBRARIES = ("project", "stable_pretraining")
METHODS = ("mae", "data2vec", "dino", "ibot", "salt", "simclr", "byol", "mocov3", "vicreg", "barlow_twins", "ijepa",
           "dinov2")
PEER_CLASSES = {"mae": "MAE", "data2vec": "Data2Vec", "dino": "DINO", "ibot": "iBOT", "salt": "SALT",
                "simclr": "SimCLR", "byol": "BYOL", "mocov3": "MoCov3", "vicreg": "VICReg",
                "barlow_twins": "BarlowTwins", "ijepa": "IJEPA", "dinov2": "DINOv2"}
TWO_VIEW_METHODS = ("simclr", "byol", "mocov3", "vicreg", "barlow_twins")  # forward(view1, view2) in both libraries
MULTICROP_METHODS = ("dino", "dinov2")  # forward(global_views, local_views)
LR, WEIGHT_DECAY = 1e-4, 0.05
TOTAL_STEPS = 100_000  # schedules as early in a long run (EMA momentum ~ its start value)


@dataclass
class PeerConfig:
    """The shared configuration: a timm backbone name, view sizes, batch, precision, DINO's crops."""

    encoder_name: str = "vit_tiny_patch16_224"
    image_size: int = 224
    local_size: int = 96
    n_local: int = 6
    batch_size: int = 16
    device: str = "cpu"
    autocast_bf16: bool = False
    # tests only (the project standing in for the peer): extra constructor kwargs of the project's methods
    tiny_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)

    def describe(self) -> str:
        return (f"{self.encoder_name} at {self.image_size} px, batch {self.batch_size}, "
                f"{'bf16 autocast' if self.autocast_bf16 else 'fp32'} on {self.device}; DINO 2x{self.image_size} + "
                f"{self.n_local}x{self.local_size} crops, iBOT 2x{self.image_size}")  # fmt: skip


def make_inputs(method: str, cfg: PeerConfig, seed: int = 0) -> dict[str, Any]:
    """The fixed batch of ``method`` (standard-normal pixels from a seeded generator: the same in both libraries)."""
    g = torch.Generator().manual_seed(seed)

    def imgs(size: int) -> torch.Tensor:
        return torch.randn(cfg.batch_size, 3, size, size, generator=g)

    if method in MULTICROP_METHODS:
        return {"global_views": [imgs(cfg.image_size) for _ in range(2)],
                "local_views": [imgs(cfg.local_size) for _ in range(cfg.n_local)]}  # fmt: skip
    if method in TWO_VIEW_METHODS:
        return {"view1": imgs(cfg.image_size), "view2": imgs(cfg.image_size)}
    if method == "ibot":
        return {"global_views": [imgs(cfg.image_size) for _ in range(2)]}
    return {"images": imgs(cfg.image_size)}


def to_device(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, list):
        return [to_device(v, device) for v in x]
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    return x


def build_model(library: str, method: str, cfg: PeerConfig) -> torch.nn.Module:
    """``method`` of ``library`` at its seed defaults with ``cfg``'s backbone (DINO: ``dynamic_img_size`` for
    its two crop sizes, which the peer's DINOv2 sets itself; iBOT, data2vec, DINOv2: ``image_size``)."""
    kwargs: dict[str, Any] = {}
    if method == "dino":
        kwargs["encoder_kwargs"] = {"dynamic_img_size": True}
    if method in ("ibot", "data2vec", "dinov2"):
        kwargs["image_size"] = cfg.image_size
    if library == "project":
        from methods.registry import get_method_class

        extra = dict(cfg.tiny_kwargs.get(method, {}))
        if "encoder_kwargs" in extra:
            extra["encoder_kwargs"] = {**kwargs.get("encoder_kwargs", {}), **extra["encoder_kwargs"]}
        return get_method_class(method)(cfg.encoder_name, **{**kwargs, **extra})
    if library == "stable_pretraining":
        if cfg.tiny_kwargs:
            raise ValueError("the tiny configuration is for the project standing in for the peer (tests) only")
        from stable_pretraining import methods as M

        return getattr(M, PEER_CLASSES[method])(cfg.encoder_name, **kwargs)
    raise ValueError(f"library must be one of {LIBRARIES}, got {library!r}")


def ema_wrappers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The peer's EMA teacher wrappers (what its ``TeacherStudentCallback`` updates after every step)."""
    return [m for m in model.modules() if callable(getattr(m, "update_teacher", None)) and hasattr(m, "teacher")]


class Runner:
    """One built method of one library, with its optimiser and fixed batch, stepped on request."""

    def __init__(self, library: str, method: str, cfg: PeerConfig, seed: int = 0):
        self.library, self.method, self.cfg = library, method, cfg
        self.device = torch.device(cfg.device)
        torch.manual_seed(seed)
        self.model = build_model(library, method, cfg).to(self.device)
        self.model.train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        fused = self.device.type in ("cuda", "cpu")
        self.optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, fused=fused)
        self.inputs = to_device(make_inputs(method, cfg, seed), self.device)
        self.wrappers = ema_wrappers(self.model) if library != "project" else []
        self.step_index = 0

    def params_m(self) -> tuple[float, float]:
        ps = list(self.model.parameters())
        return sum(p.numel() for p in ps) / 1e6, sum(p.numel() for p in ps if p.requires_grad) / 1e6

    def step(self) -> torch.Tensor:
        i, m = self.step_index, self.model
        epoch = 1.0 + i / 1000.0  # past the first epoch (DINO/iBOT's frozen prototypes), as in most of a run
        if self.library == "project":
            m.on_train_step(i, TOTAL_STEPS, epoch)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.autocast_bf16):
            out = m(**self.inputs)
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        if self.library == "project":
            m.before_optimizer_step(epoch)
        self.optimizer.step()
        if self.library == "project":
            m.after_optimizer_step()
        else:
            with torch.no_grad():
                for w in self.wrappers:
                    if callable(getattr(w, "update_ema_coefficient", None)):
                        w.update_ema_coefficient(1, 100)
                    w.update_teacher()
        self.step_index += 1
        return out.loss.detach()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def timed(self, n: int) -> tuple[float, float]:
        """``(seconds per step, last loss)`` of ``n`` steps, device synchronised before and after."""
        self.sync()
        t0 = time.perf_counter()
        for _ in range(n):
            loss = self.step()
        self.sync()
        return (time.perf_counter() - t0) / n, float(loss)

    def flops(self) -> int:
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            self.step()
        return int(counter.get_total_flops())


def library_version(library: str) -> str | None:
    if library == "stable_pretraining":
        from importlib.metadata import version

        return version("stable-pretraining")
    return None


def serve(library: str, proto_out, requests) -> None:
    """JSON-line server: ``{"op": "hello"|"build"|"steps"|"flops"|"drop"|"quit", ...}`` -> one JSON line each."""
    runners: dict[str, Runner] = {}
    cfg = PeerConfig()
    for line in requests:
        if not line.strip():
            continue
        req = json.loads(line)
        op = req.get("op")
        try:
            if op == "hello":
                torch.set_num_threads(int(req["threads"]))
                cfg = PeerConfig(**req["config"])
                reply = {"ok": True, "library": library, "version": library_version(library), "torch": torch.__version__,
                         "python": sys.version.split()[0], "threads": torch.get_num_threads()}  # fmt: skip
            elif op == "build":
                r = runners[req["method"]] = Runner(library, req["method"], cfg, int(req.get("seed", 0)))
                total, trainable = r.params_m()
                reply = {"ok": True, "params_total_m": round(total, 3), "params_trainable_m": round(trainable, 3)}
            elif op == "steps":
                seconds, loss = runners[req["method"]].timed(int(req["n"]))
                reply = {"ok": True, "seconds": seconds, "loss": loss}
            elif op == "flops":
                reply = {"ok": True, "flops": runners[req["method"]].flops()}
            elif op == "drop":
                runners.pop(req["method"], None)
                reply = {"ok": True}
            elif op == "quit":
                proto_out.write(json.dumps({"ok": True}) + "\n")
                proto_out.flush()
                return
            else:
                reply = {"ok": False, "error": f"unknown op {op!r}"}
        except Exception as err:  # reported to the driver, which raises with the message
            reply = {"ok": False, "error": f"{type(err).__name__}: {err}"}
        proto_out.write(json.dumps(reply) + "\n")
        proto_out.flush()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--library", choices=LIBRARIES, required=True)
    ap.add_argument("--project-root", type=Path, default=None, help="import the project's methods from here")
    args = ap.parse_args(argv)
    if args.project_root is not None:
        sys.path.insert(0, str(args.project_root))
    # answers go to the original stdout; whatever the library prints (even from C) goes to stderr
    proto_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    serve(args.library, proto_out, sys.stdin)


if __name__ == "__main__":
    main()
