"""Step hooks: code a caller installs into the worker loop (``run_experiment(..., step_hooks=[...])``).

The spec never names hooks: they are Python objects (picklable, shipped to every worker) for what a YAML
should not express, such as the fault injection of the tests (:class:`KillWorkerOnce`, :class:`PoisonLoss`).
A hook sees each step and its batch before it runs (:meth:`StepHook.before_step`) and may replace its loss
(:meth:`StepHook.transform_loss`).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ssl_platform.streaming import ImageBatch


@dataclass(frozen=True)
class StepInfo:
    """Where the loop is: ``epoch`` and ``step`` count from 0 (``step`` within the epoch)."""

    run_name: str
    rank: int
    epoch: int
    step: int
    steps_per_epoch: int
    global_step: int


class StepHook:
    """Base class: both calls do nothing."""

    def before_step(self, info: StepInfo, batch: ImageBatch) -> None:
        """Called before the step's forward pass, with its uint8 batch (on the host)."""

    def transform_loss(self, loss: torch.Tensor, info: StepInfo) -> torch.Tensor:
        """The loss the step back-propagates (default: unchanged)."""
        return loss


@dataclass
class KillWorkerOnce(StepHook):
    """Rank ``rank`` exits (``os._exit(1)``) in the middle of epoch ``epoch`` (1-based), once per run name: a marker
    file under ``marker_dir`` keeps the restarted worker group from dying again."""

    epoch: int
    rank: int = 1
    marker_dir: str = str(Path(tempfile.gettempdir()) / "ssl_platform_faults")

    def marker(self, run_name: str) -> Path:
        return Path(self.marker_dir) / f"killed-{run_name}"

    def before_step(self, info: StepInfo, batch: ImageBatch) -> None:
        if info.rank != self.rank or info.epoch + 1 != self.epoch or info.step != info.steps_per_epoch // 2:
            return
        marker = self.marker(info.run_name)
        if marker.exists():
            return
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(str(os.getpid()))
        print(f"[fault] rank {info.rank} exits during epoch {info.epoch + 1}", flush=True)
        os._exit(1)


@dataclass
class PoisonLoss(StepHook):
    """The loss of global step ``at_step`` (0-based) becomes NaN."""

    at_step: int

    def transform_loss(self, loss: torch.Tensor, info: StepInfo) -> torch.Tensor:
        return loss * float("nan") if info.global_step == self.at_step else loss
