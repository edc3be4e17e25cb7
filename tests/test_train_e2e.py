"""End to end on a real local Ray instance: 2 DDP workers (gloo), checkpoints with manifests, MLflow, resume."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest

from ssl_platform.launch.run import run_experiment
from ssl_platform.storage.training_checkpoints import (
    latest_complete_checkpoint,
    list_checkpoints,
    load_training_checkpoint,
)

pytestmark = pytest.mark.slow


def test_two_workers_checkpoint_and_mlflow(ray_session, tiny_spec):
    spec = tiny_spec(scaling={"num_workers": 2, "cpus_per_worker": 1})
    res = run_experiment(spec, run_name="e2e-ddp")

    assert res.metrics["epoch"] == 2
    assert 0.0 <= res.metrics["knn_top1"] <= 1.0 and "knn_top1_random_init" in res.metrics
    run_dir = Path(spec.checkpoint.uri) / "e2e-ddp"
    ckpts = list_checkpoints(run_dir)
    assert len(ckpts) == 2  # every epoch, keep 2
    for ckpt in ckpts:
        manifest = json.loads((ckpt / "manifest.json").read_text())
        assert {"model.pt", "optimizer.pt", "encoder.pt", "state.json", "spec.yaml"} <= set(manifest["files"])
        assert all(len(m["sha256"]) == 64 for m in manifest["files"].values())
    last = load_training_checkpoint(latest_complete_checkpoint(run_dir))
    assert last["state"]["epoch"] == 2 and last["manifest"]["spec_hash"]

    client = mlflow.MlflowClient(tracking_uri=spec.tracking.uri)
    run = client.get_run(res.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["method.mask_ratio"] == "0.75"
    assert run.data.params["scaling.num_workers"] == "2"
    assert run.data.tags["method"] == "mae" and run.data.tags["git_commit"]
    history = client.get_metric_history(res.mlflow_run_id, "loss")
    assert sorted(m.step for m in history) == [1, 2]
    artifacts = {a.path for a in client.list_artifacts(res.mlflow_run_id)}
    assert {"spec.yaml", "encoder"} <= artifacts
    enc = {a.path for a in client.list_artifacts(res.mlflow_run_id, "encoder")}
    assert {"encoder/encoder.pt", "encoder/manifest.json"} <= enc


def test_resume_continues_at_next_epoch_and_same_mlflow_run(ray_session, tiny_spec):
    first = run_experiment(tiny_spec(), run_name="e2e-resume")
    assert first.metrics["epoch"] == 2
    longer = tiny_spec(["optim.epochs=4"])
    second = run_experiment(longer, run_name="e2e-resume", resume=True)

    assert second.mlflow_run_id == first.mlflow_run_id
    assert [int(r["epoch"]) for r in second.history] == [3, 4]  # not restarted from epoch 1
    assert second.metrics["epoch"] == 4
    assert second.metrics["global_step"] == 4 * first.metrics["global_step"] // 2
    client = mlflow.MlflowClient(tracking_uri=longer.tracking.uri)
    steps = [m.step for m in client.get_metric_history(first.mlflow_run_id, "loss")]
    assert sorted(steps) == [1, 2, 3, 4]


def test_new_run_from_checkpoint_directory(ray_session, tiny_spec, tmp_path):
    first = run_experiment(tiny_spec(), run_name="e2e-src")
    res = run_experiment(tiny_spec(["optim.epochs=3"]), run_name="e2e-from", resume_from=first.checkpoint_path)
    assert [int(r["epoch"]) for r in res.history] == [3]
