"""Every paper-scale recipe (experiments/imagenet, experiments/imagenette, their SALT chains) validates as written, and
two training steps of each run on CPU with small overrides (32 px generated images, depth 1, batch 4) through the
platform's own train step, views, optimiser, schedule and clipping (no Ray)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from tests.conftest import ROOT

RECIPES = sorted(str(p.relative_to(ROOT)) for d in ("imagenet", "imagenette") for p in (ROOT / "experiments" / d).glob("*.yaml"))
CHAINS = ["experiments/chains/salt_imagenet.yaml", "experiments/chains/salt_imagenette.yaml"]


def small_overrides(method: str) -> list[str]:
    """Tiny data and model for a CPU smoke run; the recipe's own heads, masks, views and optimiser stay."""
    out = ["data.name=synthetic", "data.root=null", "data.val_root=null", "data.num_samples=20", "data.batch_size=4",
           "scaling.use_gpu=false", "scaling.num_workers=1"]
    if method == "apl":
        return out + ["method.n_blocks=1"]  # keeps its 96 px input: a 7x7 grid needs it
    small_heads = {
        "simclr": ["method.projector_dims=[64,64,32]"],
        "byol": ["method.projector_dims=[64,32]", "method.predictor_dims=[64,32]"],
        "vicreg": ["method.projector_dims=[64,64,64]"],
        "barlow_twins": ["method.projector_dims=[64,64,64]"],
        "mocov3": ["method.projector_dims=[64,64,32]", "method.predictor_hidden_dim=64"],
        "ijepa": ["method.predictor_depth=1", "method.min_keep=1"],
        "dinov2": ["method.n_cls_prototypes=1024", "method.n_patch_prototypes=1024", "method.image_size=32",
                   "data.multicrop.n_local=2", "data.multicrop.local_size=16"],
    }
    out += small_heads.get(method, [])
    if method in ("simclr", "byol", "vicreg", "barlow_twins"):  # the papers' ResNet-50: any input size, no depth key
        return out + ["data.image_size=32"]
    out += ["data.image_size=32", "method.encoder_kwargs.depth=1", "method.encoder_kwargs.patch_size=8"]
    if method in ("ibot", "data2vec"):
        out += ["method.image_size=32"]
    if method == "data2vec":
        out += ["method.top_k_blocks=1"]
    if method in ("mae", "salt", "data2vec", "mocov3", "ijepa", "dinov2"):
        out += ["method.encoder_kwargs.img_size=32"]
    if method == "dino":
        out += ["data.multicrop.n_local=2", "data.multicrop.local_size=16", "method.n_prototypes=1024"]
    if method == "ibot":
        out += ["method.n_cls_prototypes=1024", "method.n_patch_prototypes=1024"]
    return out


# per-stage extras of the chains (chain overrides apply to every stage, so method-only keys go on their stage)
STAGE_EXTRAS = {"mae": ["method.decoder_depth=1"], "salt": ["method.predictor_depth=1"]}


def two_steps(spec: DictConfig) -> list[float]:
    """Two steps of the platform's own ``ssl_platform.training.trainer.train_step`` (views on the device, hooks, clipping per
    ``optim.clip_mode``, AdamW, lr + weight-decay schedule), on the recipe's method built as the worker builds it."""
    from ssl_platform.training.hooks import StepInfo
    from ssl_platform.training.trainer import local_worker, train_step

    worker, data, training = local_worker(spec)
    method, steps_per_epoch = training.method.train(), data.steps_per_epoch
    before = {n: p.detach().clone() for n, p in method.named_parameters() if p.requires_grad}
    batches = data.train(0)
    generator = torch.Generator().manual_seed(spec.seed)
    losses = []
    for step in range(2):
        training.global_step = step
        info = StepInfo("recipe", 0, 1, step, steps_per_epoch, step)
        # epoch 1: past the first-epoch freezes, as most of a run
        loss, _, skipped = train_step(worker, data, training, next(batches), generator, info, 1.0 + step / steps_per_epoch)
        assert float(skipped) == 0.0
        losses.append(float(loss))
    assert any(not torch.equal(before[n], p) for n, p in method.named_parameters() if n in before)
    return losses


@pytest.mark.parametrize("path", RECIPES)
def test_recipe_validates_and_trains_two_steps(path):
    from ssl_platform.spec import load_spec

    spec = load_spec(ROOT / path)  # as written: the ImageNet/Imagenette paths, GPU scaling, paper settings
    assert spec.data.name == "image_folder" and spec.scaling.use_gpu
    assert "Cost (python -m benchmarks.recipe_cost" in (ROOT / path).read_text()
    small = load_spec(ROOT / path, small_overrides(spec.method.name) + STAGE_EXTRAS.get(spec.method.name, []))
    losses = two_steps(small)
    assert all(math.isfinite(v) for v in losses), losses


@pytest.mark.parametrize("path", CHAINS)
def test_salt_chain_recipe_validates_and_both_stages_train(path, tmp_path):
    from methods import checkpoint_io
    from ssl_platform.launch.chain import load_chain, stage_spec_for
    from ssl_platform.training.trainer import build_method_from_spec

    assert "Cost (python -m benchmarks.recipe_cost" in (ROOT / path).read_text()
    chain = load_chain(ROOT / path)
    assert [s.name for s in chain.stages] == ["stage1", "stage2"]
    written = stage_spec_for(chain.stages[0], {})
    assert written.method.name == "mae" and written.method.mask_type == "multiblock" and written.data.name == "image_folder"

    stage1 = load_chain(ROOT / path, small_overrides("mae")).stages[0]
    stage1.overrides += STAGE_EXTRAS["mae"]
    spec1 = stage_spec_for(stage1, {})
    two_steps(spec1)
    enc = build_method_from_spec(spec1.method)
    teacher = Path(tmp_path) / "stage1"
    checkpoint_io.save_encoder(teacher, "mae", enc.encoder_config(), enc.encoder_state_dict())
    stage2 = load_chain(ROOT / path, small_overrides("salt")).stages[1]
    stage2.overrides += STAGE_EXTRAS["salt"]
    spec2 = stage_spec_for(stage2, {("stage1", "encoder"): str(teacher / "encoder.pt")})
    assert spec2.method.name == "salt"
    assert all(math.isfinite(v) for v in two_steps(spec2))
