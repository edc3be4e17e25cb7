"""Fault tolerance on a real local Ray: NaN loss, worker loss, secrets, bad data and storage before Ray starts."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import mlflow
import pytest
import yaml

from ssl_platform.launch.run import result_table, run_experiment
from ssl_platform.storage.training_checkpoints import (
    latest_complete_checkpoint,
    list_checkpoints,
    load_training_checkpoint,
)
from tests.conftest import ROOT, tiny_spec_dict
from tests.fault_hooks import KillWorkerOnce, PoisonLoss


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"  # the kill-once marker file is keyed by run name


# ---- NaN loss --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_nan_loss_names_step_and_keeps_last_good_checkpoint(ray_session, tiny_spec):
    # 64 training images / batch 16 = 4 steps per epoch: step 5 is the 2nd step of epoch 2
    spec = tiny_spec(["optim.epochs=3"])
    name = _name("nan")
    with pytest.raises(Exception) as info:
        run_experiment(spec, run_name=name, step_hooks=[PoisonLoss(at_step=5)])
    msg = str(info.value)
    assert "non-finite loss" in msg and "at step 5 (epoch 2)" in msg and "'mae'" in msg, msg

    run_dir = Path(spec.checkpoint.uri) / name
    assert [load_training_checkpoint(c)["state"]["epoch"] for c in list_checkpoints(run_dir)] == [1]
    last = load_training_checkpoint(latest_complete_checkpoint(run_dir))
    assert last["state"]["epoch"] == 1 and last["state"]["global_step"] == 4

    client = mlflow.MlflowClient(tracking_uri=spec.tracking.uri)
    run = client.search_runs([client.get_experiment_by_name("tests").experiment_id],
                             filter_string=f"tags.`ssl.run_name` = '{name}'")[0]
    assert run.info.status == "FAILED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1]


# ---- secrets ---------------------------------------------------------------------------------------------
def _all_text_under(root: Path) -> str:
    return "\n".join(p.read_bytes().decode("latin-1") for p in root.rglob("*") if p.is_file())


@pytest.mark.slow
def test_secrets_never_reach_mlflow_checkpoints_or_console(ray_session, tiny_spec, tmp_path, monkeypatch, capfd):
    env_secret = "envsecret" + uuid.uuid4().hex
    spec_secret = "spectoken" + uuid.uuid4().hex
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", env_secret)
    spec = tiny_spec([f"tracking.token={spec_secret}", "optim.epochs=1"])
    assert spec.tracking.token == spec_secret
    res = run_experiment(spec, run_name=_name("secrets"))
    table = result_table(res)

    client = mlflow.MlflowClient(tracking_uri=spec.tracking.uri)
    run = client.get_run(res.mlflow_run_id)
    logged = [*run.data.params.items(), *run.data.tags.items(), *((k, str(v)) for k, v in run.data.metrics.items())]
    assert "tracking.token" not in run.data.params
    art = Path(client.download_artifacts(res.mlflow_run_id, "", str(tmp_path / "artifacts")))
    assert (art / "spec.yaml").is_file() and (art / "encoder" / "encoder.pt").is_file()
    run_dir = Path(spec.checkpoint.uri) / res.run_name
    ckpt_yaml = (latest_complete_checkpoint(run_dir) / "spec.yaml").read_text()
    assert "token: '***'" in ckpt_yaml
    out, err = capfd.readouterr()
    haystacks = {
        "mlflow params/tags/metrics": repr(logged),
        "mlflow artifacts": _all_text_under(art),
        "checkpoint files": _all_text_under(run_dir),
        "mlflow database": Path(spec.tracking.uri[len("sqlite:///"):]).read_bytes().decode("latin-1"),
        "result table": table,
        "console": out + err,
    }
    for where, text in haystacks.items():
        for secret in (env_secret, spec_secret):
            assert secret not in text, f"secret found in {where}"


def test_cli_validate_redacts_secrets(tmp_path):
    secret = "clitoken" + uuid.uuid4().hex
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(tiny_spec_dict(tmp_path)))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "ssl_platform", "validate", str(spec_file), f"tracking.token={secret}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "token: '***'" in proc.stdout
    assert secret not in proc.stdout + proc.stderr


# ---- worker loss -----------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_worker_loss_restarts_from_last_checkpoint(ray_session, tiny_spec, capfd):
    spec = tiny_spec([
        "scaling.num_workers=2", "scaling.max_failures=2", "optim.epochs=4", "checkpoint.every_epochs=1",
        "eval.knn.enabled=false",
    ])
    name = _name("workerloss")
    res = run_experiment(spec, run_name=name, step_hooks=[KillWorkerOnce(epoch=2, rank=1)])

    marker = Path(os.environ.get("TMPDIR", "/tmp")) / "ssl_platform_faults" / f"killed-{name}"
    assert marker.exists(), "the fault was not injected"
    assert res.metrics["epoch"] == 4
    assert res.metrics["global_step"] == 4 * 4  # 64 images / 2 workers / 8 per worker: 4 steps per epoch
    client = mlflow.MlflowClient(tracking_uri=spec.tracking.uri)
    exp_id = client.get_experiment_by_name("tests").experiment_id
    runs = client.search_runs([exp_id], filter_string=f"tags.`ssl.run_name` = '{name}'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(res.mlflow_run_id, "loss")]
    assert sorted(steps) == [1, 2, 3, 4] and len(steps) == len(set(steps))
    # at most one checkpoint interval lost: the restarted group resumed after epoch 1, it did not start over
    out, err = capfd.readouterr()
    assert "resumed from checkpoint at epoch 1 (step 4)" in out + err
    # checkpoint.keep=2 after the restart too (here Ray Train's controller deleted epoch 1's itself; after a node
    # loss on a cluster it may not, and the run prunes it once finished: test_cluster)
    run_dir = Path(spec.checkpoint.uri) / name
    assert [load_training_checkpoint(c)["state"]["epoch"] for c in list_checkpoints(run_dir)] == [3, 4]


# ---- bad data / storage, refused before Ray starts -------------------------------------------------------
def test_cli_empty_image_folder_exits_before_ray(tmp_path):
    empty = tmp_path / "empty_images"
    (empty / "cats").mkdir(parents=True)
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(tiny_spec_dict(tmp_path)))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": ""}
    proc = subprocess.run(
        [sys.executable, "-m", "ssl_platform", "run", str(spec_file), "data.name=image_folder", f"data.root={empty}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "data.root: expected an ImageFolder tree root/class_name/image" in proc.stderr
    assert "the dataset is empty" in proc.stderr and "Traceback" not in proc.stderr
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr
    assert not (tmp_path / "ckpt").exists()


def test_preflight_data_errors(tiny_spec, tmp_path):
    from ssl_platform.data.small_sets import DataError
    from ssl_platform.launch.preflight import check_data

    with pytest.raises(DataError, match="data.root: expected an ImageFolder directory .* which does not exist"):
        check_data(tiny_spec(["data.name=image_folder", f"data.root={tmp_path / 'nope'}"]))
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "a.png").write_bytes(b"x")
    with pytest.raises(DataError, match="images lie directly under it"):
        check_data(tiny_spec(["data.name=image_folder", f"data.root={flat}"]))
    (flat / "cls").mkdir()
    (flat / "cls" / "b.png").write_bytes(b"x")
    with pytest.raises(DataError, match="data.test_fraction: expected a value that leaves images in both splits"):
        check_data(tiny_spec(["data.name=image_folder", f"data.root={flat}"]))  # 1 image: no hold-out possible
    for i in range(20):
        (flat / "cls" / f"c{i}.png").write_bytes(b"x")  # listing reads names only: the bytes are judged when decoded
    source = check_data(tiny_spec(["data.name=image_folder", f"data.root={flat}"])).train
    assert source.num_train + source.num_val == 21 and source.classes == ["cls"] and source.num_val >= 1


def test_unwritable_checkpoint_uri_is_refused_before_ray(tiny_spec, tmp_path):
    from ssl_platform.launch.preflight import StorageError

    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    spec = tiny_spec([f"checkpoint.uri={blocker / 'ckpts'}"])
    with pytest.raises(StorageError, match=f"checkpoint.uri: expected a writable directory, got '{blocker / 'ckpts'}'"):
        run_experiment(spec, run_name=_name("unwritable"))


def test_latest_checkpoint_of_run_matches_mlflow_run_and_skips_incomplete(tmp_path):
    import json

    from methods.checkpoint_io import write_manifest
    from ssl_platform.storage.training_checkpoints import latest_checkpoint_of_run

    for name, run_id, complete in [("checkpoint_1", "runA", True), ("checkpoint_2", "runB", True), ("checkpoint_3", "runA", False)]:
        d = tmp_path / name
        d.mkdir()
        (d / "state.json").write_text(json.dumps({"epoch": 1, "global_step": 4, "mlflow_run_id": run_id}))
        if complete:
            write_manifest(d)
    assert latest_checkpoint_of_run(tmp_path, "runA") == tmp_path / "checkpoint_1"
    assert latest_checkpoint_of_run(tmp_path, "runB") == tmp_path / "checkpoint_2"
    assert latest_checkpoint_of_run(tmp_path, "runC") is None
    assert latest_checkpoint_of_run(tmp_path / "missing", "runA") is None
