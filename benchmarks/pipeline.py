"""Data pipeline: views/s of the per-sample view generation + collation (multi-crop for DINO, global views for
iBOT, one view for MAE / SALT / data2vec / APL) through a ``DataLoader`` as the platform builds it
(``num_workers`` from the specs: 0, i.e. in the training process), and masks/s of the mask generators (run
inside the methods' forward, on the device). With the model's images/s from ``steps`` it tells whether the
loader or the model bounds a step.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from benchmarks.common import (
    BenchConfig,
    in_python_thread,
    method_spec,
    paired_ratio,
    summarize,
    sync,
    timed,
    train_split,
    usable_cores,
)

VIEW_KINDS = {"multicrop": "dino", "global_views": "ibot", "images": "mae"}
METHOD_VIEW_KIND = {"dino": "multicrop", "ibot": "global_views", "mae": "images", "salt": "images",
                    "data2vec": "images", "apl": "images"}  # fmt: skip


def _interleaved_loader_rates(variants: dict[str, tuple[Any, int, bool]], n: int, repeats: int) -> dict[str, list[float]]:
    """Images/s of ``DataLoader`` batches of ``n`` per variant ``name -> (dataset, torch threads, in a Python
    thread)``; one batch of every variant per round (after one warm-up round), so drifts affect all alike."""
    fetchers = {}
    for name, (ds, _, _) in variants.items():
        loader = DataLoader(ds, batch_size=n, shuffle=True, num_workers=0, drop_last=True,
                            generator=torch.Generator().manual_seed(0))  # fmt: skip
        fetchers[name] = _cycle(loader)
    rates: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(repeats + 1):
        for name, (_, threads, side) in variants.items():

            def fetch(name=name, threads=threads):
                previous = torch.get_num_threads()
                torch.set_num_threads(threads)
                try:
                    return next(fetchers[name])
                finally:
                    torch.set_num_threads(previous)

            dt = timed((lambda f=fetch: in_python_thread(f)) if side else fetch, 1, "cpu")
            if r > 0:
                rates[name].append(n / dt)
    return rates


def _cycle(loader):
    while True:
        yield from loader


def run_pipeline(
    cfg: BenchConfig,
    workdir: Path,
    repeats: int,
    samples_per_call: int,
    model_images_per_s: dict[str, float] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    from benchmarks.per_sample_views import ViewDataset, build_view_transform
    from methods import vit as V
    from methods.masks import MultiBlockMaskGenerator
    from methods.registry import get_method_class

    n = min(samples_per_call, cfg.batch_size)
    cores = usable_cores()
    views: dict[str, Any] = {}
    for kind, method in VIEW_KINDS.items():
        spec = method_spec(method, cfg)
        split = train_split(spec)
        declared = get_method_class(method).training_views(spec.data)
        tf = build_view_transform(get_method_class(method), spec.data)
        vpi = sum(len(group.recipes) for group in declared.values())
        entry: dict[str, Any] = {"method": method, "views_per_image": int(vpi), "samples_per_batch": n}
        # ViewDataset as the platform builds it (transform_threads=None: the process's threads, the usable cores)
        # against transform_threads=1 (1 torch thread while augmenting a batch), each in a Python thread (as
        # train_loop_per_worker runs in a Ray Train worker) and in the main thread (a plain script)
        variants = {
            "platform": (None, True), "platform_1_thread": (1, True),
            "main_n_threads": (None, False), "main_1_thread": (1, False),
        }  # fmt: skip
        rates = _interleaved_loader_rates(
            {name: (ViewDataset(split, tf, transform_threads=t), cores, side) for name, (t, side) in variants.items()},
            n, repeats,
        )  # fmt: skip
        for name, (t, side) in variants.items():
            entry[name] = {"images_per_s": summarize(rates[name]), "views_per_s": summarize([r * vpi for r in rates[name]]),
                           "transform_threads": t or cores, "python_thread": side}  # fmt: skip
        entry["one_thread_speedup_python_thread"] = paired_ratio(rates["platform_1_thread"], rates["platform"])
        entry["one_thread_speedup_main_thread"] = paired_ratio(rates["main_1_thread"], rates["main_n_threads"])
        log(f"[pipeline] {kind}: images/s with 1 / {cores} augmentation threads: "
            f"{entry['platform_1_thread']['images_per_s']['median']:.0f} / {entry['platform']['images_per_s']['median']:.0f} "
            f"(Python thread, as in a Ray worker), {entry['main_1_thread']['images_per_s']['median']:.0f} / "
            f"{entry['main_n_threads']['images_per_s']['median']:.0f} (main thread)")
        views[kind] = entry

    device = torch.device(cfg.device)
    patch = cfg.encoder_kwargs["patch_size"]
    grid = (cfg.image_size // patch, cfg.image_size // patch)
    npatch = grid[0] * grid[1]
    b = cfg.batch_size
    salt_masks = method_spec("salt", cfg, teacher="unused").method
    gen = MultiBlockMaskGenerator(
        grid, num_targets=salt_masks.num_targets, context_scale=tuple(salt_masks.context_scale),
        target_scale=tuple(salt_masks.target_scale), context_aspect_ratio=tuple(salt_masks.context_aspect_ratio),
        target_aspect_ratio=tuple(salt_masks.target_aspect_ratio),
    )  # fmt: skip
    mask_fns = {
        "multiblock (salt)": lambda: gen(b, device=device),
        "random 0.75 (mae)": lambda: V.random_masking(b, npatch, 0.75, device),
        "random 0.6 (data2vec)": lambda: V.random_masking(b, npatch, 0.6, device),
        "random 0.3 x2 views (ibot)": lambda: V.random_masking(2 * b, npatch, 0.3, device),
    }
    masks: dict[str, Any] = {}
    calls = 20
    for name, fn in mask_fns.items():
        fn()
        sync(device)
        rates = [b * calls / timed(fn, calls, device) for _ in range(repeats)]
        masks[name] = {"images_per_s": summarize(rates), "grid": list(grid), "batch": b}
        log(f"[pipeline] masks {name}: {masks[name]['images_per_s']['median']:.0f} images/s")

    bound: dict[str, Any] = {}
    for method, rate in (model_images_per_s or {}).items():
        kind = METHOD_VIEW_KIND.get(method)
        if kind not in views or not rate:
            continue
        loader = views[kind]["platform"]["images_per_s"]["median"]
        # num_workers=0: the loader and the model run one after the other in the training process
        share = (1 / loader) / (1 / loader + 1 / rate)
        bound[method] = {"loader_images_per_s": loader, "model_images_per_s": rate,
                         "loader_share_of_serial_step": round(share, 3),
                         "bound_by": "loader" if loader < rate else "model"}  # fmt: skip
    return {"device": cfg.device, "usable_cores": cores, "views": views, "masks": masks,
            "bound": bound}  # fmt: skip
