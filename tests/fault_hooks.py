"""Fault-injection step hooks that tests install in Ray Train workers (importable there as ``tests.fault_hooks``)."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ssl_platform.data.streaming import ImageBatch
from ssl_platform.training.hooks import StepHook, StepInfo


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


@dataclass
class ConstantEncoder(StepHook):
    """A deliberately collapsed encoder: a forward hook makes the last block of ``method.encoder`` give every image
    the same tokens (their batch mean, so gradients still flow), the collapse the health metrics must catch."""

    def setup(self, method: torch.nn.Module) -> None:
        method.encoder.blocks[-1].register_forward_hook(_constant_output)


def _constant_output(module: torch.nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
    return output.mean(dim=0, keepdim=True).expand_as(output)
