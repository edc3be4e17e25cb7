"""AdamW with per-step schedules of the learning rate AND the weight decay, gradient clipping, SyncBatchNorm.

Learning rate at step ``t`` of ``T`` (``T_w`` warm-up steps), as DINO's ``utils.cosine_scheduler`` (Caron et al.
2021) and MAE's ``lr_sched`` (He et al. 2022):

    lr(t) = lr0 * (t + 1) / T_w                                                  for t < T_w
    lr(t) = lr_min + (lr0 - lr_min) * (1 + cos(pi * (t - T_w) / (T - T_w))) / 2   otherwise

with ``lr0 = optim.lr`` (``optim.lr_scaling: none``) or ``optim.lr * global_batch / 256`` (``linear``, Goyal et al.
2017, as DINO, iBOT and MAE scale their base learning rate), and ``lr_min = optim.min_lr`` when set (an absolute
value, not scaled: DINO's ``--min_lr 1e-6``), else ``optim.min_lr_ratio * lr0``.

Weight decay of the decayed parameter group (the other group never decays) at step ``t``, cosine without warm-up
(DINO/iBOT: 0.04 -> 0.4 via ``--weight_decay_end``; constant when ``optim.weight_decay_end`` is unset):

    wd(t) = wd_end + (wd0 - wd_end) * (1 + cos(pi * t / T)) / 2

Gradient clipping (``optim.clip_grad`` > 0): ``clip_mode: global`` rescales all gradients by
``min(1, c / ||g||_2)`` over the whole model (``torch.nn.utils.clip_grad_norm_``, data2vec); ``per_param`` rescales
each parameter's gradient on its own, ``g_p <- g_p * c / (||g_p|| + 1e-6)`` when that factor is < 1 (DINO/iBOT's
``utils.clip_gradients``). MAE and APL do not clip (``clip_grad: 0``).

``optim.schedule: linear_cosine_epochs`` is APL's schedule instead (le0x99/self-supervised-vision-transformers,
``APL/PreTrainer.py``, ``Trainer.train``): ``ChainedScheduler([LinearLR(start_factor=f, total_iters=W),
CosineAnnealingLR(T_max=E, eta_min=lr_min)])`` stepped once per epoch, so the lr is constant within an epoch and
follows torch's recursive forms after ``e`` epochs (:func:`chained_linear_cosine_lrs`), starting at ``f * lr0``.

Weight-decay exclusions (``optim.weight_decay_exclude``): ``bias_norm`` (default) is DINO's ``utils.get_params_groups``
(``name.endswith(".bias") or len(param.shape) == 1``; iBOT copies it, MAE's pre-training ``optim_factory.add_weight_decay``
and I-JEPA's ``init_opt`` do the same): biases and norms only, so ``pos_embed``, the CLS / mask tokens and LayerScale
gains... are decayed when they have more than one dimension. ``bias_norm_tokens`` also exempts every parameter whose
name holds ``pos_embed`` or ``token`` (the platform's earlier rule, as timm's ``no_weight_decay()`` names for
fine-tuning); ``none`` decays every parameter (fairseq's Adam in data2vec's image pre-training: no exclusions).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

LR_REFERENCE_BATCH = 256  # lr_scaling: linear -> lr * global_batch / 256


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """``lr(t) / lr0`` (see the module docstring) with ``lr_min = min_lr_ratio * lr0``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def cosine_value(step: int, total_steps: int, start: float, end: float) -> float:
    """``end + (start - end) * (1 + cos(pi * t / T)) / 2``, clamped to ``[0, T]`` (the weight-decay schedule)."""
    progress = min(1.0, max(0, step) / max(1, total_steps))
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def base_lr(optim: DictConfig, global_batch: int) -> float:
    """``optim.lr``, times ``global_batch / 256`` with ``optim.lr_scaling: linear``."""
    scale = global_batch / LR_REFERENCE_BATCH if optim.get("lr_scaling", "none") == "linear" else 1.0
    return float(optim.lr) * scale


WEIGHT_DECAY_EXCLUDES = ("bias_norm", "bias_norm_tokens", "none")
SCHEDULES = ("warmup_cosine", "linear_cosine_epochs")


def no_weight_decay(name: str, p: torch.Tensor, exclude: str = "bias_norm") -> bool:
    """Whether parameter ``name`` is exempt from weight decay under ``exclude`` (module docstring)."""
    if exclude == "none":
        return False
    if name.endswith(".bias") or p.ndim <= 1:  # DINO's get_params_groups
        return True
    return exclude == "bias_norm_tokens" and ("token" in name or "pos_embed" in name)


def param_groups(model: torch.nn.Module, weight_decay: float, exclude: str = "bias_norm") -> list[dict]:
    """Two groups: decayed (``"decayed": True``; the weight-decay schedule changes only that one) and exempt
    (:func:`no_weight_decay`). Frozen parameters are left out, as in DINO."""
    if exclude not in WEIGHT_DECAY_EXCLUDES:
        raise ValueError(f"optim.weight_decay_exclude: expected one of {list(WEIGHT_DECAY_EXCLUDES)}, got {exclude!r}")
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if no_weight_decay(name, p, exclude) else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "decayed": True},
        {"params": no_decay, "weight_decay": 0.0, "decayed": False},
    ]


def chained_linear_cosine_lrs(lr0: float, lr_min: float, start_factor: float, warmup_epochs: int, epochs: int) -> list[float]:
    """The lr of each epoch ``0..epochs`` under APL's ``ChainedScheduler([LinearLR, CosineAnnealingLR])`` stepped per
    epoch, from torch's recursive ``get_lr`` forms (``W = warmup_epochs``, ``T = epochs``, ``lr_0 = f * lr0``):

        LinearLR, e <= W:  lr <- lr * (1 + (1 - f) / (W f + (e - 1)(1 - f)))      (e > W: unchanged)
        Cosine:            lr <- (1 + cos(pi e / T)) / (1 + cos(pi (e - 1) / T)) * (lr - lr_min) + lr_min

    (the cosine's other branch, ``(e - 1 - T) % 2T == 0``, only occurs after the last epoch). With ``W = 0`` the start
    factor is never undone, as in torch (``int(0.05 * E)`` is 0 for ``E < 20``)."""
    lr, out = lr0 * start_factor, [lr0 * start_factor]
    for e in range(1, epochs + 1):
        if e <= warmup_epochs:
            lr *= 1.0 + (1.0 - start_factor) / (warmup_epochs * start_factor + (e - 1) * (1.0 - start_factor))
        if (e - 1 - epochs) % (2 * epochs) == 0:
            lr += (lr0 - lr_min) * (1.0 - math.cos(math.pi / epochs)) / 2.0
        else:
            lr = (1.0 + math.cos(math.pi * e / epochs)) / (1.0 + math.cos(math.pi * (e - 1) / epochs)) * (lr - lr_min) + lr_min
        out.append(lr)
    return out


def build_optimizer(model: torch.nn.Module, optim: DictConfig, device: torch.device) -> torch.optim.Optimizer:
    kwargs = {"lr": optim.lr, "betas": tuple(optim.betas)}
    if device.type in ("cuda", "cpu"):
        # fused AdamW (CUDA; CPU since torch 2.4): on CPU 2.9x faster per optimizer step than the default
        # for-loop implementation in benchmarks/README.md
        kwargs["fused"] = True
    groups = param_groups(model, optim.weight_decay, optim.get("weight_decay_exclude", "bias_norm"))
    return torch.optim.AdamW(groups, **kwargs)


class StepSchedule:
    """Sets every group's ``lr`` and the decayed group's ``weight_decay`` for the coming step (module docstring).

    Used like a torch LR scheduler: :meth:`step` after ``optimizer.step()``; ``state_dict()`` holds the number of
    steps taken, so a resumed run continues both schedules where they were. A ``LambdaLR`` state from older
    checkpoints (``last_epoch`` = steps taken) loads too.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, optim: DictConfig, steps_per_epoch: int, global_batch: int = LR_REFERENCE_BATCH):
        self.optimizer = optimizer
        self.total_steps = int(optim.epochs * steps_per_epoch)
        self.warmup_steps = int(round(optim.warmup_epochs * steps_per_epoch))
        self.lr0 = base_lr(optim, global_batch)
        min_lr = optim.get("min_lr")
        self.min_lr = float(min_lr) if min_lr is not None else float(optim.min_lr_ratio) * self.lr0
        self.wd0 = float(optim.weight_decay)
        wd_end = optim.get("weight_decay_end")
        self.wd_end = float(wd_end) if wd_end is not None else self.wd0
        self.steps_per_epoch = max(1, int(steps_per_epoch))
        self.epoch_lrs: list[float] | None = None  # linear_cosine_epochs: the lr of each epoch
        if optim.get("schedule", "warmup_cosine") == "linear_cosine_epochs":
            self.epoch_lrs = chained_linear_cosine_lrs(
                self.lr0, self.min_lr, float(optim.get("warmup_start_factor", 0.5)), int(optim.warmup_epochs), int(optim.epochs)
            )
        self.steps_taken = 0
        self._apply()

    def lr_at(self, step: int) -> float:
        if self.epoch_lrs is not None:
            return self.epoch_lrs[min(max(step, 0) // self.steps_per_epoch, len(self.epoch_lrs) - 1)]
        ratio = self.min_lr / self.lr0 if self.lr0 > 0 else 0.0
        return self.lr0 * lr_factor(step, self.total_steps, self.warmup_steps, ratio)

    def weight_decay_at(self, step: int) -> float:
        return cosine_value(step, self.total_steps, self.wd0, self.wd_end)

    def _apply(self) -> None:
        lr, wd = self.lr_at(self.steps_taken), self.weight_decay_at(self.steps_taken)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
            if group.get("decayed", group["weight_decay"] > 0):
                group["weight_decay"] = wd

    def step(self) -> None:
        self.steps_taken += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    @property
    def weight_decay(self) -> float:
        """The decayed group's current weight decay."""
        return self.weight_decay_at(self.steps_taken)

    def state_dict(self) -> dict[str, Any]:
        return {"steps_taken": self.steps_taken}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps_taken = int(state["steps_taken"] if "steps_taken" in state else state["last_epoch"])
        self._apply()


def build_scheduler(optimizer: torch.optim.Optimizer, optim: DictConfig, steps_per_epoch: int, global_batch: int = LR_REFERENCE_BATCH) -> StepSchedule:
    """The per-step lr + weight-decay schedule; ``global_batch`` (all workers) matters for ``lr_scaling: linear``."""
    return StepSchedule(optimizer, optim, steps_per_epoch, global_batch)


@torch.no_grad()
def clip_per_param(parameters, max_norm: float) -> None:
    """DINO's ``utils.clip_gradients``: ``g_p <- g_p * c / (||g_p||_2 + 1e-6)`` for each parameter where that is < 1.

    All norms and factors stay on the device (a factor of exactly 1 where no clipping is due): no host
    synchronisation per parameter on a GPU."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    coefs = (max_norm / (torch.stack(torch._foreach_norm(grads)) + 1e-6)).clamp_(max=1.0)
    torch._foreach_mul_(grads, list(coefs.unbind()))


def clip_gradients(parameters: nn.Module | Iterable[torch.Tensor], optim: DictConfig, total_norm: torch.Tensor | None = None) -> None:
    """Clip the gradients of ``parameters`` (a module or parameters) as ``optim.clip_mode`` says; nothing when
    ``optim.clip_grad`` is 0. ``total_norm`` (the global gradient norm, if the caller has it already) saves
    recomputing it in ``global`` mode."""
    if optim.clip_grad <= 0:
        return
    params = [p for p in (parameters.parameters() if isinstance(parameters, nn.Module) else parameters) if p.grad is not None]
    if optim.get("clip_mode", "global") == "per_param":
        clip_per_param(params, optim.clip_grad)
    elif total_norm is not None:
        torch.nn.utils.clip_grads_with_norm_(params, optim.clip_grad, total_norm)
    else:
        torch.nn.utils.clip_grad_norm_(params, optim.clip_grad)


def maybe_sync_batchnorm(model: nn.Module, world_size: int, device: torch.device) -> nn.Module:
    """BatchNorm layers (e.g. heads with ``use_bn_in_head``) -> ``SyncBatchNorm`` when ``world_size > 1``, as DINO
    converts student and teacher, so batch statistics are over the global batch. Weights and running statistics are
    kept. torch's SyncBatchNorm runs only on accelerators: on CPU (gloo) each worker keeps per-worker statistics."""
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if world_size <= 1 or device.type == "cpu" or not has_bn:
        return model
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)
