"""Step hooks: code a caller installs into the worker loop (``run_experiment(..., step_hooks=[...])``).

The spec never names hooks: they are Python objects (picklable, shipped to every worker) for what a YAML
should not express, such as the fault injection of the tests (``tests/fault_hooks.py``).
A hook sees the method once when the worker builds it (:meth:`StepHook.setup`), each step and its batch before
it runs (:meth:`StepHook.before_step`) and may replace its loss (:meth:`StepHook.transform_loss`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ssl_platform.data.streaming import ImageBatch


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
    """Base class: every call does nothing."""

    def setup(self, method: torch.nn.Module) -> None:
        """Called once per worker with the built method, before its weights are restored or wrapped."""

    def before_step(self, info: StepInfo, batch: ImageBatch) -> None:
        """Called before the step's forward pass, with its uint8 batch (on the host)."""

    def transform_loss(self, loss: torch.Tensor, info: StepInfo) -> torch.Tensor:
        """The loss the step back-propagates (default: unchanged)."""
        return loss
