"""Ray Train (V2) ``TorchTrainer`` built from a spec, and its worker loop as a few named steps.

``train_loop_per_worker``: :func:`setup_worker` -> :func:`setup_data` -> :func:`build_training` ->
:func:`restore` -> :func:`random_init_baseline` -> per epoch :func:`train_one_epoch`, :func:`evaluate`,
:func:`report_epoch` -> :func:`export_encoder`.

A step: schedules hook -> device-side views of a uint8 batch (``ssl_platform.data.augment``) -> forward (bf16
autocast on CUDA) -> backward -> method hook -> gradient norm (+ clipping) -> AdamW -> EMA hook. Nothing in a
step reads a value on the host: losses and metrics are summed on the device and read every ``log_every``
steps and at the epoch end. A step whose gradients are not finite (a NaN/Inf loss makes them so) is skipped on
the device by the fused AdamW kernel (``found_inf``, as ``torch.amp.GradScaler`` does); at the next read the
run stops if more than ``optim.max_nonfinite_skips`` steps were skipped, naming the first one.

Every epoch all ranks call ``ray.train.report`` (a barrier); rank 0 attaches a checkpoint every
``checkpoint.every_epochs`` and on the last epoch, and logs to MLflow; its console lines (a step line every
``log_every`` steps, a summary per epoch) come from :mod:`ssl_platform.training.progress`. A restarted or resumed run continues
from ``ray.train.get_checkpoint()`` at the next epoch, with its LR schedule, EMA state and MLflow run.
"""

from __future__ import annotations

import functools
import math
import os
import random
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from methods import checkpoint_io
from methods.checkpoint_io import check_state_dict
from methods.distributed import all_reduce_mean, all_reduce_sum
from methods.pretrained import load_encoder_init
from methods.registry import build_method, get_method_class
from ssl_platform.data.augment import BatchViews, eval_views
from ssl_platform.data.small_sets import load_split
from ssl_platform.data.streaming import (
    BadDataError,
    ImageBatch,
    InMemoryImages,
    plan_data,
    streamed_batches,
    warn_bad,
)
from ssl_platform.spec import STREAMED_DATASETS, eval_data_section, method_kwargs, to_container
from ssl_platform.storage.checkpoint_upload import upload_checkpoint_dir
from ssl_platform.storage.method_checkpoints import localize_encoder_init, localize_method_checkpoints
from ssl_platform.storage.training_checkpoints import (
    latest_checkpoint_of_run,
    load_training_checkpoint,
    write_training_checkpoint,
)
from ssl_platform.training.evaluation import embed_batches, gather_to_rank0, knn_top1, linear_probe_top1
from ssl_platform.training.hooks import StepHook, StepInfo
from ssl_platform.training.optim import build_optimizer, build_scheduler, clip_gradients, maybe_sync_batchnorm
from ssl_platform.training.progress import Progress, default_log_every, quiet_ray_train_logs
from ssl_platform.training.ray_runtime import node_cpus, train_worker_threads
from ssl_platform.training.sharding import (
    enable_activation_checkpointing,
    encoder_state_from,
    equal_length_batches,
    full_model_state,
    full_optimizer_state,
    gradient_norm_and_clip,
    gradient_sync,
    is_sharded,
    load_full_state,
    shard_method,
)
from ssl_platform.training.watch import (
    PICTURE_IMAGES,
    CollapseStop,
    RunWatch,
    notable_health,
    write_collapse_stop,
)

EVAL_BATCH_SIZE = 256


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/Inf: the run stops, the last good checkpoint stays as it is."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def build_method_from_spec(method: DictConfig):
    """The method of the spec's ``method`` section (its ``name`` and constructor arguments)."""
    return build_method(method.name, **method_kwargs(method))


# ---- what the driver hands every worker -----------------------------------------------------------------
@dataclass
class LoopConfig:
    """The worker loop's input (``train_loop_config={"loop": LoopConfig}``)."""

    spec: dict[str, Any]
    run_name: str
    mlflow_run_id: str | None = None
    resume_from: str | None = None
    local_run_dir: str | None = None  # local storage: find a checkpoint persisted but not yet registered by Ray
    s3_filesystem: Any = None  # picklable pyarrow S3FileSystem: workers fetch an s3:// teacher with it
    num_train: int | None = None  # streamed sources: images of the training split (listing / manifest)
    num_classes: int | None = None  # of a streamed evaluation source; 0: no evaluation data; None: in memory
    step_hooks: list[StepHook] = field(default_factory=list)
    tracking_run: Any = None  # rank 0's ssl_platform.tracking.run_log.TrackedRun: queued, never waited for


@dataclass
class Worker:
    spec: DictConfig
    loop: LoopConfig
    rank: int
    world: int
    device: torch.device
    autocast_dtype: torch.dtype | None
    progress: Progress | None = None  # rank 0's console lines (ssl_platform.training.progress)


@dataclass
class WorkerData:
    """This worker's batches: ``train(epoch)`` and ``evaluation(split)`` iterate :class:`ImageBatch` streams."""

    batch_size: int
    steps_per_epoch: int
    num_classes: int
    train: Callable[[int], Iterator[ImageBatch]]
    evaluation: Callable[[str], Iterator[ImageBatch]] | None  # "train" (the kNN bank) | "val"; None: no labels
    views: Callable[[ImageBatch, torch.Generator], dict[str, Any]]
    eval_input: Callable[[ImageBatch], torch.Tensor]


@dataclass
class Training:
    """The state that changes while training. ``method`` owns the hooks and the weights; ``model`` is what the
    step calls (``method`` compiled and/or wrapped in DDP)."""

    method: Any
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    epoch: int = 0
    global_step: int = 0
    skipped_steps: int = 0
    baseline: dict[str, float] = field(default_factory=dict)
    logged_epochs: set[int] = field(default_factory=set)  # rank 0: epochs already in the MLflow run (restarts)
    watch: RunWatch | None = None  # health metrics, collapse warnings, online probe, pictures (rank 0)
    last_output: Any = None  # the output of the step's last micro-batch (what the watch reads)


# ---- the loop -------------------------------------------------------------------------------------------
def train_loop_per_worker(config: dict[str, Any]) -> None:
    quiet_ray_train_logs()  # Ray Train's per-report INFO dumps; the progress lines say it
    worker = setup_worker(config["loop"])
    data = setup_data(worker)
    training = build_training(worker, data)
    restore(worker, training)
    if worker.rank == 0:
        worker.progress = Progress(worker.loop.run_name, worker.spec.optim.epochs, data.steps_per_epoch,
                                   start_epoch=training.epoch)
    random_init_baseline(worker, data, training)
    training.model = _wrap_for_steps(worker, training.method)
    try:
        for epoch in range(training.epoch, worker.spec.optim.epochs):
            metrics = train_one_epoch(worker, data, training, epoch)
            metrics.update(evaluate(worker, data, training.method, final=epoch + 1 == worker.spec.optim.epochs,
                                    epoch=epoch + 1, watch=training.watch))
            if worker.progress:
                worker.progress.end_epoch(epoch + 1, metrics)
            report_epoch(worker, training, metrics)
    except CollapseStop as stop:
        report_collapse_stop(worker, training, str(stop))
        return
    export_encoder(worker, training)


def report_collapse_stop(worker: Worker, training: Training, message: str) -> None:
    """``eval.stop_on_collapse``: every rank leaves the loop at the same step, without a checkpoint (the last complete
    one stays the latest); rank 0 writes the reason beside the checkpoints, where the driver finds it and ends the
    run with it as an error."""
    if worker.rank != 0:
        return
    write_collapse_stop(worker.spec.checkpoint, worker.loop.run_name, message, worker.loop.s3_filesystem)
    if worker.loop.tracking_run:
        worker.loop.tracking_run.set_tags({"collapse.stopped": message})
        worker.loop.tracking_run.close()


def setup_worker(loop: LoopConfig) -> Worker:
    import ray.train
    import ray.train.torch

    spec = OmegaConf.create(loop.spec)
    ctx = ray.train.get_context()
    device = ray.train.torch.get_device()
    threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)  # Ray's: the worker's cpus_per_worker
    if device.type == "cpu" and spec.data.name in STREAMED_DATASETS:  # + the CPUs left idle by Ray Data's decoding
        threads = train_worker_threads(threads, node_cpus(), ctx.get_local_world_size())
    if threads > 0:
        torch.set_num_threads(threads)
    bf16 = device.type == "cuda" and spec.scaling.precision == "bf16"
    return Worker(spec, loop, ctx.get_world_rank(), ctx.get_world_size(), device, torch.bfloat16 if bf16 else None)


def setup_data(worker: Worker) -> WorkerData:
    """This worker's training batches and evaluation batches, each from a streamed source (its Ray Data shards) or
    an in-memory set (its arrays, sharded by rank). Without evaluation data (no labels anywhere), ``evaluation`` is
    None and kNN / the probe are skipped."""
    spec = worker.spec
    data = spec.data
    method = get_method_class(spec.method.name)  # its views, resampling and normalisation (training = evaluation)
    batch_views = BatchViews(method.training_views(data), method.input_mean, method.input_std)
    eval_views_of = functools.partial(eval_views, mean=method.input_mean, std=method.input_std,
                                      crop_fraction=float(spec.eval.crop_fraction))
    train, num_train, per_worker = _training_batches(worker)
    evaluation, num_classes, eval_size = _evaluation_batches(worker)
    device = worker.device
    return WorkerData(
        batch_size=per_worker,
        steps_per_epoch=num_train // worker.world // per_worker,
        num_classes=num_classes,
        train=train,
        evaluation=evaluation,
        views=lambda batch, gen: batch_views(batch.images, batch.sizes, gen),
        eval_input=lambda batch: _eval_input(batch.to(device), eval_size, eval_views_of),
    )


def _training_batches(worker: Worker) -> tuple[Callable[[int], Iterator[ImageBatch]], int, int]:
    """``(train(epoch), images in the training split, batch size per worker)``."""
    spec, rank, world = worker.spec, worker.rank, worker.world
    data = spec.data
    if data.name in STREAMED_DATASETS:
        import ray.train

        num_train = int(worker.loop.num_train)
        per_worker = _batch_size_per_worker(data, world, num_train)
        shard = ray.train.get_dataset_shard("train")
        # An image folder's files come in a new random order every epoch (blocks and rows within them); a shard
        # holds its rows in order, so shards also go through a local shuffle buffer (whose filling delays each
        # epoch's first step by `shuffle_buffer` decoded images)
        shuffle_buffer = data.shuffle_buffer if data.name == "shards" else 0

        def train(epoch: int) -> Iterator[ImageBatch]:
            return streamed_batches(shard, per_worker, prefetch_batches=data.prefetch_batches,
                                    shuffle_buffer=shuffle_buffer, seed=spec.seed + 1000 * rank + epoch)

        return train, num_train, per_worker
    split = load_split(data)
    images = InMemoryImages.from_float(split.train.images, split.train.labels)
    per_worker = _batch_size_per_worker(data, world, len(images))
    return (lambda epoch: images.batches(per_worker, rank, world, epoch, spec.seed)), len(images), per_worker


def _evaluation_batches(worker: Worker) -> tuple[Callable[[str], Iterator[ImageBatch]] | None, int, int]:
    """``(evaluation(split), classes, image size)``: ``split`` is ``"train"`` (the kNN / probe bank) or ``"val"``;
    ``(None, 0, 0)`` without evaluation data."""
    spec, rank, world = worker.spec, worker.rank, worker.world
    eval_data = eval_data_section(spec.data, spec.eval)
    if eval_data is None or worker.loop.num_classes == 0:
        return None, 0, 0
    if eval_data.name in STREAMED_DATASETS:
        import ray.train

        shards = {name: ray.train.get_dataset_shard("eval_" + name) for name in ("train", "val")}

        def streamed(split: str) -> Iterator[ImageBatch]:
            return streamed_batches(shards[split], EVAL_BATCH_SIZE, prefetch_batches=eval_data.prefetch_batches,
                                    drop_last=False)

        return streamed, int(worker.loop.num_classes), eval_data.image_size
    split = load_split(eval_data)
    sets = {"train": InMemoryImages.from_float(split.train.images, split.train.labels),
            "val": InMemoryImages.from_float(split.test.images, split.test.labels)}

    def in_memory(name: str) -> Iterator[ImageBatch]:
        return sets[name].batches(EVAL_BATCH_SIZE, rank, world, None, spec.seed, drop_last=False)

    return in_memory, split.num_classes, eval_data.image_size


def local_worker(spec: DictConfig, device: torch.device | str = "cpu", step_hooks: list[StepHook] | None = None):
    """``(Worker, WorkerData, Training)`` of a one-process run without Ray, built by the worker loop's own steps:
    for benchmarks (the bare loop) and tests of :func:`train_step`. In-memory data sources only."""
    device = torch.device(device)
    bf16 = device.type == "cuda" and spec.scaling.precision == "bf16"
    loop = LoopConfig(spec={}, run_name="local", step_hooks=list(step_hooks or []))
    worker = Worker(spec, loop, 0, 1, device, torch.bfloat16 if bf16 else None)
    data = setup_data(worker)
    return worker, data, build_training(worker, data)


def _eval_input(batch: ImageBatch, image_size: int, eval_views: Callable) -> torch.Tensor:
    return eval_views(batch.images, batch.sizes, image_size)


def _batch_size_per_worker(data: DictConfig, world_size: int, n_train: int) -> int:
    """``data.batch_size`` split over the workers; refused when a worker's share of the training split is smaller."""
    per_worker = max(1, data.batch_size // world_size)
    shard = n_train // world_size
    if shard < per_worker:
        raise ValueError(
            f"data.batch_size: expected at most {shard * world_size} (the training split has {n_train} images over "
            f"{world_size} workers), got {data.batch_size}"
        )
    return per_worker


def build_training(worker: Worker, data: WorkerData) -> Training:
    """The method (same initial weights on every rank), AdamW and the per-step LR schedule."""

    spec = worker.spec
    seed_everything(spec.seed)
    # an s3:// teacher: a verified local copy
    method = build_method_from_spec(localize_method_checkpoints(spec.method, spec.checkpoint, worker.loop.s3_filesystem))
    for hook in worker.loop.step_hooks:
        hook.setup(method)
    if spec.method.get("encoder_init"):  # released weights (a restored checkpoint overrides them)
        load_encoder_init(method, localize_encoder_init(spec.method.encoder_init, spec.checkpoint, worker.loop.s3_filesystem))
    seed_everything(spec.seed + 1000 * worker.rank)  # different masks per rank
    method = maybe_sync_batchnorm(method, worker.world, worker.device)  # BatchNorm heads over the global batch (DINO)
    method.to(worker.device)
    if spec.scaling.activation_checkpointing:
        enable_activation_checkpointing(method)  # student blocks recompute activations in backward
    if spec.scaling.strategy == "fsdp":
        shard_method(method, worker.device)  # before the optimizer: its parameters become the shards
    optimizer = build_optimizer(method, spec.optim, worker.device)
    scheduler = build_scheduler(optimizer, spec.optim, data.steps_per_epoch, global_batch=data.batch_size * worker.world)
    probe_classes = data.num_classes if spec.data.labels != "none" and data.evaluation is not None else 0
    watch = RunWatch(spec.eval, method, worker.device, worker.rank, worker.world, probe_classes, worker.autocast_dtype)
    return Training(method=method, model=method, optimizer=optimizer, scheduler=scheduler, watch=watch)


def restore(worker: Worker, training: Training) -> None:
    """Continue from Ray's checkpoint (restart / resume), ``--from-checkpoint``, or one this run persisted."""
    import ray.train

    loop = worker.loop
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            loaded = load_training_checkpoint(d)
    elif loop.resume_from:
        loaded = load_training_checkpoint(loop.resume_from)
    else:
        persisted = latest_checkpoint_of_run(loop.local_run_dir, loop.mlflow_run_id) if loop.local_run_dir else None
        if persisted is not None and worker.rank == 0:
            print(f"[ssl_platform] restart: using persisted checkpoint {persisted.name}", flush=True)
        loaded = load_training_checkpoint(persisted) if persisted is not None else None
    if loaded is None:
        return
    what = f"training checkpoint ({loaded['manifest'].get('method')!r} -> {worker.spec.method.name!r})"
    check_state_dict(training.method.state_dict(), loaded["model"], what)  # names and (global) shapes
    load_full_state(training.method, training.optimizer, loaded["model"], loaded["optimizer"])  # DDP or FSDP
    training.scheduler.load_state_dict(loaded["scheduler"])
    state = loaded["state"]
    training.epoch, training.global_step = int(state["epoch"]), int(state["global_step"])
    training.skipped_steps = int(state.get("nonfinite_skipped", 0))
    training.baseline = {k: v for k, v in state.items() if k.startswith("baseline_")}
    if worker.rank == 0:
        print(f"[ssl_platform] resumed from checkpoint at epoch {training.epoch} (step {training.global_step})", flush=True)
        _log_restored_epoch(worker, training, state)


def _log_restored_epoch(worker: Worker, training: Training, state: dict[str, Any]) -> None:
    """After a restart, the MLflow run keeps one entry per epoch: the epochs it already has are not logged again, and
    the restored epoch is logged from its checkpoint if the lost worker died between the checkpoint and the log."""

    run = worker.loop.tracking_run
    if run is None or state.get("mlflow_run_id") not in (None, worker.loop.mlflow_run_id):
        return
    # queued: the sender leaves out the steps the MLflow run already has (nothing is read here, the server may be down)
    metrics = {k: v for k, v in state.items() if isinstance(v, (int, float)) and not k.startswith("baseline_")}
    run.log_metrics(metrics, step=training.epoch)
    training.logged_epochs.add(training.epoch)


def random_init_baseline(worker: Worker, data: WorkerData, training: Training) -> None:
    """kNN (and linear probe) of the same encoder at random init, once per run (kept in the checkpoints)."""

    spec = worker.spec
    if not (spec.eval.knn.enabled and spec.eval.random_init_baseline) or "baseline_knn_top1" in training.baseline:
        return
    if data.evaluation is None:
        return
    baseline = evaluate(worker, data, training.method, final=True, epoch=0)
    training.baseline = {f"baseline_{k}": v for k, v in baseline.items()}
    if worker.rank == 0 and worker.loop.tracking_run:
        worker.loop.tracking_run.log_metrics({f"{k}_random_init": v for k, v in baseline.items()}, 0)


def _wrap_for_steps(worker: Worker, method: torch.nn.Module) -> torch.nn.Module:
    import ray.train.torch

    model = torch.compile(method) if worker.spec.scaling.compile else method
    if is_sharded(method):  # FSDP: already sharded (build_training); no DDP wrapper
        return model
    return ray.train.torch.prepare_model(model, move_to_device=False)


# ---- one epoch ------------------------------------------------------------------------------------------
class _DeviceSums:
    """Loss, metrics and skip counters summed on the device; read on the host only by :meth:`read`."""

    def __init__(self, device: torch.device):
        self.device = device
        self.loss = torch.zeros((), device=device)
        self.finite_steps = torch.zeros((), device=device)
        self.skipped = torch.zeros((), device=device)
        self.first_skipped = torch.full((), -1, dtype=torch.long, device=device)
        self.metrics: dict[str, torch.Tensor] = {}

    def add(self, loss: torch.Tensor, metrics: dict[str, torch.Tensor], skipped: torch.Tensor, global_step: int) -> None:
        ok = 1.0 - skipped
        self.loss += torch.where(skipped > 0, torch.zeros_like(loss), loss.float())
        self.finite_steps += ok
        self.skipped += skipped
        first_here = (skipped > 0) & (self.first_skipped < 0)
        self.first_skipped = torch.where(first_here, torch.full_like(self.first_skipped, global_step), self.first_skipped)
        for k, v in metrics.items():
            v = torch.where(skipped > 0, torch.zeros_like(v, dtype=torch.float32), v.float())
            self.metrics[k] = self.metrics[k] + v if k in self.metrics else v

    def read(self) -> dict[str, float]:
        values = torch.stack([self.loss, self.finite_steps, self.skipped, self.first_skipped.float(),
                              *self.metrics.values()]).tolist()  # one host synchronisation
        loss, finite, skipped, first, *rest = values
        out = {"loss": loss / max(finite, 1.0), "finite_steps": finite, "skipped": skipped, "first_skipped": first}
        out.update({k: v / max(finite, 1.0) for k, v in zip(self.metrics, rest)})
        return out


def train_one_epoch(worker: Worker, data: WorkerData, training: Training, epoch: int) -> dict[str, float]:
    """One pass over this worker's shard; returns the epoch's metrics (loss and output metrics averaged over the
    ranks' finite steps). Undecodable files are named, counted (``bad_images``) and judged (:func:`_check_bad_data`)."""

    spec, rank = worker.spec, worker.rank
    steps = data.steps_per_epoch
    log_every = default_log_every(steps)
    generator = torch.Generator(device=worker.device).manual_seed(spec.seed * 7919 + 1000 * rank + epoch)
    sums = _DeviceSums(worker.device)
    bad_paths: list[str] = []
    seen = bad = 0
    skipped_before = training.skipped_steps
    training.model.train()
    if worker.progress:
        worker.progress.start_epoch(epoch + 1)
    t0 = time.perf_counter()
    t_first = None  # when the first batch is in hand: the epoch's time from its first step excludes the wait for it
    for i, batch in enumerate(data.train(epoch)):
        if i >= steps:  # streamed shards may hold a few rows more than the schedule's steps
            break
        t_first = t_first or time.perf_counter()
        seen += len(batch.labels) + len(batch.bad_paths)
        if batch.bad_paths:
            warn_bad(batch.bad_paths)
            bad += len(batch.bad_paths)
            bad_paths.extend(batch.bad_paths[: 3 - len(bad_paths)])
            _check_bad_data(bad, seen, bad_paths, spec.data.max_bad_fraction, epoch_end=False)
        info = StepInfo(worker.loop.run_name, rank, epoch, i, steps, training.global_step)
        for hook in worker.loop.step_hooks:
            hook.before_step(info, batch)
        loss, metrics, skipped = train_step(worker, data, training, batch, generator, info, epoch + i / steps)
        sums.add(loss, metrics, skipped, training.global_step)
        training.global_step += 1
        _step_line(worker, data, training, sums, epoch, i, regular=(i + 1) % log_every == 0 or i + 1 == steps,
                   skipped_before=skipped_before)
    elapsed = time.perf_counter() - t0
    _check_bad_data(bad, seen, bad_paths, spec.data.max_bad_fraction, epoch_end=True)
    read = _check_nonfinite(worker, training, sums.read(), skipped_before, steps)
    done = int(round(read["finite_steps"] + read["skipped"]))
    metrics = {
        "epoch": epoch + 1,
        "loss": float(all_reduce_mean(torch.tensor(read["loss"]))),
        "lr": float(training.scheduler.get_last_lr()[0]),
        "weight_decay": training.scheduler.weight_decay,
        "global_step": training.global_step,
        "epoch_time_s": elapsed,
        "first_batch_wait_s": (t_first or t0 + elapsed) - t0,  # epoch_time_s minus it: first step to epoch end
        "images_per_sec": done * data.batch_size * worker.world / max(elapsed, 1e-9),
        "nonfinite_skipped": training.skipped_steps,
        "bad_images": int(all_reduce_sum(torch.tensor(float(bad)))),
    }
    metrics.update({k: v for k, v in read.items() if k not in ("loss", "finite_steps", "skipped", "first_skipped")})
    metrics.update(training.method.schedule_state())
    if not math.isfinite(metrics["loss"]):
        raise NonFiniteLossError(f"non-finite mean loss at epoch {epoch + 1} of method {spec.method.name!r}")
    return metrics


def train_step(
    worker: Worker, data: WorkerData, training: Training, batch: ImageBatch, generator: torch.Generator,
    info: StepInfo, epoch_progress: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """One optimisation step; returns the loss, the output's scalar metrics and ``skipped`` (1.0 when the
    gradients were not finite and AdamW left the weights as they were), all on the device."""
    spec, method, optimizer = worker.spec, training.method, training.optimizer
    method.on_train_step(training.global_step, spec.optim.epochs * data.steps_per_epoch, epoch_progress)
    views = data.views(batch.to(worker.device), generator)
    loss, metrics = accumulate_gradients(worker, training, views, info)
    method.before_optimizer_step(epoch_progress)
    params = [p for p in method.parameters() if p.grad is not None]
    if is_sharded(method):  # norms over the shards (one all-reduce), both clip modes
        grad_norm = gradient_norm_and_clip(params, spec.optim)
    else:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        clip_gradients(params, spec.optim, grad_norm)  # optim.clip_mode: global | per_param
    skipped = (~torch.isfinite(grad_norm)).float()
    if optimizer.defaults.get("fused"):
        optimizer.found_inf = skipped  # the fused kernel skips the update on the device
        optimizer.step()
    elif not bool(skipped):  # other optimisers: one host read
        optimizer.step()
    training.scheduler.step()
    method.after_optimizer_step()
    if training.watch is not None:  # the last micro-batch's output; the online probe: the whole batch, clean views
        training.watch.after_step(training.last_output, lambda: data.eval_input(batch), batch.labels,
                                  training.global_step)
    return loss, metrics, skipped


def micro_batches(views: dict[str, Any], k: int) -> list[dict[str, Any]]:
    """The views of one batch cut into ``k`` micro-batches along the batch dimension (a list of views: each cut)."""
    if k == 1:
        return [views]

    def parts(value: Any) -> list[Any]:
        if isinstance(value, torch.Tensor) and value.ndim > 0:
            return list(value.tensor_split(k))
        if isinstance(value, (list, tuple)):
            return [list(p) for p in zip(*(parts(v) for v in value))] if value else [value] * k
        return [value] * k

    split = {key: parts(value) for key, value in views.items()}
    return [{key: split[key][j] for key in views} for j in range(k)]


def accumulate_gradients(
    worker: Worker, training: Training, views: dict[str, Any], info: StepInfo,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward and backward of ``optim.accumulation_steps`` micro-batches of ``views``, each loss divided by their
    number: the gradients of the whole batch's mean loss. Only the last backward all-reduces (DDP ``no_sync``, FSDP
    ``set_requires_gradient_sync``). Returns the mean loss and mean output metrics (detached, on the device)."""
    k = int(worker.spec.optim.accumulation_steps)
    training.optimizer.zero_grad(set_to_none=True)
    losses: list[torch.Tensor] = []
    metrics: dict[str, torch.Tensor] = {}
    for j, micro in enumerate(micro_batches(views, k)):
        with gradient_sync(training.model, enabled=j == k - 1):
            with torch.autocast(worker.device.type, dtype=worker.autocast_dtype, enabled=worker.autocast_dtype is not None):
                out = training.model(**micro)
            loss = out.loss
            for hook in worker.loop.step_hooks:
                loss = hook.transform_loss(loss, info)
            (loss / k if k > 1 else loss).backward()
        losses.append(loss.detach())
        training.last_output = out
        for name, value in out.metric_tensors().items():
            metrics[name] = metrics[name] + value / k if name in metrics else value / k
    return (torch.stack(losses).mean() if k > 1 else losses[0]), metrics


def _step_line(worker: Worker, data: WorkerData, training: Training, sums: _DeviceSums, epoch: int, i: int, *,
               regular: bool, skipped_before: int) -> None:
    """After step ``i``: on the regular steps (every ``log_every``, the epoch's last) every rank reads its sums
    (one host sync) and checks for non-finite steps, and rank 0 prints a line; rank 0 also prints one between them
    when :meth:`Progress.line_due` says so (the first steps of a long epoch, every 30 s)."""
    due = worker.progress is not None and worker.progress.line_due(epoch + 1, i + 1)
    health: dict[str, float] = {}
    if regular:
        read = _check_nonfinite(worker, training, sums.read(), skipped_before, data.steps_per_epoch)
        health = _watch_step(worker, training)
    elif due:
        read = sums.read()
    else:
        return
    if worker.progress:
        worker.progress.update(epoch + 1, i + 1, read["loss"], (i + 1) * data.batch_size * worker.world,
                               lr=training.scheduler.get_last_lr()[0], extra=notable_health(health, worker.spec.eval.health))


def _watch_step(worker: Worker, training: Training) -> dict[str, float]:
    """At a log interval: the health metrics and probe accuracy (rank 0: logged with the global step), collapse
    warnings (printed once, tagged in MLflow) and, with ``eval.stop_on_collapse``, the stop (every rank)."""
    watch = training.watch
    if watch is None:
        return {}
    values = watch.read(training.global_step)
    run = worker.loop.tracking_run
    if values and run:
        run.log_metrics(values, step=training.global_step)  # queued
    events = watch.take_events()
    for event in events:
        message = event.message(training.last_output.embedding.shape[1] if event.rule.metric == "rank_fraction" else None)
        print(f"[{worker.loop.run_name}] {message}", flush=True)
        if run:
            run.set_tags({f"collapse.{event.rule.metric}": message})
    if watch.stop_requested():
        raise CollapseStop(f"eval.stop_on_collapse: {watch.stop_reason or 'collapse warning on rank 0'} "
                           f"(the last complete checkpoint is kept)")
    return values


def _check_nonfinite(
    worker: Worker, training: Training, read: dict[str, float], skipped_before: int, steps_per_epoch: int,
) -> dict[str, float]:
    """Counts the skipped steps (those of this epoch read so far + earlier epochs); stops past
    ``optim.max_nonfinite_skips``, naming the first skipped step of this epoch."""
    training.skipped_steps = skipped_before + int(read["skipped"])
    limit = worker.spec.optim.max_nonfinite_skips
    if training.skipped_steps > limit:
        first = int(read["first_skipped"])
        raise NonFiniteLossError(
            f"non-finite loss or gradients at step {first} (epoch {first // steps_per_epoch + 1}) of method "
            f"{worker.spec.method.name!r} ({training.skipped_steps} step(s) skipped, optim.max_nonfinite_skips={limit}); "
            f"the last complete checkpoint is kept"
        )
    return read


def _check_bad_data(bad: int, seen: int, examples: list[str], max_fraction: float, epoch_end: bool) -> None:
    """Stop once undecodable files are more than ``data.max_bad_fraction`` of this epoch's files; judged once
    ``1 / max_fraction`` files were seen (a single bad file in the first batch is no verdict) or at the epoch end."""

    if not bad or bad / max(seen, 1) <= max_fraction:
        return
    if epoch_end or max_fraction == 0 or seen * max_fraction >= 1:
        raise BadDataError(f"data.max_bad_fraction: expected at most a share {max_fraction} of undecodable images, "
                           f"got {bad} undecodable of {seen} seen in this epoch, e.g. {examples[:3]}")


# ---- evaluation, report, export -------------------------------------------------------------------------
def evaluate(worker: Worker, data: WorkerData, method: Any, *, final: bool, epoch: int,
             watch: RunWatch | None = None) -> dict[str, float]:
    """kNN top-1 (and the linear probe on the last epoch) of the frozen encoder. Every rank embeds its share of
    the train bank and the validation split in streamed batches; rank 0 gathers the features and scores them.
    With a ``watch``: the online probe's validation accuracy and the pictures (``eval.pictures``) as well."""

    spec = worker.spec
    knn = spec.eval.knn
    due = final or (knn.every_epochs and epoch % knn.every_epochs == 0)
    if not knn.enabled or not due or data.evaluation is None:
        return {}
    bank = gather_to_rank0(*embed_batches(method, _eval_batches(method, data, "train"), data.eval_input, worker.device))
    first: list[ImageBatch] = []
    val_batches = keep_first(_eval_batches(method, data, "val"), first)
    val = gather_to_rank0(*embed_batches(method, val_batches, data.eval_input, worker.device))
    pictures = _pictures(worker, data, method, watch, first, epoch)
    if worker.rank != 0:
        return {}
    (tr, tr_y), (te, te_y) = bank, val
    out = {"knn_top1": knn_top1(tr, tr_y, te, te_y, knn.k, knn.temperature, data.num_classes)}
    if final and spec.eval.linear.enabled:
        lin = spec.eval.linear
        out["linear_top1"] = linear_probe_top1(tr, tr_y, te, te_y, lin.epochs, lin.lr, spec.seed)
    if watch is not None:
        out.update(watch.probe_accuracy(te, te_y))
        if pictures is not None and worker.loop.tracking_run:
            worker.loop.tracking_run.log_artifacts(watch.pictures(pictures, te, te_y, epoch), "images")
    return out


def keep_first(batches: Iterator[ImageBatch], first: list[ImageBatch]) -> Iterator[ImageBatch]:
    """``batches`` unchanged, the first non-empty one also appended to ``first``."""
    for batch in batches:
        if not first and len(batch.labels):
            first.append(batch)
        yield batch


def _pictures(worker: Worker, data: WorkerData, method: Any, watch: RunWatch | None, first: list[ImageBatch],
              epoch: int) -> torch.Tensor | None:
    """Rank 0: the evaluation images the method's panels show (its first validation batch, as the method sees
    them); an empty tensor for the embedding plot alone (under FSDP: a panel's forward on rank 0 alone would wait
    for the other ranks' shards); None without ``eval.pictures``."""
    if watch is None or worker.rank != 0 or not worker.spec.eval.pictures or epoch == 0 or not first:
        return None
    images = data.eval_input(first[0].to(worker.device))[:PICTURE_IMAGES]
    return images[:0] if is_sharded(method) else images


def _eval_batches(method: Any, data: WorkerData, split: str) -> Iterator[ImageBatch]:
    """``data.evaluation(split)``; under FSDP padded with empty batches so that every rank runs as many forwards."""
    batches = data.evaluation(split)
    if not is_sharded(method):
        return batches
    return equal_length_batches(batches, lambda b: ImageBatch(b.images[:0], None if b.sizes is None else b.sizes[:0],
                                                              b.labels[:0]))


def report_epoch(worker: Worker, training: Training, metrics: dict[str, float]) -> None:
    """``ray.train.report`` on every rank, with a checkpoint when one is due, then the MLflow metrics (rank 0): an
    epoch is logged only once its checkpoint is stored, so a restart never logs it twice."""
    import ray.train

    spec, loop = worker.spec, worker.loop
    epoch = int(metrics["epoch"])
    training.epoch = epoch
    metrics.update({f"{k[len('baseline_'):]}_random_init": v for k, v in training.baseline.items()})
    due = epoch == spec.optim.epochs or epoch % spec.checkpoint.every_epochs == 0
    full = _full_states(worker, training) if due else None  # under FSDP a collective: every rank gathers
    if worker.rank != 0 or not due:
        ray.train.report(metrics, checkpoint=None)
    else:
        state = {"epoch": epoch, "global_step": training.global_step, "mlflow_run_id": loop.mlflow_run_id,
                 **training.baseline, **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}}
        with tempfile.TemporaryDirectory() as tmp:
            write_training_checkpoint(tmp, method=training.method, optimizer=training.optimizer,
                                      scheduler=training.scheduler, spec=spec, state=state, **full)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_upload_fn=_checkpoint_uploader(spec.checkpoint))
    if worker.rank == 0 and loop.tracking_run and epoch not in training.logged_epochs:
        loop.tracking_run.log_metrics(metrics, step=epoch)  # queued: an epoch never waits on the tracking server
        training.logged_epochs.add(epoch)


def _full_states(worker: Worker, training: Training) -> dict[str, Any]:
    """The keyword arguments of :func:`write_training_checkpoint`: full (unsharded) model, optimizer (keyed by
    parameter names) and encoder state dicts on the CPU, the same under DDP and FSDP; under FSDP every rank calls
    this (gathers), rank 0 gets the states."""
    method = training.method
    if worker.rank != 0 and not is_sharded(method):
        return {}
    model_state = full_model_state(method)
    optimizer_state = full_optimizer_state(method, training.optimizer)
    if worker.rank != 0:
        return {}
    return {"model_state": model_state, "optimizer_state": optimizer_state,
            "encoder_state": encoder_state_from(method, model_state)}


def export_encoder(worker: Worker, training: Training) -> None:
    """The trained encoder as an MLflow artifact of the run (rank 0): a plain timm state dict, also under FSDP (every
    rank takes part in gathering it). Then rank 0's tracking records are sent, waiting at most
    ``tracking.flush_timeout_s`` (what is left goes to its pending file beside the checkpoints)."""

    loop, method = worker.loop, training.method
    # under FSDP a collective: every rank gathers, whether or not it holds a tracking run
    full = full_model_state(method) if is_sharded(method) and training.epoch > 0 else None
    if not loop.tracking_run or training.epoch == 0 or worker.rank != 0:
        return
    with tempfile.TemporaryDirectory() as tmp:
        enc = Path(tmp) / "encoder"
        state = encoder_state_from(method, full) if full is not None else method.encoder_state_dict()
        checkpoint_io.save_encoder(enc, method.method_name, method.encoder_config(), state)
        loop.tracking_run.log_artifacts([enc])
    loop.tracking_run.close()


def _checkpoint_uploader(checkpoint_section: DictConfig):
    """Ray Train's ``checkpoint_upload_fn``: our upload (retries with backoff as the spec's ``checkpoint`` section
    says, manifest last) to Ray's storage.

    Ray Train's default copy (``pyarrow.fs.copy_files``) writes the files in name order (``manifest.json``
    before ``model.pt``), retries only a few AWS error codes without logging them, and its error names a bucket
    and key, not the checkpoint URI. The checkpoint still lands where Ray expects it, so Ray keeps managing it
    (``checkpoint.keep``, ``get_checkpoint`` on restart/resume).
    """
    import ray.train

    def upload(checkpoint, checkpoint_dir_name: str):
        storage = ray.train.get_context().get_storage()
        dest = storage.build_checkpoint_path_from_name(checkpoint_dir_name)
        upload_checkpoint_dir(checkpoint.path, storage.storage_filesystem, dest,
                              attempts=checkpoint_section.upload_attempts,
                              backoff_s=checkpoint_section.upload_backoff_s)
        return ray.train.Checkpoint(path=dest, filesystem=storage.storage_filesystem)

    return upload


# ---- driver side ----------------------------------------------------------------------------------------
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
    step_hooks: list[StepHook] | None = None,
    source=None,
    tracking_run=None,
):
    """The ``TorchTrainer`` for a spec (Ray Train V2). Streamed data (``source``: the run's
    :class:`~ssl_platform.data.streaming.DataPlan`, planned here when not given) goes in as Ray Data datasets."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    sc = spec.scaling
    resources = {"CPU": sc.cpus_per_worker}
    if sc.use_gpu:
        resources["GPU"] = sc.gpus_per_worker
    scaling = ScalingConfig(num_workers=sc.num_workers, use_gpu=sc.use_gpu, resources_per_worker=resources,
                            placement_strategy=sc.placement_strategy)
    run_config = RunConfig(
        name=run_name,
        logging_config=LoggingConfig(log_level="WARNING"),  # Ray Train's INFO lines off; its warnings stay
        storage_path=storage_path or spec.checkpoint.uri,
        storage_filesystem=storage_filesystem,
        checkpoint_config=CheckpointConfig(num_to_keep=spec.checkpoint.keep),
        failure_config=FailureConfig(max_failures=sc.max_failures),
        callbacks=callbacks or None,
    )
    loop = LoopConfig(spec=to_container(spec), run_name=run_name, mlflow_run_id=mlflow_run_id, resume_from=resume_from,
                      s3_filesystem=s3_filesystem, step_hooks=list(step_hooks or []), tracking_run=tracking_run)
    root = storage_path or spec.checkpoint.uri
    if storage_filesystem is None and "://" not in root:
        loop.local_run_dir = str(Path(root) / run_name)
    plan = source or plan_data(spec)
    loop.num_train = plan.train.num_train if plan.train is not None else None
    loop.num_classes = plan.num_classes
    datasets = plan.datasets(spec)
    return TorchTrainer(train_loop_per_worker, train_loop_config={"loop": loop}, scaling_config=scaling,
                        run_config=run_config, datasets=datasets, dataset_config=_ingest_config() if datasets else None)


def _ingest_config():
    """Ray Train's default data ingest options without their deprecated ``exclude_resources`` argument (whose
    setter warns on every run; it copied the context's value, zero unless a user set it, which is kept here)."""
    from ray.data import DataContext, ExecutionOptions
    from ray.train import DataConfig

    ctx = DataContext.get_current().execution_options
    options = ExecutionOptions(resource_limits=ctx.resource_limits, preserve_order=ctx.preserve_order,
                               verbose_progress=ctx.verbose_progress)
    if not ctx.exclude_resources.is_zero():
        options.exclude_resources = ctx.exclude_resources
    return DataConfig(execution_options=options)
