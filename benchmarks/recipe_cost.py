"""Expected cost of a recipe in GPU-hours, from counted FLOPs.

``python -m benchmarks.recipe_cost SPEC.yaml --train-images 1281167 [--mfu 0.123 0.35]`` (a chain spec: every stage).

FLOPs of one training step (forward + backward of every view, the teacher's forward, heads and decoders; matmuls,
convolutions and attention, by ``FlopCounterMode`` as :func:`benchmarks.common.count_flops`) are counted on CPU for
``--count-batch`` images of the recipe's own model and views (generated images at ``data.image_size``) and scaled
linearly to the global batch ``data.batch_size``. Steps = ``optim.epochs * floor(train_images / batch)``;
GPU-hours = steps * FLOPs per step / (peak * MFU) / 3600 with the H100 SXM dense bf16 peak (989.4 TFLOP/s). The
default MFUs are the one measured for the method on one H100 (benchmarks/README.md: ViT-S/16, batch 128, bf16) and
0.35, a well-fed large-batch run.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import PEAK_BF16_FLOPS, count_flops

H100_PEAK = dict(PEAK_BF16_FLOPS)["H100"]
MEASURED_H100_MFU = {"mae": 0.023, "dino": 0.123, "ibot": 0.133, "data2vec": 0.107, "salt": 0.035, "apl": 0.064}


def _fresh_teacher(spec, directory: Path) -> str:
    """A stage-1 encoder file of the spec's SALT encoder (random weights: they do not change the FLOPs)."""
    from methods import checkpoint_io
    from methods import vit as V

    kwargs = dict(spec.method.encoder_kwargs or {})
    enc = V.create_vit(spec.method.encoder_name, kwargs)
    checkpoint_io.save_encoder(directory, "mae", {"encoder_name": spec.method.encoder_name, "encoder_kwargs": kwargs},
                               enc.state_dict())
    return str(directory / "encoder.pt")


def step_flops_per_image(spec, count_batch: int = 2) -> float:
    """Counted FLOPs of one training step divided by its batch (the recipe's model and views)."""
    from torch.utils.data import default_collate

    from benchmarks.per_sample_views import ViewDataset, build_view_transform
    from ssl_platform.data.small_sets import make_synthetic_split
    from ssl_platform.training.trainer import build_method_from_spec, seed_everything

    seed_everything(0)
    method = build_method_from_spec(spec.method).train()
    split = make_synthetic_split(max(8, 4 * count_batch), 2, spec.data.image_size, 0.2).train
    ds = ViewDataset(split, build_view_transform(method, spec.data))
    batch = default_collate([ds[i] for i in range(count_batch)])
    method.on_train_step(10, 1000, 5.0)  # past warm-ups: masks and schedules as in most of a run

    def step() -> None:
        method(**batch).loss.backward()

    return count_flops(step) / count_batch


def recipe_cost(spec, train_images: int, mfus: list[float] | None = None, count_batch: int = 2) -> dict[str, Any]:
    per_image = step_flops_per_image(spec, count_batch)
    batch = int(spec.data.batch_size)
    steps = int(spec.optim.epochs) * (train_images // batch)
    total = per_image * batch * steps
    mfus = mfus or [MEASURED_H100_MFU.get(spec.method.name, 0.1), 0.35]
    return {
        "name": spec.name, "method": spec.method.name, "gflop_per_image": per_image / 1e9, "batch": batch, "steps": steps,
        "total_eflop": total / 1e18,
        "gpu_hours": {f"{m:.3f}": total / (H100_PEAK * m) / 3600 for m in mfus},
    }  # fmt: skip


def specs_of(path: str, overrides: list[str]) -> list:
    """The run specs of a run spec or of every stage of a chain (a SALT teacher replaced by a fresh encoder)."""
    from ssl_platform.launch.chain import load_chain, stage_spec_for
    from ssl_platform.spec import load_spec, read_yaml

    if "stages" not in read_yaml(path):
        return [load_spec(path, overrides)]
    chain = load_chain(path, overrides)
    specs, tmp = [], Path(tempfile.mkdtemp(prefix="recipe-cost-"))
    for stage in chain.stages:
        spec = stage_spec_for(stage, {(s.name, "encoder"): str(tmp / "pending") for s in chain.stages})
        if spec.method.name == "salt":
            teacher = _fresh_teacher(spec, tmp / stage.name)
            spec = stage_spec_for(stage, {(s.name, "encoder"): teacher for s in chain.stages})
        specs.append(spec)
    return specs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.recipe_cost", description=__doc__.split("\n\n")[0])
    ap.add_argument("spec", help="a run spec or a chain spec")
    ap.add_argument("--train-images", type=int, required=True, help="training images per epoch (ImageNet-1k: 1281167)")
    ap.add_argument("--mfu", type=float, nargs="*", default=None, help="MFUs to price (default: measured H100 MFU, 0.35)")
    ap.add_argument("--count-batch", type=int, default=2)
    ap.add_argument("overrides", nargs="*", default=[], help="dotlist overrides")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    for spec in specs_of(args.spec, args.overrides):
        c = recipe_cost(spec, args.train_images, args.mfu, args.count_batch)
        hours = ", ".join(f"{h:,.1f} GPU-h at MFU {m}" for m, h in c["gpu_hours"].items())
        print(f"{c['name']} ({c['method']}): {c['gflop_per_image']:.1f} GFLOP/image/step, batch {c['batch']}, "
              f"{c['steps']:,} steps, {c['total_eflop']:.2f} EFLOP: {hours}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
