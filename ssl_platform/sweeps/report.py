"""What a sweep reports: one :class:`TrialRow` per trial, the best one, a table, a CSV file and a plot.

:func:`collect_rows` reads Tune's ``ResultGrid`` (swept values, last reported metric, epochs done, status:
``COMPLETED``, ``STOPPED_EARLY`` by the scheduler, ``ERROR`` or ``NOT_RUN``); :func:`best_row` picks the best
scored trial for the sweep's mode. No Ray or MLflow calls here.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ssl_platform.sweeps.sweep_spec import SweepSpec, _is_number


@dataclass
class TrialRow:
    trial_id: str
    values: dict[str, Any]
    metric: float | None
    epochs: int
    status: str
    run_id: str | None = None
    history: list[tuple[int, float]] = field(default_factory=list)  # (epoch, metric) of every report


@dataclass
class SweepResult:
    name: str
    metric: str
    mode: str
    rows: list[TrialRow]
    best: TrialRow | None
    parent_run_id: str
    out_dir: Path
    experiment_path: str
    files: dict[str, Path] = field(default_factory=dict)
    state_uri: str = ""  # <checkpoint.uri>/sweeps/<name>: sweep.json and Tune's experiment (for --resume)


def collect_rows(grid, sweep: SweepSpec) -> list[TrialRow]:
    """One row per trial: swept values, last reported metric, epochs done and a status."""
    rows = []
    max_t = sweep.scheduler.max_t or int(sweep.base.optim.epochs)
    for res in grid:
        metrics = res.metrics or {}
        trial_id = metrics.get("trial_id") or Path(res.path).name
        value = metrics.get(sweep.metric)
        epochs = int(metrics.get("epoch", 0) or 0)
        if res.error is not None:
            status = "ERROR"
        elif not metrics:
            status = "NOT_RUN"
        elif epochs < max_t:
            status = "STOPPED_EARLY"
        else:
            status = "COMPLETED"
        config = res.config or {}
        rows.append(TrialRow(
            trial_id=str(trial_id), values={p.key: config.get(p.key) for p in sweep.params},
            metric=float(value) if _is_number(value) and math.isfinite(value) else None, epochs=epochs, status=status,
            history=_history(getattr(res, "metrics_dataframe", None), sweep.metric),
        ))
    rows.sort(key=lambda r: r.trial_id)
    return rows


def _history(frame, metric: str) -> list[tuple[int, float]]:
    """``(epoch, metric)`` of every report of a trial (Tune's ``Result.metrics_dataframe``), finite values only."""
    if frame is None or metric not in getattr(frame, "columns", ()) or "epoch" not in frame.columns:
        return []
    out = []
    for epoch, value in zip(frame["epoch"], frame[metric]):
        if _is_number(value) and math.isfinite(value) and _is_number(epoch):
            out.append((int(epoch), float(value)))
    return out


def best_row(rows: list[TrialRow], mode: str) -> TrialRow | None:
    scored = [r for r in rows if r.metric is not None and r.status != "ERROR"]
    if not scored:
        return None
    return (max if mode == "max" else min)(scored, key=lambda r: r.metric)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def results_table(result: SweepResult) -> str:
    keys = [k for k in (result.rows[0].values if result.rows else {})]
    header = ["trial", *keys, result.metric, "epochs", "status", ""]
    body = [
        [r.trial_id, *(_fmt(r.values[k]) for k in keys), _fmt(r.metric), str(r.epochs), r.status,
         "best" if result.best is not None and r.trial_id == result.best.trial_id else ""]
        for r in result.rows
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    line = "-" * (sum(widths) + 3 * (len(widths) - 1))
    fmt_row = lambda cells: " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line, fmt_row(header), line, *(fmt_row(b) for b in body), line])


def write_csv(rows: list[TrialRow], sweep: SweepSpec, path: Path) -> Path:
    keys = [p.key for p in sweep.params]
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["trial_id", *keys, sweep.metric, "epochs", "status", "mlflow_run_id"])
        for r in rows:
            w.writerow([r.trial_id, *(json.dumps(r.values[k]) if isinstance(r.values[k], list) else r.values[k] for k in keys),
                        "" if r.metric is None else r.metric, r.epochs, r.status, r.run_id or ""])
    return path


STATUS_COLORS = {"COMPLETED": "tab:blue", "STOPPED_EARLY": "tab:orange", "ERROR": "tab:red", "NOT_RUN": "tab:gray"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _status_legend(ax, statuses: set[str]) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], marker="o", linestyle="", color=STATUS_COLORS[s], label=s.lower().replace("_", " "))
               for s in STATUS_COLORS if s in statuses]
    if handles:
        ax.legend(handles=handles, fontsize=7, loc="best")


def write_plot(rows: list[TrialRow], sweep: SweepSpec, path: Path) -> Path:
    """The metric against each swept parameter (one panel each; categorical axes for non-numeric values)."""
    plt = _pyplot()
    n = len(sweep.params)
    fig, axes = plt.subplots(1, n, figsize=(max(4.8, 4.2 * n), 3.6), squeeze=False)
    colors = STATUS_COLORS
    for ax, p in zip(axes[0], sweep.params):
        pts = [(r.values[p.key], r.metric, r.status) for r in rows if r.metric is not None]
        numeric = all(_is_number(x) for x, _, _ in pts)
        if numeric:
            xs = [x for x, _, _ in pts]
        else:
            cats = sorted({str(x) for x, _, _ in pts})
            xs = [cats.index(str(x)) for x, _, _ in pts]
            ax.set_xticks(range(len(cats)), cats, rotation=20, fontsize=8)
        ax.scatter(xs, [y for _, y, _ in pts], c=[colors.get(s, "k") for _, _, s in pts], s=36)
        if p.kind == "loguniform":
            ax.set_xscale("log")
        ax.set_xlabel(p.key)
        ax.set_ylabel(f"{sweep.metric} ({sweep.mode})")
        ax.grid(alpha=0.3)
        _status_legend(ax, {s for _, _, s in pts})
    fig.suptitle(f"sweep {sweep.name}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_curves(rows: list[TrialRow], sweep: SweepSpec, path: Path) -> Path:
    """The sweep metric against epoch, one line per trial; an early-stopped trial's line ends in an ``x``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    for r in rows:
        if not r.history:
            continue
        epochs, values = zip(*r.history)
        label = f"{r.trial_id}: " + ", ".join(f"{k.split('.')[-1]}={_fmt(v)}" for k, v in r.values.items())
        (line,) = ax.plot(epochs, values, marker=".", linewidth=1.2, label=label[:60])
        if r.status == "STOPPED_EARLY":
            ax.plot(epochs[-1], values[-1], marker="x", markersize=9, color=line.get_color())
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"{sweep.metric} ({sweep.mode})")
    ax.grid(alpha=0.3)
    ax.set_title(f"sweep {sweep.name}: x = stopped early", fontsize=10)
    if len(rows) <= 12:
        ax.legend(fontsize=6, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
