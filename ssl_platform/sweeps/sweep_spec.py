"""Sweep specs: a run spec plus a ``sweep:`` section, parsed and validated before Ray starts.

``sweep:`` holds metric, mode, num_samples, max_concurrent_trials, scheduler, searcher, seed, output_dir and
params. ``params`` maps dotted spec keys to one distribution each (``choice``, ``grid``, ``uniform``,
``loguniform``, ``randint``, ``quniform``); every key and both ends of every range are applied to the run spec
and validated (:func:`apply_values`), so a bad value is refused with the key before any trial runs.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from methods.registry import get_method_class
from ssl_platform.spec import SpecError, parse_overrides, read_yaml, spec_from_dict, to_container
from ssl_platform.spec import _check as _check

DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint", "quniform")
SCHEDULERS = ("asha", "fifo")
SEARCHERS = ("random", "optuna")
SWEEP_KEYS = ("metric", "mode", "num_samples", "max_concurrent_trials", "scheduler", "searcher", "seed", "output_dir", "params")
_ABSENT = object()


@dataclass
class Param:
    """One swept key: ``kind`` is a distribution name, ``args`` its values or [low, high(, q)]."""

    key: str
    kind: str
    args: list[Any]

    def describe(self) -> str:
        return f"{self.kind}{self.args}"


@dataclass
class SchedulerSpec:
    name: str = "asha"
    grace_period: int = 1
    reduction_factor: float = 2.0
    max_t: int | None = None


@dataclass
class SweepSpec:
    """A validated sweep: the base run spec (resolved) and the ``sweep:`` section."""

    name: str
    base: DictConfig
    metric: str
    mode: str
    params: list[Param]
    num_samples: int = 1
    max_concurrent_trials: int | None = None
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    searcher: str = "random"
    seed: int | None = None
    output_dir: str = "outputs/sweeps"
    source: str | None = None

    @property
    def out_dir(self) -> Path:
        return Path(self.output_dir) / self.name


def load_sweep(
    path: str | os.PathLike, overrides: list[str] | None = None, *, name: str | None = None, output_dir: str | None = None
) -> SweepSpec:
    """Read a sweep spec, apply dotlist overrides (``sweep.*`` included) and validate it all; no Ray needed."""
    source = str(path)
    raw = read_yaml(path)
    if overrides:
        raw = OmegaConf.to_container(OmegaConf.merge(OmegaConf.create(raw), parse_overrides(overrides)))
    section = raw.pop("sweep", None)
    if not isinstance(section, dict):
        raise SpecError("sweep", "a mapping with metric, mode and params (a sweep spec is a run spec plus `sweep:`)", section, source)
    base = spec_from_dict(raw, source=source)
    return parse_sweep_section(section, base, name=name, output_dir=output_dir, source=source)


def parse_sweep_section(
    section: dict[str, Any], base: DictConfig, *, name: str | None = None, output_dir: str | None = None, source: str | None = None
) -> SweepSpec:
    for key in section:
        _check(key in SWEEP_KEYS, f"sweep.{key}", f"one of {list(SWEEP_KEYS)}", key, source)
    metric = section.get("metric")
    _check(isinstance(metric, str) and metric != "", "sweep.metric", "a metric name reported by training (e.g. knn_top1, loss)", metric, source)
    mode = section.get("mode")
    _check(mode in ("min", "max"), "sweep.mode", "min or max", mode, source)
    num_samples = section.get("num_samples", 1)
    _check(_is_int(num_samples) and num_samples >= 1, "sweep.num_samples", "an integer >= 1", num_samples, source)
    mct = section.get("max_concurrent_trials")
    _check(mct is None or (_is_int(mct) and mct >= 1), "sweep.max_concurrent_trials", "an integer >= 1 (or null: as many as the CPUs fit)", mct, source)
    seed = section.get("seed")
    _check(seed is None or _is_int(seed), "sweep.seed", "an integer or null", seed, source)
    out = output_dir or section.get("output_dir") or "outputs/sweeps"
    _check(isinstance(out, str), "sweep.output_dir", "a directory path", out, source)
    scheduler = _parse_scheduler(section.get("scheduler", "asha"), base, source)
    searcher = _parse_searcher(section.get("searcher"), source)
    params_raw = section.get("params")
    _check(isinstance(params_raw, dict) and len(params_raw) > 0, "sweep.params", "a non-empty mapping of dotted spec keys to distributions", params_raw, source)
    params = [_parse_param(key, dist, base, source) for key, dist in params_raw.items()]
    if searcher == "optuna":
        for p in params:
            _check(p.kind != "grid", f"sweep.params.{p.key}", "choice or a range with searcher optuna (Optuna does not do grid search)", p.describe(), source)
            if p.kind == "choice":
                ok = all(v is None or isinstance(v, (bool, int, float, str)) for v in p.args)
                _check(ok, f"sweep.params.{p.key}", "scalar choices with searcher optuna", p.args, source)
    if metric == "knn_top1" and scheduler.name == "asha":
        every = base.eval.knn.every_epochs
        _check(base.eval.knn.enabled and every == 1, "eval.knn.every_epochs",
               "1 with sweep.metric knn_top1 and the ASHA scheduler (ASHA compares trials on every epoch)", every, source)
    sweep_name = name or base.name
    _check(isinstance(sweep_name, str) and sweep_name.strip() != "" and "/" not in sweep_name, "name",
           "a sweep name without '/'", sweep_name, source)
    return SweepSpec(
        name=sweep_name, base=base, metric=metric, mode=mode, params=params, num_samples=num_samples,
        max_concurrent_trials=mct, scheduler=scheduler, searcher=searcher, seed=seed, output_dir=out, source=source,
    )


def _parse_scheduler(raw: Any, base: DictConfig, source: str | None) -> SchedulerSpec:
    if isinstance(raw, str):
        raw = {"name": raw}
    _check(isinstance(raw, dict), "sweep.scheduler", f"one of {list(SCHEDULERS)} or a mapping with name", raw, source)
    allowed = ("name", "grace_period", "reduction_factor", "max_t")
    for key in raw:
        _check(key in allowed, f"sweep.scheduler.{key}", f"one of {list(allowed)}", key, source)
    name = raw.get("name", "asha")
    _check(name in SCHEDULERS, "sweep.scheduler.name", f"one of {list(SCHEDULERS)}", name, source)
    epochs = int(base.optim.epochs)
    grace = raw.get("grace_period", 1)
    _check(_is_int(grace) and 1 <= grace <= epochs, "sweep.scheduler.grace_period", f"an integer in [1, optim.epochs={epochs}]", grace, source)
    rf = raw.get("reduction_factor", 2)
    _check(_is_number(rf) and rf > 1, "sweep.scheduler.reduction_factor", "a number > 1", rf, source)
    max_t = raw.get("max_t", epochs)
    _check(_is_int(max_t) and grace <= max_t <= epochs, "sweep.scheduler.max_t",
           f"an integer in [grace_period={grace}, optim.epochs={epochs}] (epochs)", max_t, source)
    return SchedulerSpec(name=name, grace_period=grace, reduction_factor=float(rf), max_t=max_t)


def _parse_searcher(raw: Any, source: str | None) -> str:
    if raw is None:
        return "random"
    if isinstance(raw, dict):
        _check(set(raw) <= {"name"}, "sweep.searcher", "a name or {name: ...}", raw, source)
        raw = raw.get("name")
    _check(raw in SEARCHERS, "sweep.searcher", f"one of {list(SEARCHERS)} (random: Tune's random/grid variant generator)", raw, source)
    return raw


def _parse_param(key: Any, dist: Any, base: DictConfig, source: str | None) -> Param:
    where = f"sweep.params.{key}"
    form = f"a mapping with one of {list(DISTRIBUTIONS)}, e.g. {{choice: [0.5, 0.75]}} or {{uniform: [0.04, 0.07]}}"
    _check(isinstance(key, str) and key != "", "sweep.params", "dotted spec keys such as method.mask_ratio", key, source)
    _check(isinstance(dist, dict) and len(dist) == 1, where, form, dist, source)
    kind, args = next(iter(dist.items()))
    _check(kind in DISTRIBUTIONS, where, form, dist, source)
    current = current_value(base, key)
    if current is _ABSENT:
        raise SpecError(where, "a key of the run spec (a schema key such as optim.lr, or method.<constructor argument>)", key, source)
    if isinstance(current, DictConfig):
        raise SpecError(where, "a leaf key of the run spec (not a section)", key, source)
    if kind in ("choice", "grid"):
        _check(isinstance(args, list) and len(args) > 0, where, f"{kind}: a non-empty list of values", args, source)
        samples = list(args)
    else:
        n = 3 if kind == "quniform" else 2
        shape = "[low, high, q]" if kind == "quniform" else "[low, high]"
        _check(isinstance(args, list) and len(args) == n and all(_is_number(v) for v in args), where, f"{kind}: {shape} numbers", args, source)
        _check(args[0] < args[1], where, f"{kind}: {shape} with low < high", args, source)
        if kind == "loguniform":
            _check(args[0] > 0, where, "loguniform: [low, high] with 0 < low < high", args, source)
        if kind == "randint":
            _check(all(_is_int(v) for v in args), where, "randint: integer [low, high) bounds", args, source)
        if kind == "quniform":
            _check(args[2] > 0, where, "quniform: [low, high, q] with q > 0", args, source)
        numeric = _is_number(current)
        _check(numeric, where, f"a numeric spec key for {kind} ({key} is {type(current).__name__}: {current!r}); use choice or grid", current, source)
        if _is_int(current) and kind != "randint":
            raise SpecError(where, f"randint, choice or grid for the integer key {key} ({kind} gives floats)", dist, source)
        samples = [args[0], args[1] - 1 if kind == "randint" else args[1]]
    base_dict = to_container(base)
    for value in samples:
        try:
            apply_values(base_dict, {key: value})
        except SpecError as err:
            raise SpecError(where, f"values valid for {err.key}: {err.expected}", value, source) from None
    return Param(key=key, kind=kind, args=list(args))


def current_value(base: DictConfig, key: str) -> Any:
    """The value of a dotted key in the run spec (constructor default for unset ``method.*``), or ``_ABSENT``."""
    if key.startswith("method.") and key.count(".") == 1:
        sub = key.split(".", 1)[1]
        if sub in base.method:
            return base.method[sub]

        params = inspect.signature(get_method_class(base.method.name).__init__).parameters
        if sub in params and sub != "self":
            default = params[sub].default
            return None if default is inspect.Parameter.empty else default
        return _ABSENT
    value = OmegaConf.select(base, key, default=_ABSENT)
    return value


def apply_values(base: dict[str, Any], values: dict[str, Any]) -> DictConfig:
    """The validated run spec with the dotted ``values`` set (raises :class:`SpecError`)."""
    cfg = OmegaConf.create(base)
    for key, value in values.items():
        OmegaConf.update(cfg, key, value, merge=False, force_add=key.startswith("method."))
    return spec_from_dict(cfg)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
