"""Console progress of a training run (rank 0): a line per step interval, a summary line per epoch.

The training loop calls :meth:`Progress.update` every ``log_every`` steps (and on an epoch's last step) with
numbers it already holds on the host (the loss as a Python float, the images seen in the epoch), and
:meth:`Progress.end_epoch` once per epoch. Between those, it asks :meth:`Progress.line_due` after every step: a
line is also due at the ``FIRST_LINE_STEP``-th step of the process and whenever ``EVERY_S`` seconds passed without
one, so a long epoch (200k images at batch 16: 12,500 steps) shows it is alive from its first steps. Nothing here
touches the device or Ray.

* step line: ``[run] epoch 3/30 step 22/44 loss 0.1234 lr 1.0e-03 | 812 img/s | ETA 4m12s``
* on a terminal the step lines redraw one bar in place (``|#####-----|``) instead of scrolling; a Ray worker's
  stdout is a log file (streamed to the driver line by line), so runs under Ray print lines;
* epoch line: ``[run] epoch 3/30 done in 12.3s: loss 0.1234, 812 img/s, knn_top1 0.6500 | ETA 4m12s``.

``images/s`` counts the images of all workers in the current epoch over its wall time; the ETA extrapolates
the pace of the steps done since this process finished its first step (a resumed run's restored epochs do not
count as fast steps, and the first step's start-up -- worker set-up, the data pipeline's first decode, kernel
warm-up -- does not make every later ETA too long).
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any

BAR_WIDTH = 24
FIRST_LINE_STEP = 10  # the first step line at the latest after this many steps of the process
EVERY_S = 30.0  # and then at least this often
# Ray Train's worker logs every report as "Reporting training result N: TrainingReport(...)" at INFO through the
# `ray` logger's console handler (RunConfig's LoggingConfig does not reach it); that module's logger is named by its
# file path, so it is found through the module. Our step/epoch lines say the same in one line.
QUIET_MODULES = ("ray.train.v2._internal.execution.context",)


def quiet_ray_train_logs() -> None:
    """In a Train worker: drop Ray Train's per-report INFO dumps; its warnings and errors still show."""
    import importlib
    import logging

    for name in QUIET_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:  # another Ray version: nothing to quieten
            continue
        log = getattr(module, "logger", None)
        if isinstance(log, logging.Logger):
            log.setLevel(logging.WARNING)


def format_duration(seconds: float) -> str:
    """``75`` -> ``1m15s``; ``4000`` -> ``1h06m``; ``9`` -> ``9s``."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def default_log_every(steps_per_epoch: int) -> int:
    """About four step lines per epoch."""
    return max(1, steps_per_epoch // 4)


class Progress:
    """Step and epoch lines of one run on one process (call it on rank 0 only)."""

    def __init__(
        self,
        run_name: str,
        epochs: int,
        steps_per_epoch: int,
        *,
        start_epoch: int = 0,
        stream: IO[str] | None = None,
        is_terminal: bool | None = None,
        clock=time.perf_counter,
    ):
        self.run_name, self.epochs, self.steps_per_epoch = run_name, int(epochs), max(1, int(steps_per_epoch))
        self.stream = stream if stream is not None else sys.stdout
        isatty = getattr(self.stream, "isatty", None)
        self.is_terminal = bool(isatty and isatty()) if is_terminal is None else is_terminal
        self._clock = clock
        self._t_start = clock()
        self._first_step = start_epoch * self.steps_per_epoch  # global steps already done before this process
        self._steps_done = self._first_step
        self._epoch_t0 = self._t_start  # start_epoch() sets it; else the end of the previous epoch
        self._bar_open = False
        self._pace_from: tuple[float, int] | None = None  # (time, global step) at the end of the first step
        self._last_line_t = self._t_start
        self._lines = 0

    # ---- numbers ---------------------------------------------------------------------------------------
    def _global_step(self, epoch: int, step: int) -> int:
        return (epoch - 1) * self.steps_per_epoch + step

    def eta_s(self) -> float | None:
        """Seconds left at the pace of this process's steps after its first one (None before the first step)."""
        done = self._steps_done - self._first_step
        if done <= 0:
            return None
        if self._pace_from is not None and self._steps_done > self._pace_from[1]:
            t0, step0 = self._pace_from
            per_step = (self._clock() - t0) / (self._steps_done - step0)
        else:  # only the first step done (or no line_due calls): the pace since start
            per_step = (self._clock() - self._t_start) / done
        return per_step * (self.epochs * self.steps_per_epoch - self._steps_done)

    def _epoch_elapsed(self) -> float:
        return max(1e-9, self._clock() - self._epoch_t0)

    def _eta_text(self) -> str:
        eta = self.eta_s()
        return "ETA -" if eta is None else f"ETA {format_duration(eta)}"

    # ---- calls from the training loop ------------------------------------------------------------------
    def line_due(self, epoch: int, step: int) -> bool:
        """Called after every step (``epoch`` and ``step`` from 1): whether a step line is due before the regular
        ones -- at the ``FIRST_LINE_STEP``-th step of this process if none came yet, then after ``EVERY_S`` seconds
        without a line. The first call also starts the pace the ETA uses."""
        now, global_step = self._clock(), self._global_step(epoch, step)
        if self._pace_from is None:
            self._pace_from = (now, global_step)
        if self._lines == 0 and global_step - self._first_step >= FIRST_LINE_STEP:
            return True
        return now - self._last_line_t >= EVERY_S

    def update(self, epoch: int, step: int, loss: float, images_seen: int, lr: float | None = None,
               extra: str = "") -> None:
        """``epoch`` and ``step`` count from 1; ``images_seen``: images of all workers so far in this epoch; ``extra``:
        a note appended to the line (e.g. health metrics past their collapse bound)."""
        self._steps_done = self._global_step(epoch, step)
        ips = images_seen / self._epoch_elapsed()
        lr_text = f" lr {lr:.1e}" if lr is not None else ""
        head = f"[{self.run_name}] epoch {epoch}/{self.epochs}"
        tail = f"loss {loss:.4f}{lr_text} | {ips:.0f} img/s | {self._eta_text()}" + (f" | {extra}" if extra else "")
        if self.is_terminal:
            filled = int(BAR_WIDTH * step / self.steps_per_epoch)
            bar = "#" * filled + "-" * (BAR_WIDTH - filled)
            self.stream.write(f"\r{head} |{bar}| {step}/{self.steps_per_epoch} {tail}\033[K")
            self._bar_open = True
        else:
            self.stream.write(f"{head} step {step}/{self.steps_per_epoch} {tail}\n")
        self.stream.flush()
        self._lines += 1
        self._last_line_t = self._clock()

    def start_epoch(self, epoch: int) -> None:
        """Start the epoch's clock (without it: at the previous :meth:`end_epoch`, or at construction)."""
        self._epoch_t0 = self._clock()

    def end_epoch(self, epoch: int, metrics: dict[str, Any]) -> None:
        """One summary line: loss, images/s, epoch time and any evaluation metric (``knn_top1``, ``linear_top1``)."""
        self._steps_done = self._global_step(epoch, self.steps_per_epoch)
        parts = []
        if "loss" in metrics:
            parts.append(f"loss {float(metrics['loss']):.4f}")
        if "images_per_sec" in metrics:
            parts.append(f"{float(metrics['images_per_sec']):.0f} img/s")
        for key in ("knn_top1", "linear_top1", "online_probe_top1"):
            if key in metrics:
                parts.append(f"{key} {float(metrics[key]):.4f}")
        seconds = metrics.get("epoch_time_s", self._epoch_elapsed())
        end = self._eta_text() if epoch < self.epochs else "last epoch"
        prefix = "\n" if self._bar_open else ""
        self._bar_open = False
        self.stream.write(f"{prefix}[{self.run_name}] epoch {epoch}/{self.epochs} done in {float(seconds):.1f}s: "
                          f"{', '.join(parts)} | {end}\n")
        self.stream.flush()
        self._epoch_t0 = self._last_line_t = self._clock()
