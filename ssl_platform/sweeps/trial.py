"""Ray Tune objects of a sweep and the function each trial runs.

:func:`search_space`, :func:`build_scheduler` (ASHA on ``time_attr="epoch"``, or FIFO) and :func:`build_searcher`
(Tune's random/grid generator, or Optuna) turn a :class:`~ssl_platform.sweeps.sweep_spec.SweepSpec` into Tune objects.
:func:`run_trial` is the plain Tune function of one trial (Ray Train V2 pattern): the run spec with the trial's
values, its own MLflow child run, and the spec's ``TorchTrainer`` fitted with ``TuneReportCallback``.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from ssl_platform.storage.s3 import worker_storage_options
from ssl_platform.sweeps.sweep_spec import Param, SweepSpec, apply_values
from ssl_platform.tracking import mlflow_runs as tracking
from ssl_platform.tracking import run_log
from ssl_platform.training.fit import fit_tracked
from ssl_platform.training.trainer import build_trainer

DRIVER_CPUS = 0.5  # the Tune function of a trial; its Train workers reserve their own CPUs


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


def trial_cpus(scaling: DictConfig) -> float:
    """CPUs of one trial: its Tune function and the Train workers of the spec's ``scaling`` section."""
    return DRIVER_CPUS + scaling.num_workers * scaling.cpus_per_worker


def default_concurrency(sweep: SweepSpec) -> int:
    """As many trials as the cluster's CPUs (and GPUs) fit (Tune driver + Train workers each), at least 1."""
    import ray

    total = ray.cluster_resources()
    fit = int(float(total.get("CPU", 1)) // trial_cpus(sweep.base.scaling))
    sc = sweep.base.scaling
    if sc.use_gpu:
        fit = min(fit, int(float(total.get("GPU", 0)) // (sc.num_workers * sc.gpus_per_worker)))
    return max(1, fit)


def run_trial(config: dict[str, Any], *, base: dict[str, Any], keys: list[str], sweep_name: str,
              parent: run_log.TrackedRun) -> None:
    """One trial (a plain Tune function): the run spec with the trial's values, fitted by a ``TorchTrainer``; its
    MLflow child run of ``parent`` (the sweep's run, found by its key: it may not exist yet) is tracked through the
    queue, as a single run's."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    values = {k: config[k] for k in keys}
    spec = apply_values(base, values)
    trial_id = tune.get_context().get_trial_id()
    run_name = trial_run_name(sweep_name, trial_id)
    run = run_log.open_run(spec.tracking, run_name, tracking.SpecRecord.of(spec), resume=True, parent=parent,
                           extra_tags={"sweep.name": sweep_name, "sweep.trial_id": trial_id},
                           journal=run_log.journal_for(spec.checkpoint, run_name))
    run.count_tag("sweep.attempts")
    # the trial's checkpoints go where the spec says (S3 included), as for a single run
    trainer = build_trainer(spec, run_name, run.identity, callbacks=[TuneReportCallback()],
                            tracking_run=run.for_rank0(), **worker_storage_options(spec.checkpoint, spec.method))
    fit_tracked(trainer, spec, run_name, run)
    run.end("FINISHED")
    run_log.close_and_report(run)


def trial_run_name(sweep_name: str, trial_id: str) -> str:
    return f"{sweep_name}-{trial_id}"
