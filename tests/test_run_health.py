"""Health metrics, collapse warnings, the online probe and pictures in real runs (local Ray, MLflow store)."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest

from ssl_platform.launch.run import run_experiment
from ssl_platform.storage.training_checkpoints import latest_complete_checkpoint, load_training_checkpoint
from ssl_platform.training.watch import CollapseStop
from tests.fault_hooks import ConstantEncoder

pytestmark = pytest.mark.slow


def test_health_probe_and_pictures_of_a_healthy_run(ray_session, tiny_spec, capsys):
    spec = tiny_spec(["eval.online_probe=true", "eval.knn.every_epochs=1"])
    res = run_experiment(spec, run_name="health-ok")
    client = mlflow.MlflowClient(tracking_uri=spec.tracking.uri)
    run = client.get_run(res.mlflow_run_id)
    history = client.get_metric_history(res.mlflow_run_id, "health/rank_fraction")
    assert len(history) >= spec.optim.epochs  # one reading per log interval, at its global step
    assert all(0 < m.value <= 1 for m in history)
    assert {"health/normalized_std", "health/target_scale", "health/prediction_scale",
            "online_probe_train_top1", "online_probe_top1"} <= set(run.data.metrics)
    assert 0 <= run.data.metrics["online_probe_top1"] <= 1
    assert not any(k.startswith("collapse.") for k in run.data.tags)
    experiment = client.get_experiment(run.info.experiment_id)  # the MLflow UI opens it on its training runs
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    images = {a.path for a in client.list_artifacts(res.mlflow_run_id, "images")}
    assert {f"images/mae_epoch{e:04d}.png" for e in (1, 2)} <= images
    assert {f"images/embedding_pca_epoch{e:04d}.png" for e in (1, 2)} <= images
    assert "collapse warning" not in capsys.readouterr().out


def test_a_collapsed_encoder_is_warned_tagged_and_stopped_keeping_the_last_checkpoint(ray_session, tiny_spec):
    # 64 training images in batches of 16: 4 steps per epoch, a health reading after each; the collapse is there from
    # the first step and lasts 5 steps (window_steps) at step 5, in epoch 2, after epoch 1's checkpoint
    spec = tiny_spec(["eval.stop_on_collapse=true", "eval.health.window_steps=5", "optim.epochs=3"])
    with pytest.raises(CollapseStop, match=r"normalized_std 0 \(below 0.01"):
        run_experiment(spec, run_name="health-collapse", step_hooks=[ConstantEncoder()])
    client = mlflow.MlflowClient(tracking_uri=spec.tracking.uri)
    (run,) = client.search_runs(client.get_experiment_by_name(spec.tracking.experiment).experiment_id,
                                filter_string="tags.`ssl.run_name` = 'health-collapse'")
    assert run.info.status == "FAILED"
    assert "normalized_std" in run.data.tags["collapse.normalized_std"]
    assert "collapse.stopped" in run.data.tags
    ckpt = latest_complete_checkpoint(Path(spec.checkpoint.uri) / "health-collapse")
    assert load_training_checkpoint(ckpt)["state"]["epoch"] == 1


def test_online_probe_needs_labelled_training_data(tiny_spec, tmp_path):
    from ssl_platform.spec import SpecError

    with pytest.raises(SpecError, match="eval.online_probe"):
        tiny_spec(["eval.online_probe=true", "data.name=image_folder", f"data.root={tmp_path}", "data.labels=none"])
    with pytest.raises(SpecError, match="eval.online_probe_every"):
        tiny_spec(["eval.online_probe=true", "eval.online_probe_every=0"])
