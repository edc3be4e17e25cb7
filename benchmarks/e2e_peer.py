"""The peer's side of the ``e2e`` benchmark: one epoch of stable-pretraining over an image folder, through its own
training entry point (``spt.Manager`` + a Lightning ``Trainer``, ``spt.data.DataModule``, torchvision's
``ImageFolder`` wrapped by ``spt.data.FromTorchDataset``, ``spt.data.transforms``), on the CPU.

Run by the peer's interpreter (``.peer-venv/bin/python benchmarks/e2e_peer.py --method dino --root DIR``); it
imports only the peer library, torch, torchvision and lightning. The DataLoader gets the worker count the peer's
docs recommend (``stable_pretraining.data.utils.get_num_workers()``: the CPUs this process may use) unless
``--workers`` says otherwise. A Lightning callback times the epoch from the start of its first step (the first
batch in hand) to the end of its last; the answer is one JSON line on the original stdout (whatever the library
prints goes to stderr).

Views, as the project's ``e2e`` specs draw them: DINO 2 global 224 px crops (scale 0.4-1, bicubic, flip, colour
jitter 0.4/0.4/0.2/0.1 p 0.8, grey 0.2, blur p 1.0 / 0.1, solarisation p 0 / 0.2) + ``n_local`` 96 px crops
(scale 0.05-0.4, blur p 0.5); iBOT the two global crops; MAE and SALT one 224 px crop (scale 0.2-1, bilinear,
flip). Each method at its seed defaults with the given timm backbone (DINO ``dynamic_img_size``; iBOT
``image_size``); AdamW lr 1e-4, weight decay 0.05, the peer's linear-warm-up cosine schedule.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import types
from typing import Any

import torch

METHODS = ("dino", "ibot", "mae", "salt")
PEER_CLASSES = {"dino": "DINO", "ibot": "iBOT", "mae": "MAE", "salt": "SALT"}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def crop_view(size: int, scale: tuple[float, float], *, bicubic: bool, jitter: bool = False, blur_p: float = 0.0,
              solarize_p: float = 0.0):
    """One view's per-sample transform of ``spt.data.transforms`` (PIL image in, normalised tensor out)."""
    from stable_pretraining.data import transforms as T
    from torchvision.transforms import InterpolationMode

    mode = InterpolationMode.BICUBIC if bicubic else InterpolationMode.BILINEAR
    ops = [T.RGB(), T.RandomResizedCrop((size, size), scale=scale, interpolation=mode), T.RandomHorizontalFlip(p=0.5)]
    if jitter:
        ops += [T.ColorJitter(0.4, 0.4, 0.2, 0.1, p=0.8), T.RandomGrayscale(p=0.2)]
    if blur_p > 0:
        ops.append(T.GaussianBlur(kernel_size=(size // 10) | 1, sigma=(0.1, 2.0), p=blur_p))  # ~10% of the view
    if solarize_p > 0:
        ops.append(T.RandomSolarize(threshold=0.5, p=solarize_p))
    ops.append(T.ToImage(mean=IMAGENET_MEAN, std=IMAGENET_STD))
    return T.Compose(*ops)


def method_transform(method: str, image_size: int, n_local: int, local_size: int):
    """The sample transform of ``method`` (multi-view for DINO and iBOT)."""
    from stable_pretraining.data import transforms as T

    if method in ("mae", "salt"):
        return crop_view(image_size, (0.2, 1.0), bicubic=False)
    views = [crop_view(image_size, (0.4, 1.0), bicubic=True, jitter=True, blur_p=1.0),
             crop_view(image_size, (0.4, 1.0), bicubic=True, jitter=True, blur_p=0.1, solarize_p=0.2)]
    if method == "dino":
        views += [crop_view(local_size, (0.05, 0.4), bicubic=True, jitter=True, blur_p=0.5) for _ in range(n_local)]
    return T.MultiViewTransform(views)


def build_module(method: str, encoder_name: str, image_size: int):
    """The peer's method at its seed defaults, with a forward that maps the batch dict onto it."""
    from stable_pretraining import methods as M

    cls = getattr(M, PEER_CLASSES[method])
    if method == "dino":
        module = cls(encoder_name, encoder_kwargs={"dynamic_img_size": True})
    elif method == "ibot":
        module = cls(encoder_name, image_size=image_size)
    else:
        module = cls(encoder_name)

    def forward(self, batch: dict[str, Any], stage: str) -> dict[str, Any]:
        if method in ("mae", "salt"):
            out = cls.forward(self, batch["image"])
        else:
            images = [v["image"] for v in batch["views"]]
            kwargs = {"local_views": images[2:]} if method == "dino" else {}
            out = cls.forward(self, global_views=images[:2], **kwargs)
        self.log(f"{stage}/loss", out.loss, on_step=True, on_epoch=False)
        return {"loss": out.loss}

    module.forward = types.MethodType(forward, module)
    module.optim = {"optimizer": {"type": "AdamW", "lr": 1e-4, "weight_decay": 0.05},
                    "scheduler": {"type": "LinearWarmupCosineAnnealing"}, "interval": "epoch"}
    return module


def epoch_timer():
    """A Lightning callback: the start of the first step and the end of every step (``time.perf_counter``)."""
    import lightning as pl

    class EpochTimer(pl.Callback):
        def __init__(self) -> None:
            self.first: float | None = None
            self.last: float | None = None
            self.steps = 0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if self.first is None:
                self.first = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.steps += 1
            self.last = time.perf_counter()

    return EpochTimer()


def run_epoch(args: argparse.Namespace) -> dict[str, Any]:
    """One epoch through ``spt.Manager``; returns the timing and what ran."""
    import lightning as pl
    import stable_pretraining as spt
    import torchvision
    from stable_pretraining.data.utils import get_num_workers

    workers = args.workers if args.workers >= 0 else get_num_workers()
    dataset = spt.data.FromTorchDataset(
        torchvision.datasets.ImageFolder(args.root), names=["image", "label"],
        transform=method_transform(args.method, args.image_size, args.n_local, args.local_size))
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                         num_workers=workers, persistent_workers=workers > 0)
    timer = epoch_timer()
    trainer = pl.Trainer(max_epochs=1, num_sanity_val_steps=0, logger=False, enable_checkpointing=False, devices=1,
                         accelerator="cpu", enable_progress_bar=False, callbacks=[timer])
    module = build_module(args.method, args.encoder_name, args.image_size)
    t0 = time.perf_counter()
    spt.Manager(trainer=trainer, module=module, data=spt.data.DataModule(train=loader), seed=0)()
    wall = time.perf_counter() - t0
    if timer.first is None or timer.last is None:
        raise RuntimeError("the peer's epoch ran no step")
    from importlib.metadata import version

    return {"ok": True, "steps": timer.steps, "images": timer.steps * args.batch_size,
            "seconds": timer.last - timer.first, "wall_s": wall, "loader_workers": workers,
            "threads": torch.get_num_threads(), "version": version("stable-pretraining"), "torch": torch.__version__,
            "loss": float(trainer.callback_metrics.get("fit/loss", float("nan")))}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", choices=METHODS, required=True)
    ap.add_argument("--root", required=True, help="an ImageFolder tree root/<class>/<image>")
    ap.add_argument("--encoder-name", default="vit_tiny_patch16_224")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--n-local", type=int, default=6)
    ap.add_argument("--local-size", type=int, default=96)
    ap.add_argument("--workers", type=int, default=-1, help="DataLoader workers (default: the peer's get_num_workers())")
    args = ap.parse_args(argv)
    proto_out = os.fdopen(os.dup(1), "w")  # the answer; the library's own output goes to stderr
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        reply = run_epoch(args)
    except Exception as err:  # reported to the driver, which raises with the message
        reply = {"ok": False, "error": f"{type(err).__name__}: {err}"}
    proto_out.write(json.dumps(reply) + "\n")
    proto_out.flush()


if __name__ == "__main__":
    main()
