"""Scheduled hyper-parameters of teacher-student methods, as small pure functions.

* EMA momentum, cosine from ``start`` to ``end`` over training (BYOL, Grill et al. 2020; DINO, Caron et al.
  2021, arXiv 2104.14294):  ``m(t) = end - (end - start) * (1 + cos(pi * t / T)) / 2``.
* DINO teacher temperature (``main_dino.py``, ``DINOLoss.__init__``): a per-epoch table
  ``np.concatenate((np.linspace(warmup, final, W), np.ones(E - W) * final))`` read at the INTEGER epoch, so
  ``tau(e) = warmup + (final - warmup) * e / (W - 1)`` for ``e < W`` (``warmup`` for all of epoch 0, ``final``
  from epoch ``W - 1`` on; ``W = 1``: ``warmup`` in epoch 0 only) and ``final`` for ``e >= W``. iBOT uses the same table.
* DINOv2 teacher temperature (Oquab et al. 2023, ``dinov2/train/train.py`` ``build_schedulers``): linear per STEP over
  ``W`` warm-up steps, ``tau(t) = warmup + (final - warmup) * t / (W - 1)`` for ``t < W``, then ``final``.
"""

from __future__ import annotations

import math


def cosine_ema_momentum(step: int, total_steps: int, start: float, end: float) -> float:
    """EMA momentum at ``step`` of ``total_steps``: ``start`` at step 0, ``end`` at ``total_steps``."""
    if total_steps <= 0:
        return float(end)
    t = min(max(step, 0), total_steps)
    return float(end - (end - start) * (1.0 + math.cos(math.pi * t / total_steps)) / 2.0)


def teacher_temperature(epoch: float, warmup: float, final: float, warmup_epochs: float) -> float:
    """DINO's teacher temperature during (fractional) ``epoch``: its per-epoch table at ``floor(epoch)``, i.e.
    ``np.linspace(warmup, final, W)[e]`` for ``e < W = int(warmup_epochs)``, else ``final`` (module docstring)."""
    w = int(warmup_epochs)
    e = int(math.floor(max(epoch, 0.0)))
    if w <= 0 or e >= w:
        return float(final)
    if w == 1:
        return float(warmup)
    return float(warmup + (final - warmup) * e / (w - 1))


def linear_warmup(step: int, warmup_steps: int, start: float, end: float) -> float:
    """A per-step linear warm-up, DINOv2's teacher temperature (``CosineScheduler`` with ``base_value = final_value =
    end``, ``warmup_iters = total_iters = W``): ``np.linspace(start, end, W)[step]`` for ``step < W``, else ``end``."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return float(end)
    if warmup_steps == 1:
        return float(start)
    return float(start + (end - start) * max(step, 0) / (warmup_steps - 1))
