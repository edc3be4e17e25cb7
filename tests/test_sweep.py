"""Ray Tune sweeps (ssl_platform.sweeps.driver): spec validation, a real 3-trial sweep with ASHA, kill + --resume."""

from __future__ import annotations

import csv
import glob
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ssl_platform.spec import SpecError, spec_from_dict
from ssl_platform.sweeps.sweep_spec import load_sweep, parse_sweep_section
from tests.conftest import ROOT, tiny_spec_dict


def _mlflow(uri: str):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=uri)


def _children(uri: str, parent_run_id: str) -> list:
    c = _mlflow(uri)
    exp_id = c.get_run(parent_run_id).info.experiment_id
    return c.search_runs([exp_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'")


# ---- validation (no Ray) -------------------------------------------------------------------------------
@pytest.mark.parametrize("path", sorted(glob.glob(str(ROOT / "experiments" / "sweeps" / "*.yaml"))))
def test_example_sweeps_validate(path, tmp_path):
    import torch
    from torch.utils.data import DataLoader

    from benchmarks.per_sample_views import ViewDataset, build_view_transform
    from ssl_platform.data.small_sets import load_split
    from ssl_platform.spec import read_yaml, to_container
    from ssl_platform.sweeps.sweep_spec import apply_values
    from ssl_platform.training.trainer import build_method_from_spec

    overrides = []
    raw_method = read_yaml(path)["method"]
    if raw_method["name"] == "salt":  # stage 2 needs a real stage-1 encoder of the same architecture
        from methods import build_method, checkpoint_io

        mae = build_method("mae", encoder_name=raw_method["encoder_name"], encoder_kwargs=raw_method["encoder_kwargs"])
        checkpoint_io.save_encoder(tmp_path / "teacher", "mae", mae.encoder_config(), mae.encoder_state_dict())
        overrides = [f"method.teacher={tmp_path / 'teacher'}"]
    sweep = load_sweep(path, overrides)
    assert sweep.params and sweep.metric and sweep.mode in ("min", "max")
    assert sweep.base.optim.epochs <= 10
    # the first value of every swept key gives a spec whose method trains on the platform's views
    spec = apply_values(to_container(sweep.base), {p.key: p.args[0] for p in sweep.params})
    torch.manual_seed(0)
    method = build_method_from_spec(spec.method).train()
    batch = next(iter(DataLoader(ViewDataset(load_split(spec.data).train, build_view_transform(method, spec.data)), batch_size=4)))
    method.on_train_step(0, 10, 0.0)
    loss = method(**batch).loss
    loss.backward()
    assert torch.isfinite(loss.detach())


def test_optuna_searcher_samples_the_space(tmp_path):
    from ssl_platform.sweeps.trial import build_searcher, search_space

    base = spec_from_dict(tiny_spec_dict(tmp_path))
    sweep = parse_sweep_section({"metric": "loss", "mode": "min", "searcher": "optuna", "seed": 0, "params": {
        "optim.lr": {"loguniform": [1e-4, 1e-2]}, "method.mask_ratio": {"quniform": [0.5, 0.9, 0.1]},
        "optim.epochs": {"randint": [1, 3]}, "method.norm_pix_loss": {"choice": [True, False]}}}, base)
    searcher = build_searcher(sweep)
    assert searcher.set_search_properties("loss", "min", search_space(sweep.params))
    config = searcher.suggest("t1")
    assert 1e-4 <= config["optim.lr"] <= 1e-2 and config["optim.epochs"] in (1, 2)
    assert round(config["method.mask_ratio"] * 10) / 10 == pytest.approx(config["method.mask_ratio"])
    assert config["method.norm_pix_loss"] in (True, False)


@pytest.mark.parametrize(
    "params, extra, key, fragment",
    [
        ({"method.nope": {"choice": [1]}}, {}, "sweep.params.method.nope", "a key of the run spec"),
        ({"optim.bogus": {"choice": [1]}}, {}, "sweep.params.optim.bogus", "a key of the run spec"),
        ({"optim": {"choice": [1]}}, {}, "sweep.params.optim", "leaf key"),
        ({"method.mask_ratio": {"choice": []}}, {}, "sweep.params.method.mask_ratio", "non-empty list"),
        ({"optim.lr": {"uniform": [0.1, 0.01]}}, {}, "sweep.params.optim.lr", "low < high"),
        ({"optim.lr": {"loguniform": [0.0, 0.1]}}, {}, "sweep.params.optim.lr", "0 < low"),
        ({"optim.lr": {"normal": [0.0, 0.1]}}, {}, "sweep.params.optim.lr", "one of ['choice'"),
        ({"data.name": {"uniform": [0.1, 0.2]}}, {}, "sweep.params.data.name", "numeric spec key"),
        ({"optim.epochs": {"uniform": [1, 3]}}, {}, "sweep.params.optim.epochs", "randint"),
        ({"method.mask_ratio": {"uniform": [0.5, 1.0]}}, {}, "sweep.params.method.mask_ratio", "(0, 1)"),
        ({"optim.lr": {"grid": [1e-3, 2e-3]}}, {"searcher": "optuna"}, "sweep.params.optim.lr", "Optuna"),
        ({"optim.lr": {"choice": [1e-3]}}, {"mode": "best"}, "sweep.mode", "min or max"),
        ({"optim.lr": {"choice": [1e-3]}}, {"scheduler": "hyperband"}, "sweep.scheduler.name", "asha"),
        ({"optim.lr": {"choice": [1e-3]}}, {"scheduler": {"name": "asha", "max_t": 9}}, "sweep.scheduler.max_t", "optim.epochs=2"),
        ({"optim.lr": {"choice": [1e-3]}}, {"metric": "knn_top1", "mode": "max"}, "eval.knn.every_epochs", "ASHA"),
        ({}, {}, "sweep.params", "non-empty mapping"),
    ],
)
def test_bad_sweep_specs_are_rejected_with_the_key(tmp_path, params, extra, key, fragment):
    base = spec_from_dict(tiny_spec_dict(tmp_path))
    with pytest.raises(SpecError) as info:
        parse_sweep_section({"metric": "loss", "mode": "min", "params": params, **extra}, base)
    assert info.value.key == key
    assert fragment in str(info.value)


def test_sweep_section_is_required_and_unknown_keys_rejected(tmp_path):
    run_only = tmp_path / "run.yaml"
    run_only.write_text(yaml.safe_dump(tiny_spec_dict(tmp_path)))
    with pytest.raises(SpecError, match="sweep: expected a mapping"):
        load_sweep(run_only)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**tiny_spec_dict(tmp_path), "sweep": {"metric": "loss", "mode": "min", "trials": 3,
                                                                         "params": {"optim.lr": {"choice": [1e-3]}}}}))
    with pytest.raises(SpecError) as info:
        load_sweep(bad)
    assert info.value.key == "sweep.trials"


def test_cli_reports_bad_sweep_before_ray(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**tiny_spec_dict(tmp_path), "sweep": {
        "metric": "loss", "mode": "min", "params": {"method.mask_ratio": {"choice": [0.5, 1.5]}}}}))
    proc = subprocess.run([sys.executable, "-m", "ssl_platform", "sweep", str(bad)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2
    assert "sweep.params.method.mask_ratio" in proc.stderr and "1.5" in proc.stderr
    assert not (tmp_path / "outputs").exists()


# ---- a real sweep: 3 trials, ASHA, MLflow parent/children, outputs ------------------------------------
LRS = [1e-3, 5.0, 2e-3]  # the middle one diverges on purpose: ASHA must stop it after its first epoch


@pytest.fixture(scope="module")
def asha_sweep(tmp_path_factory, ray_session):
    from ssl_platform.sweeps.driver import run_sweep
    from ssl_platform.sweeps.report import results_table

    tmp = tmp_path_factory.mktemp("sweep")
    raw = tiny_spec_dict(tmp, name="tiny-sweep", optim={"lr": 1e-3, "warmup_epochs": 0, "epochs": 2, "clip_grad": 0})
    raw["sweep"] = {
        "metric": "loss", "mode": "min", "max_concurrent_trials": 1, "output_dir": str(tmp / "out"),
        "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2},
        "params": {"optim.lr": {"grid": LRS}},
    }
    path = tmp / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    sweep = load_sweep(path)
    result = run_sweep(sweep)
    return sweep, result, results_table(result)


def test_sweep_runs_three_trials_with_outputs_and_mlflow(asha_sweep):
    sweep, result, table = asha_sweep
    assert sorted(r.values["optim.lr"] for r in result.rows) == sorted(LRS)
    for lr in ("0.001", "5", "0.002"):
        assert any(lr == cell.strip() for line in table.splitlines() for cell in line.split("|")), table
    with (result.out_dir / "sweep_results.csv").open() as fh:
        csv_rows = list(csv.DictReader(fh))
    assert len(csv_rows) == 3
    assert sorted(float(r["optim.lr"]) for r in csv_rows) == sorted(LRS)
    assert (result.out_dir / "sweep_plot.png").stat().st_size > 1000
    assert (result.out_dir / "sweep_curves.png").stat().st_size > 1000
    assert all(1 <= len(r.history) <= r.epochs for r in result.rows if r.status != "ERROR")

    children = _children(sweep.base.tracking.uri, result.parent_run_id)
    assert len(children) == 3
    assert sorted(float(ch.data.params["optim.lr"]) for ch in children) == sorted(LRS)
    by_lr = {float(ch.data.params["optim.lr"]): ch for ch in children}
    assert by_lr[1e-3].info.status == "FINISHED" and "loss" in by_lr[1e-3].data.metrics

    parent = _mlflow(sweep.base.tracking.uri).get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["sweep.best_run_id"] == result.best.run_id
    assert float(parent.data.tags["sweep.best.optim.lr"]) == result.best.values["optim.lr"]
    assert result.best.values["optim.lr"] in (1e-3, 2e-3)
    artifacts = {a.path for a in _mlflow(sweep.base.tracking.uri).list_artifacts(result.parent_run_id, "sweep")}
    assert {"sweep/sweep_results.csv", "sweep/sweep_plot.png", "sweep/sweep_curves.png", "sweep/best_spec.yaml"} <= artifacts

    best = yaml.safe_load((result.out_dir / "best_spec.yaml").read_text())
    assert "sweep" not in best and best["optim"]["lr"] == result.best.values["optim.lr"]
    spec_from_dict(best)  # ready to run: a valid run spec


def test_sweep_state_is_in_checkpoint_storage_and_a_second_run_is_refused(asha_sweep):
    from ssl_platform.sweeps.driver import run_sweep

    sweep, result, _ = asha_sweep
    root = f"{sweep.base.checkpoint.uri}/sweeps/{sweep.name}"
    assert result.state_uri == root and (Path(root) / "sweep.json").is_file()
    assert list(Path(root).glob(f"tune/{sweep.name}/experiment_state-*.json"))
    assert not (result.out_dir / "tune").exists() and not (result.out_dir / "sweep.json").exists()
    with pytest.raises(ValueError, match=f"already exists at {root}: pass --resume"):
        run_sweep(sweep)


def test_asha_stops_the_diverging_trial_early(asha_sweep):
    _, result, _ = asha_sweep
    rows = {r.values["optim.lr"]: r for r in result.rows}
    assert rows[1e-3].status == "COMPLETED" and rows[1e-3].epochs == 2
    assert rows[5.0].status == "STOPPED_EARLY" and rows[5.0].epochs == 1
    assert rows[5.0].metric > rows[1e-3].metric


# ---- kill the sweep driver after one finished trial, then --resume -----------------------------------
def test_killed_sweep_resumes_without_rerunning_finished_trials(tmp_path):
    raw = tiny_spec_dict(tmp_path, name="resume-sweep")
    raw["sweep"] = {
        "metric": "loss", "mode": "min", "max_concurrent_trials": 1, "scheduler": "fifo",
        "output_dir": str(tmp_path / "out"), "params": {"optim.lr": {"grid": [1e-3, 2e-3]}},
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SSL_PLATFORM_NUM_CPUS": "4", "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    cmd = [sys.executable, "-m", "ssl_platform", "sweep", str(path)]
    out_dir = tmp_path / "out" / "resume-sweep"
    state_dir = tmp_path / "ckpt" / "sweeps" / "resume-sweep"  # sweep state lives in checkpoint.uri (shared storage)
    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            states = list(state_dir.glob("tune/resume-sweep/experiment_state-*.json"))
            if states and "TERMINATED" in states[0].read_text():
                break
            time.sleep(0.5)
        assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.time() < deadline, "no trial finished in time"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
        proc.wait(timeout=30)
        log.close()

    import json

    state = json.loads((state_dir / "sweep.json").read_text())
    uri = state["tracking_uri"]
    finished = [ch for ch in _children(uri, state["parent_run_id"]) if ch.info.status == "FINISHED"]
    assert len(finished) >= 1
    first_ids = {ch.data.tags["sweep.trial_id"] for ch in finished}

    proc = subprocess.run(cmd + ["--resume"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=420,
                          start_new_session=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    children = _children(uri, state["parent_run_id"])
    assert len(children) == 2, [ch.data.tags.get("sweep.trial_id") for ch in children]
    assert all(ch.info.status == "FINISHED" for ch in children)
    for ch in children:
        if ch.data.tags["sweep.trial_id"] in first_ids:
            assert ch.data.tags["sweep.attempts"] == "1"  # the finished trial was not run again
    with (out_dir / "sweep_results.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 and all(r["status"] == "COMPLETED" for r in rows)
    assert first_ids <= {r["trial_id"] for r in rows}
    assert "COMPLETED" in proc.stdout
