"""A step hook that tests install in Ray Train workers (importable there as ``tests.tracking_hooks``): rank 0 marks
the start of every epoch with a time stamp, and holds chosen epochs until the test opens them (to order a tracking
server's outage against training)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from ssl_platform.data.streaming import ImageBatch
from ssl_platform.training.hooks import StepHook, StepInfo


@dataclass
class EpochGates(StepHook):
    """Rank 0 writes ``mark-<epoch>`` (1-based) at an epoch's first step; for an epoch in ``gates`` it then waits for
    ``open-<epoch>`` (written by the test); ``start-<epoch>`` holds the time training of the epoch began. Every step
    sleeps ``step_sleep_s`` (epochs long enough to be measured)."""

    directory: str
    gates: tuple[int, ...] = ()
    step_sleep_s: float = 0.0

    def before_step(self, info: StepInfo, batch: ImageBatch) -> None:
        if info.rank == 0 and info.step == 0:
            d, epoch = Path(self.directory), info.epoch + 1
            d.mkdir(parents=True, exist_ok=True)
            (d / f"mark-{epoch}").write_text(repr(time.time()))
            deadline = time.time() + 300
            while epoch in self.gates and not (d / f"open-{epoch}").exists() and time.time() < deadline:
                time.sleep(0.1)
            (d / f"start-{epoch}").write_text(repr(time.time()))
        if self.step_sleep_s:
            time.sleep(self.step_sleep_s)


def epoch_times(directory: str | Path, epochs: int) -> list[float]:
    """Seconds from the start of training each epoch to the mark of the next (its steps, evaluation, report and
    MLflow logging; a gate's wait excluded), for epochs 1 .. ``epochs - 1``."""
    d = Path(directory)
    return [float((d / f"mark-{e + 1}").read_text()) - float((d / f"start-{e}").read_text()) for e in range(1, epochs)]
