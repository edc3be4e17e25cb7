"""Ray Tune sweeps over the ``TorchTrainer``: ``python -m ssl_platform sweep SPEC [key=value ...]``.

The driver of a sweep and its MLflow bookkeeping. The parts live in their own modules:
:mod:`ssl_platform.sweeps.sweep_spec` parses and validates the ``sweep:`` section, :mod:`ssl_platform.sweeps.trial` builds
the Tune objects and runs one trial (a Tune function that fits the spec's ``TorchTrainer``), and
:mod:`ssl_platform.sweeps.report` turns Tune's results into rows, a table, a CSV file and a plot.

State lives in the spec's shared storage, ``<checkpoint.uri>/sweeps/<name>/`` (``sweep.json`` and Tune's
experiment directory ``tune/<name>``; local or ``s3://``), so a sweep submitted to a multi-node cluster can be
resumed from any node, and submitting it again without ``--resume`` is refused with that URI. MLflow holds one
parent run per sweep and one child run per trial; the outputs (trial table, ``sweep_results.csv``,
``sweep_plot.png``, ``best_spec.yaml``) are the parent's artifacts under ``sweep/`` and are also written to the
local ``sweep.output_dir``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ssl_platform.spec import dump_yaml, to_container
from ssl_platform.storage import s3, uri_files
from ssl_platform.sweeps.report import (
    SweepResult,
    TrialRow,
    best_row,
    collect_rows,
    results_table,
    write_csv,
    write_curves,
    write_plot,
)
from ssl_platform.sweeps.sweep_spec import SweepSpec, apply_values, load_sweep
from ssl_platform.sweeps.trial import (
    DRIVER_CPUS,
    build_scheduler,
    build_searcher,
    default_concurrency,
    run_trial,
    search_space,
    trial_cpus,
    trial_run_name,
)
from ssl_platform.tracking import mlflow_runs as tracking
from ssl_platform.tracking import run_log
from ssl_platform.training.ray_runtime import init_ray

STATE_FILE = "sweep.json"


def state_root(sweep: SweepSpec) -> str:
    """``<checkpoint.uri>/sweeps/<name>``: the sweep's state, in the storage every node of a cluster sees."""
    return f"{sweep.base.checkpoint.uri.rstrip('/')}/sweeps/{sweep.name}"


@dataclass(frozen=True)
class SweepPaths:
    """Where a sweep keeps its state: ``root`` (``sweep.json``) and Tune's experiment, on one filesystem."""

    root: str
    fs: Any  # pyarrow filesystem of an s3:// root, else None (local paths)
    state_uri: str  # <root>/sweep.json
    tune_root: str  # Tune's storage_path: a bucket/key path with fs, else a local path
    experiment_path: str  # <tune_root>/<name>


def sweep_paths(sweep: SweepSpec) -> SweepPaths:
    """The state locations of ``sweep`` under :func:`state_root`."""
    root = state_root(sweep)
    tune_root = s3.fs_path(f"{root}/tune")
    return SweepPaths(root=root, fs=s3.spec_filesystem(sweep.base.checkpoint) if s3.is_s3(root) else None,
                      state_uri=f"{root}/{STATE_FILE}", tune_root=tune_root,
                      experiment_path=f"{tune_root}/{sweep.name}")


def run_sweep(sweep: SweepSpec, *, resume: bool = False) -> SweepResult:
    """Run (or, with ``resume``, restore and finish) a sweep; returns its trials and writes its outputs."""
    paths = sweep_paths(sweep)
    existing = _check_existing_state(sweep, paths, resume)
    out_dir = sweep.out_dir.resolve()
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")  # save the experiment state often (kill-safe resume)
    run_log.check_server(sweep.base.tracking)  # tracking.require_server_at_start
    init_ray()
    parent = _open_parent_run(sweep, paths, existing)
    fit = _concurrency(sweep)
    trainable = _trainable(sweep, parent)
    try:
        grid = _tuner(sweep, paths, trainable, resume=resume, fit=fit).fit()
    except BaseException:
        parent.end("FAILED")
        parent.close()
        raise
    rows = collect_rows(grid, sweep)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = finish_sweep(sweep, rows, parent, out_dir, paths.experiment_path)
    result.state_uri = paths.root
    return result


def _check_existing_state(sweep: SweepSpec, paths: SweepPaths, resume: bool) -> str | None:
    """The text of the sweep's ``sweep.json`` (None for a new sweep); refuses ``--resume`` without one, and a new
    sweep over one."""
    existing = uri_files.read_text(paths.state_uri, paths.fs)
    if resume and existing is None:
        raise ValueError(f"--resume: no sweep {sweep.name!r} at {paths.root} (expected {STATE_FILE}); run it without --resume first")
    if not resume and existing is not None:
        raise ValueError(f"sweep {sweep.name!r} already exists at {paths.root}: pass --resume to continue it, or --name NEW_NAME")
    return existing


def _open_parent_run(sweep: SweepSpec, paths: SweepPaths, existing: str | None) -> run_log.TrackedRun:
    """The sweep's MLflow parent run: the recorded one set RUNNING again on resume (``existing``: its
    ``sweep.json``), else a new one with the sweep's settings as params, recorded in a new ``sweep.json``. Queued:
    a tracking server that is down gets it when it answers (the run id in ``sweep.json`` is then empty)."""
    base = sweep.base
    journal = run_log.journal_for(base.checkpoint, f"sweeps/{sweep.name}")
    name = f"sweep-{sweep.name}"
    if existing is not None:
        return run_log.open_run(base.tracking, name, None, resume=True, journal=journal,
                                run_id_hint=json.loads(existing).get("parent_run_id"))
    parent = run_log.open_run(base.tracking, name, tracking.SpecRecord.of(base), journal=journal,
                              extra_tags={"sweep.name": sweep.name, "sweep.role": "parent"})
    parent.log_params({
        "sweep.metric": sweep.metric, "sweep.mode": sweep.mode, "sweep.num_samples": sweep.num_samples,
        "sweep.scheduler": sweep.scheduler.name, "sweep.searcher": sweep.searcher,
        **{f"sweep.params.{p.key}": p.describe() for p in sweep.params},
    })
    parent.set_tags({"sweep.state_uri": paths.root})
    uri_files.write_text(paths.state_uri, json.dumps({
        "name": sweep.name, "parent_run_id": parent.run_id, "experiment_path": paths.experiment_path,
        "source": sweep.source, "tracking_uri": base.tracking.uri,
    }, indent=2), paths.fs)
    return parent


def _concurrency(sweep: SweepSpec) -> int:
    """Trials the cluster fits at once; warns when ``sweep.max_concurrent_trials`` asks for more."""
    fit = default_concurrency(sweep)
    if sweep.max_concurrent_trials and sweep.max_concurrent_trials > fit:
        print(f"[ssl_platform] warning: sweep.max_concurrent_trials={sweep.max_concurrent_trials} but the cluster fits {fit} "
              f"trial(s) of {trial_cpus(sweep.base.scaling)} CPUs: the others wait for resources", flush=True)
    return fit


def _trainable(sweep: SweepSpec, parent: run_log.TrackedRun) -> Any:
    """The Tune function of one trial (:func:`~ssl_platform.sweeps.trial.run_trial`) with its arguments and the
    driver's CPUs."""
    from ray import tune

    return tune.with_resources(
        tune.with_parameters(run_trial, base=to_container(sweep.base), keys=[p.key for p in sweep.params],
                             sweep_name=sweep.name, parent=parent),
        {"cpu": DRIVER_CPUS},
    )


def _tuner(sweep: SweepSpec, paths: SweepPaths, trainable: Any, *, resume: bool, fit: int) -> Any:
    """Tune's ``Tuner``: restored from the experiment directory on resume (when Tune saved one), else a new one."""
    from ray import tune

    if resume and tune.Tuner.can_restore(paths.experiment_path, storage_filesystem=paths.fs):
        return tune.Tuner.restore(paths.experiment_path, trainable, resume_unfinished=True, resume_errored=False,
                                  storage_filesystem=paths.fs)
    return tune.Tuner(
        trainable,
        param_space=search_space(sweep.params),
        tune_config=tune.TuneConfig(
            metric=sweep.metric, mode=sweep.mode, num_samples=sweep.num_samples,
            max_concurrent_trials=sweep.max_concurrent_trials or fit,
            scheduler=build_scheduler(sweep), search_alg=build_searcher(sweep),
        ),
        run_config=tune.RunConfig(name=sweep.name, storage_path=paths.tune_root, storage_filesystem=paths.fs),
    )


def finish_sweep(sweep: SweepSpec, rows: list[TrialRow], parent: run_log.TrackedRun, out_dir: Path,
                 experiment_path: str) -> SweepResult:
    """Close the child runs, write CSV / plot / best spec, tag the parent with the best trial (all queued; the run
    ids shown are those the store gives within a few seconds)."""

    lookup = True  # a store that does not answer is asked once, not once per trial
    for row in rows:
        trial = parent.named(trial_run_name(sweep.name, row.trial_id))
        t0 = time.monotonic()
        row.run_id = run_log.find_run_id(trial, timeout=5.0) if lookup else None
        lookup = lookup and time.monotonic() - t0 < 5.0
        # Tune's view of the trial decides (ssl_platform.tracking.outbox._close_trial)
        trial.close_trial(row.status, {"COMPLETED": "FINISHED", "STOPPED_EARLY": "KILLED"}.get(row.status, "FAILED"))
    best = best_row(rows, sweep.mode)
    files = {
        "csv": write_csv(rows, sweep, out_dir / "sweep_results.csv"),
        "plot": write_plot(rows, sweep, out_dir / "sweep_plot.png"),
        "curves": write_curves(rows, sweep, out_dir / "sweep_curves.png"),
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
        parent.set_tags(tags)
        parent.log_metrics({f"best_{sweep.metric}": best.metric}, step=0)
        parent.named(trial_run_name(sweep.name, best.trial_id)).set_tags({"sweep.best": "true"})
    parent.log_artifacts(list(files.values()), "sweep")
    parent.end("FINISHED")
    run_log.close_and_report(parent)
    return SweepResult(name=sweep.name, metric=sweep.metric, mode=sweep.mode, rows=rows, best=best,
                       parent_run_id=parent.run_id or "", out_dir=out_dir, experiment_path=experiment_path, files=files)


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
    print(f"MLflow parent run: {result.parent_run_id} (the files above are also its artifacts under sweep/)", flush=True)
    print(f"sweep state: {result.state_uri} (--name {sweep.name} --resume continues it)", flush=True)
    return 0 if result.best is not None else 1


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("sweep", help="Ray Tune sweep over the TorchTrainer (sweep spec = run spec + sweep:)")
    p.add_argument("spec", help="sweep spec YAML (experiments/sweeps/*.yaml)")
    p.add_argument("overrides", nargs="*", help="OmegaConf dotlist overrides, sweep.* included (sweep.num_samples=4)")
    p.add_argument("--name", help="sweep name (default: the spec's name); reuse it with --resume")
    p.add_argument("--output-dir", help="root of sweep outputs (default: sweep.output_dir or outputs/sweeps)")
    p.add_argument("--resume", action="store_true", help="restore an interrupted sweep; finished trials are not rerun")
    p.set_defaults(func=_cmd_sweep)
