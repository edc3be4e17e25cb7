"""Ray Tune sweeps over the ``TorchTrainer``: ``python -m ssl_platform sweep SPEC [key=value ...]``.

A sweep spec is a run spec plus a ``sweep:`` section (metric, mode, num_samples, max_concurrent_trials,
scheduler, searcher, output_dir, params). ``params`` maps dotted spec keys to one distribution each
(``choice``, ``grid``, ``uniform``, ``loguniform``, ``randint``, ``quniform``); every key and every value
range is checked against the run spec before Ray starts.

Each trial is a plain Tune function that builds and fits the spec's ``TorchTrainer`` (Ray Train V2) with
``TuneReportCallback``; the scheduler (ASHA on ``time_attr="epoch"``, or FIFO) stops trials early on the
reported metric. MLflow: one parent run for the sweep, one child run per trial. At the end: a trial table,
``sweep_results.csv``, ``sweep_plot.png`` and ``best_spec.yaml`` in the sweep's output directory.
"""

from __future__ import annotations

import argparse
import csv
import inspect
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ssl_platform.spec import SpecError, dump_yaml, parse_overrides, read_yaml, spec_from_dict, to_container

DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint", "quniform")
_RANGES = ("uniform", "loguniform", "randint", "quniform")
SCHEDULERS = ("asha", "fifo")
SEARCHERS = ("random", "optuna")
SWEEP_KEYS = ("metric", "mode", "num_samples", "max_concurrent_trials", "scheduler", "searcher", "seed", "output_dir", "params")
DRIVER_CPUS = 0.5
STATE_FILE = "sweep.json"
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


# ---- parsing and validation ----------------------------------------------------------------------------
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
        from methods.registry import get_method_class

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


def _check(cond: bool, key: str, expected: str, seen: Any, source: str | None) -> None:
    if not cond:
        raise SpecError(key, expected, seen, source)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# ---- Tune objects --------------------------------------------------------------------------------------
def search_space(params: list[Param]) -> dict[str, Any]:
    from ray import tune

    build = {
        "choice": lambda a: tune.choice(a),
        "grid": lambda a: tune.grid_search(a),
        "uniform": lambda a: tune.uniform(a[0], a[1]),
        "loguniform": lambda a: tune.loguniform(a[0], a[1]),
        "randint": lambda a: tune.randint(a[0], a[1]),
        "quniform": lambda a: tune.quniform(a[0], a[1], a[2]),
    }
    return {p.key: build[p.kind](p.args) for p in params}


def build_scheduler(sweep: SweepSpec):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    s = sweep.scheduler
    if s.name == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(time_attr="epoch", max_t=s.max_t, grace_period=s.grace_period, reduction_factor=s.reduction_factor)


def build_searcher(sweep: SweepSpec):
    if sweep.searcher == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=sweep.seed)
    return None


def trial_cpus(spec: DictConfig) -> float:
    return DRIVER_CPUS + spec.scaling.num_workers * spec.scaling.cpus_per_worker


def default_concurrency(sweep: SweepSpec) -> int:
    """As many trials as the cluster's CPUs (and GPUs) fit (Tune driver + Train workers each), at least 1."""
    import ray

    total = ray.cluster_resources()
    fit = int(float(total.get("CPU", 1)) // trial_cpus(sweep.base))
    sc = sweep.base.scaling
    if sc.use_gpu:
        fit = min(fit, int(float(total.get("GPU", 0)) // (sc.num_workers * sc.gpus_per_worker)))
    return max(1, fit)


def run_trial(config: dict[str, Any], *, base: dict[str, Any], keys: list[str], sweep_name: str, parent_run_id: str) -> None:
    """One trial (a plain Tune function): the run spec with the trial's values, fitted by a ``TorchTrainer``."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from ssl_platform import tracking
    from ssl_platform.run import fit_tracked
    from ssl_platform.train import build_trainer

    values = {k: config[k] for k in keys}
    spec = apply_values(base, values)
    trial_id = tune.get_context().get_trial_id()
    run_name = trial_run_name(sweep_name, trial_id)
    run_id = tracking.start_run(
        spec, run_name, resume=True, parent_run_id=parent_run_id,
        extra_tags={"sweep.name": sweep_name, "sweep.trial_id": trial_id},
    )
    c = tracking.client(spec.tracking.uri)
    attempts = int(c.get_run(run_id).data.tags.get("sweep.attempts", "0")) + 1
    c.set_tag(run_id, "sweep.attempts", str(attempts))
    trainer = build_trainer(spec, run_name, run_id, callbacks=[TuneReportCallback()])
    fit_tracked(trainer, spec, run_name, run_id)
    tracking.end_run(spec.tracking.uri, run_id, "FINISHED")


def trial_run_name(sweep_name: str, trial_id: str) -> str:
    return f"{sweep_name}-{trial_id}"


# ---- driver --------------------------------------------------------------------------------------------
@dataclass
class TrialRow:
    trial_id: str
    values: dict[str, Any]
    metric: float | None
    epochs: int
    status: str
    run_id: str | None = None


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


def run_sweep(sweep: SweepSpec, *, resume: bool = False) -> SweepResult:
    """Run (or, with ``resume``, restore and finish) a sweep; returns its trials and writes its outputs."""
    from ray import tune

    from ssl_platform import tracking
    from ssl_platform.run import init_ray

    out_dir = sweep.out_dir.resolve()
    state_path = out_dir / STATE_FILE
    tune_root = out_dir / "tune"
    experiment_path = tune_root / sweep.name
    if resume and not state_path.is_file():
        raise ValueError(f"--resume: no sweep {sweep.name!r} in {out_dir} (expected {STATE_FILE}); run it without --resume first")
    if not resume and state_path.is_file():
        raise ValueError(f"sweep {sweep.name!r} already exists in {out_dir}: pass --resume to continue it, or --name NEW_NAME")
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")  # save the experiment state often (kill-safe resume)
    init_ray()
    base = sweep.base
    if resume:
        state = json.loads(state_path.read_text())
        parent_run_id = state["parent_run_id"]
        tracking.client(base.tracking.uri).update_run(parent_run_id, status="RUNNING")
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        parent_run_id = tracking.start_run(base, f"sweep-{sweep.name}", extra_tags={"sweep.name": sweep.name, "sweep.role": "parent"})
        c = tracking.client(base.tracking.uri)
        tracking.log_params(c, parent_run_id, {
            "sweep.metric": sweep.metric, "sweep.mode": sweep.mode, "sweep.num_samples": sweep.num_samples,
            "sweep.scheduler": sweep.scheduler.name, "sweep.searcher": sweep.searcher,
            **{f"sweep.params.{p.key}": p.describe() for p in sweep.params},
        })
        state_path.write_text(json.dumps({
            "name": sweep.name, "parent_run_id": parent_run_id, "experiment_path": str(experiment_path),
            "source": sweep.source, "tracking_uri": base.tracking.uri,
        }, indent=2))
    fit = default_concurrency(sweep)
    if sweep.max_concurrent_trials and sweep.max_concurrent_trials > fit:
        print(f"[ssl_platform] warning: sweep.max_concurrent_trials={sweep.max_concurrent_trials} but the cluster fits {fit} "
              f"trial(s) of {trial_cpus(base)} CPUs: the others wait for resources", flush=True)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=to_container(base), keys=[p.key for p in sweep.params],
                             sweep_name=sweep.name, parent_run_id=parent_run_id),
        {"cpu": DRIVER_CPUS},
    )
    try:
        if resume and tune.Tuner.can_restore(str(experiment_path)):
            tuner = tune.Tuner.restore(str(experiment_path), trainable, resume_unfinished=True, resume_errored=False)
        else:
            tuner = tune.Tuner(
                trainable,
                param_space=search_space(sweep.params),
                tune_config=tune.TuneConfig(
                    metric=sweep.metric, mode=sweep.mode, num_samples=sweep.num_samples,
                    max_concurrent_trials=sweep.max_concurrent_trials or fit,
                    scheduler=build_scheduler(sweep), search_alg=build_searcher(sweep),
                ),
                run_config=tune.RunConfig(name=sweep.name, storage_path=str(tune_root)),
            )
        grid = tuner.fit()
    except BaseException:
        tracking.end_run(base.tracking.uri, parent_run_id, "FAILED")
        raise
    rows = collect_rows(grid, sweep)
    result = finish_sweep(sweep, rows, parent_run_id, out_dir, str(experiment_path))
    return result


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
        ))
    rows.sort(key=lambda r: r.trial_id)
    return rows


def best_row(rows: list[TrialRow], mode: str) -> TrialRow | None:
    scored = [r for r in rows if r.metric is not None and r.status != "ERROR"]
    if not scored:
        return None
    return (max if mode == "max" else min)(scored, key=lambda r: r.metric)


def finish_sweep(sweep: SweepSpec, rows: list[TrialRow], parent_run_id: str, out_dir: Path, experiment_path: str) -> SweepResult:
    """Close the child runs, write CSV / plot / best spec, tag the parent with the best trial."""
    from ssl_platform import tracking

    uri = sweep.base.tracking.uri
    c = tracking.client(uri)
    exp_id = tracking.experiment_id(c, sweep.base.tracking.experiment)
    for row in rows:
        row.run_id = tracking.find_run(c, exp_id, trial_run_name(sweep.name, row.trial_id))
        if row.run_id:
            c.set_tag(row.run_id, "sweep.status", row.status)
            run = c.get_run(row.run_id)
            final = {"COMPLETED": "FINISHED", "STOPPED_EARLY": "KILLED"}.get(row.status, "FAILED")
            # Tune's view of the trial decides: the scheduler may end a trial's function (early, or right after
            # its last report at max_t) before it closed its run, or while it was closing it (then the function
            # saw an interruption and marked the run FAILED although every epoch was done).
            if run.info.status == "RUNNING" or (run.info.status == "FAILED" and final != "FAILED"):
                c.set_terminated(row.run_id, status=final)
    best = best_row(rows, sweep.mode)
    files = {
        "csv": write_csv(rows, sweep, out_dir / "sweep_results.csv"),
        "plot": write_plot(rows, sweep, out_dir / "sweep_plot.png"),
    }
    if best is not None:
        spec = apply_values(to_container(sweep.base), best.values)
        path = out_dir / "best_spec.yaml"
        header = (f"# Best trial {best.trial_id} of sweep {sweep.name}: {sweep.metric}={best.metric:.6g} ({sweep.mode})\n"
                  f"# Run it: python -m ssl_platform run {path}\n")
        path.write_text(header + dump_yaml(spec))
        files["best_spec"] = path
        tags = {"sweep.best_trial_id": best.trial_id, "sweep.best_run_id": best.run_id or "",
                f"sweep.best_{sweep.metric}": f"{best.metric:.6g}"}
        tags.update({f"sweep.best.{k}": v for k, v in best.values.items()})
        tracking.set_tags(uri, parent_run_id, tags)
        tracking.log_metrics(uri, parent_run_id, {f"best_{sweep.metric}": best.metric}, step=0)
        if best.run_id:
            c.set_tag(best.run_id, "sweep.best", "true")
    tracking.log_artifacts(uri, parent_run_id, list(files.values()), "sweep")
    tracking.end_run(uri, parent_run_id, "FINISHED")
    return SweepResult(name=sweep.name, metric=sweep.metric, mode=sweep.mode, rows=rows, best=best,
                       parent_run_id=parent_run_id, out_dir=out_dir, experiment_path=experiment_path, files=files)


# ---- outputs -------------------------------------------------------------------------------------------
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


def write_plot(rows: list[TrialRow], sweep: SweepSpec, path: Path) -> Path:
    """The metric against each swept parameter (one panel each; categorical axes for non-numeric values)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(sweep.params)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.4), squeeze=False)
    colors = {"COMPLETED": "tab:blue", "STOPPED_EARLY": "tab:orange", "ERROR": "tab:red", "NOT_RUN": "tab:gray"}
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
    fig.suptitle(f"sweep {sweep.name}: orange = stopped early")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- CLI -----------------------------------------------------------------------------------------------
def _cmd_sweep(args: argparse.Namespace) -> int:
    sweep = load_sweep(args.spec, args.overrides, name=args.name, output_dir=args.output_dir)
    keys = ", ".join(f"{p.key}~{p.describe()}" for p in sweep.params)
    print(f"[ssl_platform] sweep {sweep.name} is valid: {keys}; metric={sweep.metric} ({sweep.mode}), "
          f"scheduler={sweep.scheduler.name}, searcher={sweep.searcher}, output {sweep.out_dir}", flush=True)
    result = run_sweep(sweep, resume=args.resume)
    print(results_table(result), flush=True)
    for label, path in result.files.items():
        print(f"{label}: {path}", flush=True)
    print(f"MLflow parent run: {result.parent_run_id}", flush=True)
    return 0 if result.best is not None else 1


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("sweep", help="Ray Tune sweep over the TorchTrainer (sweep spec = run spec + sweep:)")
    p.add_argument("spec", help="sweep spec YAML (experiments/sweeps/*.yaml)")
    p.add_argument("overrides", nargs="*", help="OmegaConf dotlist overrides, sweep.* included (sweep.num_samples=4)")
    p.add_argument("--name", help="sweep name (default: the spec's name); reuse it with --resume")
    p.add_argument("--output-dir", help="root of sweep outputs (default: sweep.output_dir or outputs/sweeps)")
    p.add_argument("--resume", action="store_true", help="restore an interrupted sweep; finished trials are not rerun")
    p.set_defaults(func=_cmd_sweep)
