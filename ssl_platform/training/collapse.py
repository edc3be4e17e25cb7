"""Collapse warnings: a health metric (:mod:`methods.health`) past its collapse threshold for a sustained window.

Rank 0 feeds every health reading (one per log interval, at its global step) to :meth:`CollapseMonitor.observe`;
a metric that stays past its bound at every reading for at least ``window_steps`` steps gives one
:class:`CollapseEvent` (once per metric and run). A reading back on the healthy side restarts its window.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class CollapseRule:
    """Collapse when ``metric`` is below ``bound`` (``below=True``) or above it."""

    metric: str
    bound: float
    below: bool
    meaning: str

    def crossed(self, value: float) -> bool:
        return value < self.bound if self.below else value > self.bound


@dataclass(frozen=True)
class CollapseEvent:
    rule: CollapseRule
    value: float
    since_step: int
    step: int

    def message(self, embedding_dim: int | None = None) -> str:
        m = self.rule.metric
        shown = f"{self.value:.1%} of {embedding_dim}" if m == "rank_fraction" and embedding_dim else f"{self.value:.4g}"
        side = "below" if self.rule.below else "above"
        return (f"collapse warning: {m} {shown} ({side} {self.rule.bound:g}: {self.rule.meaning}) "
                f"for {self.step - self.since_step} steps (since step {self.since_step})")


def collapse_rules(health: Mapping) -> list[CollapseRule]:
    """The rules of the spec's ``eval.health`` section (a threshold of ``None`` switches its rule off)."""
    table = (
        ("rank_fraction", "rank_fraction_below", True, "the embeddings span few directions"),
        ("normalized_std", "normalized_std_below", True, "the normalised embeddings barely vary over the batch"),
        ("teacher_entropy", "teacher_entropy_above", False, "the teacher's output is near uniform"),
        ("student_teacher_kl", "student_teacher_kl_below", True, "the student matches the teacher trivially"),
        ("target_scale", "target_scale_below", True, "the regression targets are near constant"),
    )
    return [CollapseRule(metric, float(health[key]), below, meaning)
            for metric, key, below, meaning in table if health.get(key) is not None]


class CollapseMonitor:
    """Tracks, per rule, since which step its metric has been past the bound at every reading."""

    def __init__(self, rules: list[CollapseRule], window_steps: int):
        self.rules, self.window_steps = rules, int(window_steps)
        self._since: dict[str, int] = {}
        self.fired: dict[str, CollapseEvent] = {}

    def observe(self, step: int, values: Mapping[str, float]) -> list[CollapseEvent]:
        """The events that fire at this reading (each metric fires at most once per run)."""
        events = []
        for rule in self.rules:
            if rule.metric not in values:
                continue
            value = float(values[rule.metric])
            if not rule.crossed(value):
                self._since.pop(rule.metric, None)
                continue
            since = self._since.setdefault(rule.metric, step)
            if step - since >= self.window_steps and rule.metric not in self.fired:
                self.fired[rule.metric] = event = CollapseEvent(rule, value, since, step)
                events.append(event)
        return events
