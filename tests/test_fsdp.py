"""``scaling.strategy: fsdp`` (FSDP2 on CPU with gloo): the same training as DDP, checkpoints that load across
strategies and world sizes, and a real 2-worker FSDP run through Ray (kNN, a killed worker, export)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

from methods.checkpoint_io import load_encoder_file
from ssl_platform.spec import spec_from_dict
from ssl_platform.storage.training_checkpoints import (
    latest_complete_checkpoint,
    list_checkpoints,
    load_training_checkpoint,
    write_training_checkpoint,
)
from ssl_platform.training.hooks import StepInfo
from ssl_platform.training.sharding import full_model_state, is_sharded, load_full_state
from ssl_platform.training.trainer import (
    LoopConfig,
    Worker,
    _full_states,
    build_training,
    local_worker,
    setup_data,
    train_step,
)
from tests.conftest import ROOT, TINY_VIT, tiny_spec_dict

DINO = {"name": "dino", "encoder_name": "vit_tiny_patch16_224", "encoder_kwargs": {**TINY_VIT, "depth": 2},
        "projector_hidden_dim": 32, "projector_bottleneck_dim": 16, "n_prototypes": 64,
        "warmup_epochs_temperature_teacher": 0, "ema_decay_start": 0.9}


def _dino_spec(tmp: str, strategy: str) -> dict:
    raw = tiny_spec_dict(Path(tmp), data={"multicrop": {"n_global": 2, "n_local": 2, "local_size": 8}},
                         optim={"clip_mode": "per_param", "clip_grad": 0.5, "warmup_epochs": 0},
                         scaling={"num_workers": 2, "strategy": strategy})
    raw["method"] = dict(DINO)
    return raw


def _training(tmp: str, strategy: str, rank: int):
    spec = spec_from_dict(_dino_spec(tmp, strategy))
    worker = Worker(spec, LoopConfig(spec={}, run_name="t"), rank, 2, torch.device("cpu"), None)
    data = setup_data(worker)
    training = build_training(worker, data)
    if strategy == "ddp":
        training.model = torch.nn.parallel.DistributedDataParallel(training.method)
    return worker, data, training


def _steps(worker, data, training, n: int) -> None:
    torch.manual_seed(worker.rank)  # each strategy's steps draw the same random numbers
    for i, batch in zip(range(n), data.train(0)):
        train_step(worker, data, training, batch, torch.Generator().manual_seed(i), StepInfo("t", worker.rank, 0, i, 4, i), 1.0 + i)
        training.global_step += 1


def _ranks(rank: int, port: int, tmp: str) -> None:
    """Both strategies train DINO (heads, EMA teacher, per-parameter clipping, fused AdamW) for 2 steps on the same
    per-rank batches; then each checkpoint is loaded by the other strategy."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    runs = {s: _training(tmp, s, rank) for s in ("ddp", "fsdp")}
    assert is_sharded(runs["fsdp"][2].method) and not is_sharded(runs["ddp"][2].method)
    for worker, data, training in runs.values():
        _steps(worker, data, training, 2)
    states = {s: _full_states(w, t) for s, (w, _, t) in runs.items()}
    for s, (worker, _, training) in runs.items():
        if rank == 0:
            write_training_checkpoint(Path(tmp) / s, method=training.method, optimizer=training.optimizer,
                                      scheduler=training.scheduler, spec=worker.spec,
                                      state={"epoch": 1, "global_step": 2}, **states[s])
    dist.barrier()
    for source, target in (("fsdp", "ddp"), ("ddp", "fsdp")):  # each checkpoint into a fresh run of the other
        worker, data, training = _training(tmp, target, rank)
        loaded = load_training_checkpoint(Path(tmp) / source)
        load_full_state(training.method, training.optimizer, loaded["model"], loaded["optimizer"])
        again = _full_states(worker, training)
        if rank == 0:
            torch.save(again, Path(tmp) / f"{source}-into-{target}.pt")
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _close(a: dict, b: dict, what: str, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=atol, msg=f"{what}: {k}")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_fsdp_trains_as_ddp_and_checkpoints_load_across_strategies_and_world_sizes(tmp_path):
    mp.spawn(_ranks, args=(_free_port(), str(tmp_path)), nprocs=2)
    ddp, fsdp = (load_training_checkpoint(tmp_path / s) for s in ("ddp", "fsdp"))
    # same weights (student, EMA teacher, heads) and AdamW moments after 2 steps
    _close(ddp["model"], fsdp["model"], "model")
    assert any("teacher" in k for k in fsdp["model"]) and any("head" in k for k in fsdp["model"])
    for name, s in fsdp["optimizer"]["state"].items():
        _close(s, ddp["optimizer"]["state"][name], f"optimizer {name}")
    enc = load_encoder_file(tmp_path / "fsdp")  # the exported encoder: a plain timm state dict
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, **DINO["encoder_kwargs"])
    vit.load_state_dict(enc["state_dict"], strict=True)
    _close(enc["state_dict"], load_encoder_file(tmp_path / "ddp")["state_dict"], "encoder")
    for source, target in (("fsdp", "ddp"), ("ddp", "fsdp")):  # reloaded by the other strategy: unchanged
        again = torch.load(tmp_path / f"{source}-into-{target}.pt", weights_only=False)
        _close(again["model_state"], (fsdp if source == "fsdp" else ddp)["model"], f"{source} -> {target}", atol=0)
    # a 2-worker FSDP checkpoint into a one-process run (another world size), then one more step
    worker, data, training = local_worker(spec_from_dict(_dino_spec(str(tmp_path), "ddp")))
    load_full_state(training.method, training.optimizer, fsdp["model"], fsdp["optimizer"])
    _close(full_model_state(training.method), fsdp["model"], "world 2 -> 1", atol=0)
    assert all(int(s["step"]) == 2 for s in training.optimizer.state.values())


# ---- through Ray and the command line ---------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_fsdp_run_survives_a_killed_worker_and_exports_a_timm_encoder(ray_session, tmp_path, capfd):
    from ssl_platform.launch.run import run_experiment
    from tests.fault_hooks import KillWorkerOnce

    # MAE on digits at 16 px, mean-pooled: kNN 0.50 at random init, 0.57-0.64 after 1-3 epochs (one process)
    raw = tiny_spec_dict(tmp_path, data={"name": "digits", "image_size": 16, "batch_size": 32,
                                         "augment": {"crop_scale": [0.6, 1.0], "hflip": False}},
                         optim={"epochs": 3, "warmup_epochs": 0.5, "lr": 1e-3},
                         scaling={"num_workers": 2, "strategy": "fsdp", "max_failures": 2})
    raw["method"].update(encoder_kwargs={**TINY_VIT, "embed_dim": 64, "depth": 2, "global_pool": "avg"},
                         norm_pix_loss=False)
    spec = spec_from_dict(raw)
    name = f"fsdp-{uuid.uuid4().hex[:8]}"
    res = run_experiment(spec, run_name=name, step_hooks=[KillWorkerOnce(epoch=2, rank=1)])
    out, err = capfd.readouterr()
    assert "[fault] rank 1 exits during epoch 2" in out + err
    assert "resumed from checkpoint at epoch 1" in out + err
    assert res.metrics["epoch"] == 3
    assert res.metrics["knn_top1"] > res.metrics["knn_top1_random_init"], res.metrics
    run_dir = Path(spec.checkpoint.uri) / name
    last = load_training_checkpoint(latest_complete_checkpoint(run_dir))
    assert last["state"]["epoch"] == 3 and len(list_checkpoints(run_dir)) == 2
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, **raw["method"]["encoder_kwargs"])
    vit.load_state_dict(load_encoder_file(latest_complete_checkpoint(run_dir))["state_dict"], strict=True)


def test_cli_fsdp_with_one_worker_says_it_shards_nothing_and_bad_accumulation_is_refused(tmp_path):
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(tiny_spec_dict(tmp_path)))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": ""}
    proc = subprocess.run([sys.executable, "-m", "ssl_platform", "run", str(spec_file), "scaling.strategy=fsdp",
                           "optim.accumulation_steps=3"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    assert "scaling.strategy: fsdp with scaling.num_workers=1 shards nothing" in proc.stdout + proc.stderr
    assert "optim.accumulation_steps" in proc.stderr and "16" in proc.stderr
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr
