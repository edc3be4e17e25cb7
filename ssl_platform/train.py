"""Ray Train (V2) ``TorchTrainer`` built from a spec, and its thin ``train_loop_per_worker``.

Each worker builds the method from the registry, its views from ``data.py``, AdamW + warm-up/cosine, and
loops: schedules hook -> forward (bf16 autocast on CUDA) -> backward -> method hook -> clip -> step -> EMA
hook. Every epoch all ranks call ``ray.train.report`` (a barrier); rank 0 attaches a checkpoint every
``checkpoint.every_epochs`` and on the last epoch, and logs to MLflow. A restarted or resumed run continues
from ``ray.train.get_checkpoint()`` at the next epoch, with its LR schedule, EMA state and MLflow run.
"""

from __future__ import annotations

import math
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/Inf: the run stops, the last good checkpoint stays as it is."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def build_method_from_spec(spec: DictConfig):
    from methods.registry import build_method
    from ssl_platform.spec import method_kwargs

    return build_method(spec.method.name, **method_kwargs(spec))


def _batch_size_per_worker(spec: DictConfig, world_size: int, n_train: int) -> int:
    per_worker = max(1, spec.data.batch_size // world_size)
    shard = n_train // world_size
    if shard < per_worker:
        raise ValueError(
            f"data.batch_size: expected at most {shard * world_size} (the training split has {n_train} images over "
            f"{world_size} workers), got {spec.data.batch_size}"
        )
    return per_worker


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch
    from torch.utils.data import DataLoader

    from ssl_platform import tracking
    from ssl_platform.data import ViewDataset, build_view_transform, eval_tensors, load_split
    from ssl_platform.evaluation import embed_images, knn_top1, linear_probe_top1
    from ssl_platform.storage import load_training_checkpoint, write_training_checkpoint

    spec = OmegaConf.create(config["spec"])
    run_id: str | None = config.get("mlflow_run_id")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    if threads > 0:
        torch.set_num_threads(threads)
    is_cuda = device.type == "cuda"
    autocast_dtype = torch.bfloat16 if (is_cuda and spec.scaling.precision == "bf16") else None

    seed_everything(spec.seed)  # identical initial weights on every rank
    from ssl_platform.s3 import localize_method_checkpoints

    method = build_method_from_spec(localize_method_checkpoints(spec, config.get("s3_filesystem")))  # s3:// teacher
    split = load_split(spec.data)
    train_ds = ViewDataset(split.train, build_view_transform(method.view_kind, spec.data))
    per_worker = _batch_size_per_worker(spec, world, len(train_ds))
    seed_everything(spec.seed + 1000 * rank)  # different augmentations / masks per rank
    loader = DataLoader(
        train_ds, batch_size=per_worker, shuffle=True, drop_last=True, num_workers=spec.data.num_workers,
        pin_memory=is_cuda, persistent_workers=spec.data.num_workers > 0,
        generator=torch.Generator().manual_seed(spec.seed + rank),
    )
    loader = ray.train.torch.prepare_data_loader(loader, move_to_device=False)
    steps_per_epoch = len(loader)
    total_steps = spec.optim.epochs * steps_per_epoch

    from ssl_platform.optim import build_optimizer, build_scheduler

    method.to(device)
    optimizer = build_optimizer(method, spec.optim, device)
    scheduler = build_scheduler(optimizer, spec.optim, steps_per_epoch)

    start_epoch, global_step, state_extra = 0, 0, {}
    checkpoint = ray.train.get_checkpoint()
    resume_dir = config.get("resume_from")
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            loaded = load_training_checkpoint(d)
    elif resume_dir:
        loaded = load_training_checkpoint(resume_dir)
    else:
        loaded = _persisted_checkpoint_of_this_run(config, rank)
    if loaded is not None:
        from methods.checkpoint_io import load_state_dict_strict

        load_state_dict_strict(method, loaded["model"], f"training checkpoint ({loaded['manifest'].get('method')!r} -> {spec.method.name!r})")
        optimizer.load_state_dict(loaded["optimizer"])
        scheduler.load_state_dict(loaded["scheduler"])
        start_epoch = int(loaded["state"]["epoch"])
        global_step = int(loaded["state"]["global_step"])
        state_extra = {k: v for k, v in loaded["state"].items() if k.startswith("baseline_")}
        if rank == 0:
            print(f"[ssl_platform] resumed from checkpoint at epoch {start_epoch} (step {global_step})", flush=True)

    eval_images = None
    knn_cfg = spec.eval.knn
    if rank == 0 and knn_cfg.enabled:
        eval_images = (eval_tensors(split.train), eval_tensors(split.test))

    def evaluate(model, final: bool) -> dict[str, float]:
        tr = embed_images(model, eval_images[0], device=device)
        te = embed_images(model, eval_images[1], device=device)
        out = {"knn_top1": knn_top1(tr, split.train.labels, te, split.test.labels, knn_cfg.k, knn_cfg.temperature, split.num_classes)}
        if final and spec.eval.linear.enabled:
            lin = spec.eval.linear
            out["linear_top1"] = linear_probe_top1(tr, split.train.labels, te, split.test.labels, lin.epochs, lin.lr, spec.seed)
        return out

    if rank == 0 and knn_cfg.enabled and spec.eval.random_init_baseline and "baseline_knn_top1" not in state_extra:
        # the same encoder at random init, same split
        baseline = evaluate(method, final=True)
        state_extra.update({f"baseline_{k}": v for k, v in baseline.items()})
        if run_id:
            tracking.log_metrics(spec.tracking.uri, run_id, {f"{k}_random_init": v for k, v in baseline.items()}, 0)

    if spec.scaling.compile:
        method_for_step = torch.compile(method)
    else:
        method_for_step = method
    model = ray.train.torch.prepare_model(method_for_step, move_to_device=False)
    core = method

    fault = spec.fault
    skips = 0
    last_metrics: dict[str, float] = {}
    for epoch in range(start_epoch, spec.optim.epochs):
        if world > 1 and hasattr(loader, "sampler") and hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        model.train()
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        n_steps = 0
        extra_sums: dict[str, float] = {}
        log_every = max(1, steps_per_epoch // 4)
        for i, batch in enumerate(loader):
            _maybe_kill(fault, rank, epoch, i, steps_per_epoch, config)
            batch = to_device(batch, device)
            core.on_train_step(global_step, total_steps, epoch + i / steps_per_epoch)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                out = model(**batch)
            loss = out.loss
            if fault.nan_at_step >= 0 and global_step == fault.nan_at_step:
                loss = loss * float("nan")
            if not torch.isfinite(loss.detach()):
                skips += 1
                if skips > fault.max_nonfinite_skips:
                    raise NonFiniteLossError(
                        f"non-finite loss ({float(loss.detach())}) at step {global_step} (epoch {epoch + 1}) of method "
                        f"{spec.method.name!r}; the last complete checkpoint is kept"
                    )
                optimizer.zero_grad(set_to_none=True)
                global_step += 1
                continue
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            core.before_optimizer_step(epoch + i / steps_per_epoch)
            if spec.optim.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(method.parameters(), spec.optim.clip_grad)
            optimizer.step()
            scheduler.step()
            core.after_optimizer_step()
            global_step += 1
            n_steps += 1
            loss_sum += loss.detach().float()
            for k, v in out.metrics().items():
                extra_sums[k] = extra_sums.get(k, 0.0) + v
            if rank == 0 and ((i + 1) % log_every == 0 or i + 1 == steps_per_epoch):
                print(
                    f"[{spec.name}] epoch {epoch + 1}/{spec.optim.epochs} step {i + 1}/{steps_per_epoch} "
                    f"loss {float(loss.detach()):.4f} lr {scheduler.get_last_lr()[0]:.2e}",
                    flush=True,
                )
        elapsed = time.perf_counter() - t0
        mean_loss = _all_reduce_mean(loss_sum / max(1, n_steps), world)
        metrics: dict[str, float] = {
            "epoch": epoch + 1,
            "loss": float(mean_loss),
            "lr": float(scheduler.get_last_lr()[0]),
            "global_step": global_step,
            "epoch_time_s": elapsed,
            "images_per_sec": n_steps * per_worker * world / max(elapsed, 1e-9),
            "nonfinite_skipped": skips,
        }
        metrics.update({k: v / max(1, n_steps) for k, v in extra_sums.items()})
        metrics.update(core.schedule_state())
        last_epoch = epoch + 1 == spec.optim.epochs
        if rank == 0 and knn_cfg.enabled and (last_epoch or (knn_cfg.every_epochs and (epoch + 1) % knn_cfg.every_epochs == 0)):
            metrics.update(evaluate(core, final=last_epoch))
        metrics.update({f"{k[len('baseline_'):]}_random_init": v for k, v in state_extra.items()})
        if not math.isfinite(metrics["loss"]):
            raise NonFiniteLossError(f"non-finite mean loss at epoch {epoch + 1} of method {spec.method.name!r}")
        if rank == 0 and run_id:
            tracking.log_metrics(spec.tracking.uri, run_id, metrics, step=epoch + 1)
        save = last_epoch or (epoch + 1) % spec.checkpoint.every_epochs == 0
        state = {"epoch": epoch + 1, "global_step": global_step, "mlflow_run_id": run_id, **state_extra,
                 **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}}
        last_metrics = metrics
        if save and rank == 0:
            with tempfile.TemporaryDirectory() as tmp:
                write_training_checkpoint(tmp, method=core, optimizer=optimizer, scheduler=scheduler, spec=spec, state=state)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                                 checkpoint_upload_fn=_checkpoint_uploader(spec))
        else:
            ray.train.report(metrics, checkpoint=None)

    if rank == 0 and run_id and last_metrics:
        with tempfile.TemporaryDirectory() as tmp:
            from methods import checkpoint_io

            enc = Path(tmp) / "encoder"
            checkpoint_io.save_encoder(enc, core.method_name, core.encoder_config(), core.encoder_state_dict())
            tracking.log_artifacts(spec.tracking.uri, run_id, [enc])


def _checkpoint_uploader(spec: DictConfig):
    """Ray Train's ``checkpoint_upload_fn``: our upload (retries with backoff, manifest last) to Ray's storage.

    Ray Train's default copy (``pyarrow.fs.copy_files``) writes the files in name order (``manifest.json``
    before ``model.pt``), retries only a few AWS error codes without logging them, and its error names a bucket
    and key, not the checkpoint URI. The checkpoint still lands where Ray expects it, so Ray keeps managing it
    (``checkpoint.keep``, ``get_checkpoint`` on restart/resume).
    """
    import ray.train

    from ssl_platform.s3 import upload_checkpoint_dir

    def upload(checkpoint, checkpoint_dir_name: str):
        storage = ray.train.get_context().get_storage()
        dest = storage.build_checkpoint_path_from_name(checkpoint_dir_name)
        upload_checkpoint_dir(checkpoint.path, storage.storage_filesystem, dest,
                              attempts=spec.checkpoint.upload_attempts, backoff_s=spec.checkpoint.upload_backoff_s)
        return ray.train.Checkpoint(path=dest, filesystem=storage.storage_filesystem)

    return upload


def _persisted_checkpoint_of_this_run(config: dict[str, Any], rank: int) -> dict[str, Any] | None:
    """After a worker failure, a checkpoint this run persisted but Ray had not registered yet (local storage)."""
    from ssl_platform.storage import latest_checkpoint_of_run, load_training_checkpoint

    local_dir = config.get("local_run_dir")
    ckpt = latest_checkpoint_of_run(local_dir, config.get("mlflow_run_id")) if local_dir else None
    if ckpt is None:
        return None
    if rank == 0:
        print(f"[ssl_platform] restart: using persisted checkpoint {ckpt.name}", flush=True)
    return load_training_checkpoint(ckpt)


def _all_reduce_mean(value: torch.Tensor, world: int) -> float:
    if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        v = value.detach().clone()
        torch.distributed.all_reduce(v)
        return float(v) / world
    return float(value)


def _maybe_kill(fault: DictConfig, rank: int, epoch: int, step: int, steps_per_epoch: int, config: dict[str, Any]) -> None:
    """Test-only fault injection: the chosen rank exits mid-epoch once (a marker file prevents a loop)."""
    if fault.kill_rank_at_epoch < 0 or rank != fault.kill_rank:
        return
    if epoch + 1 != fault.kill_rank_at_epoch or step != steps_per_epoch // 2:
        return
    marker = Path(config.get("fault_marker") or tempfile.gettempdir()) / f"killed-{config.get('run_name', 'run')}"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(str(os.getpid()))
    print(f"[fault] rank {rank} exits during epoch {epoch + 1}", flush=True)
    os._exit(1)


def build_trainer(
    spec: DictConfig,
    run_name: str,
    mlflow_run_id: str | None,
    *,
    callbacks: list | None = None,
    resume_from: str | None = None,
    storage_filesystem=None,
    storage_path: str | None = None,
    s3_filesystem=None,
):
    """The ``TorchTrainer`` for a spec (Ray Train V2)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ssl_platform.spec import to_container

    sc = spec.scaling
    resources = {"CPU": sc.cpus_per_worker}
    if sc.use_gpu:
        resources["GPU"] = sc.gpus_per_worker
    scaling = ScalingConfig(num_workers=sc.num_workers, use_gpu=sc.use_gpu, resources_per_worker=resources)
    run_config = RunConfig(
        name=run_name,
        storage_path=storage_path or spec.checkpoint.uri,
        storage_filesystem=storage_filesystem,
        checkpoint_config=CheckpointConfig(num_to_keep=spec.checkpoint.keep),
        failure_config=FailureConfig(max_failures=sc.max_failures),
        callbacks=callbacks or None,
    )
    loop_config = {
        "spec": to_container(spec),
        "mlflow_run_id": mlflow_run_id,
        "run_name": run_name,
        "resume_from": resume_from,
        "fault_marker": str(Path(tempfile.gettempdir()) / "ssl_platform_faults"),
        "s3_filesystem": s3_filesystem,  # picklable pyarrow S3FileSystem: workers fetch an s3:// teacher with it
    }
    root = storage_path or spec.checkpoint.uri
    if storage_filesystem is None and "://" not in root:
        loop_config["local_run_dir"] = str(Path(root) / run_name)
    return TorchTrainer(train_loop_per_worker, train_loop_config=loop_config, scaling_config=scaling, run_config=run_config)
