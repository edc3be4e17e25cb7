"""Scheduled hyper-parameters of teacher-student methods, as small pure functions.

* EMA momentum, cosine from ``start`` to ``end`` over training (BYOL, Grill et al. 2020; DINO, Caron et al.
  2021, arXiv 2104.14294):  ``m(t) = end - (end - start) * (1 + cos(pi * t / T)) / 2``.
* DINO teacher temperature: linear in (fractional) epochs from ``warmup`` to ``final`` over ``warmup_epochs``
  epochs, then constant:  ``tau(e) = warmup + (final - warmup) * min(e / warmup_epochs, 1)``.
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
    """DINO teacher temperature at fractional ``epoch``: linear warm-up then constant ``final``."""
    if warmup_epochs <= 0:
        return float(final)
    frac = min(max(epoch, 0.0) / warmup_epochs, 1.0)
    return float(warmup + (final - warmup) * frac)
