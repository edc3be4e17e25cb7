"""Every method trains through the platform (real local Ray, real MLflow): tiny runs on generated 16x16 images.

Each run must finish with a finite loss, kNN metrics for the trained and the random-init encoder, a training
checkpoint and the exported encoder artifact; DINO also runs with 2 DDP workers (multi-crop views, centre).
"""

from __future__ import annotations

import math
from pathlib import Path

import mlflow
import pytest
import torch

from ssl_platform.launch.run import run_experiment
from ssl_platform.storage.training_checkpoints import latest_complete_checkpoint, load_training_checkpoint

pytestmark = pytest.mark.slow

TINY_ENC = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2}
HEAD = {"projector_hidden_dim": 32, "projector_bottleneck_dim": 16}
ONE_EPOCH = {"lr": 1e-3, "warmup_epochs": 0, "epochs": 1}


@pytest.fixture
def method_spec(tmp_path):
    """``tiny_spec`` with its MAE ``method`` section replaced (not merged) by another method's."""
    from ssl_platform.spec import spec_from_dict
    from tests.conftest import tiny_spec_dict

    def make(method: dict, **sections):
        raw = tiny_spec_dict(tmp_path, **sections)
        raw["method"] = method
        return spec_from_dict(raw)

    return make


def _check_run(res, spec, run_name: str) -> dict:
    m = res.metrics
    assert m["epoch"] == spec.optim.epochs
    assert math.isfinite(m["loss"])
    assert 0.0 <= m["knn_top1"] <= 1.0 and 0.0 <= m["knn_top1_random_init"] <= 1.0
    ckpt = latest_complete_checkpoint(Path(spec.checkpoint.uri) / run_name)
    loaded = load_training_checkpoint(ckpt)
    assert loaded["state"]["epoch"] == spec.optim.epochs
    client = mlflow.MlflowClient(tracking_uri=spec.tracking.uri)
    enc = {a.path for a in client.list_artifacts(res.mlflow_run_id, "encoder")}
    assert {"encoder/encoder.pt", "encoder/manifest.json"} <= enc
    return loaded


def test_dino_multicrop_two_workers(ray_session, method_spec):
    method = {"name": "dino", "encoder_name": "vit_tiny_patch16_224", "encoder_kwargs": dict(TINY_ENC), **HEAD,
              "n_prototypes": 64, "warmup_epochs_temperature_teacher": 0, "ema_decay_start": 0.99}
    data = {"multicrop": {"n_global": 2, "n_local": 2, "local_size": 8}}
    spec = method_spec(method, data=data, optim={**ONE_EPOCH, "epochs": 2},
                     scaling={"num_workers": 2, "cpus_per_worker": 1})
    res = run_experiment(spec, run_name="mp-dino")
    loaded = _check_run(res, spec, "mp-dino")
    assert res.metrics["student_views"] == 4.0  # 2 global + 2 local crops reached the student
    center = loaded["model"]["loss_fn.center"]
    assert center.shape == (1, 64) and torch.isfinite(center).all() and center.abs().sum() > 0


def test_ibot_global_views(ray_session, method_spec):
    method = {"name": "ibot", "encoder_name": "vit_tiny_patch16_224", "image_size": 16,
              "encoder_kwargs": dict(TINY_ENC), **HEAD, "n_cls_prototypes": 64, "n_patch_prototypes": 64,
              "warmup_epochs_temperature_teacher": 0}
    spec = method_spec(method, optim=ONE_EPOCH)
    res = run_experiment(spec, run_name="mp-ibot")
    _check_run(res, spec, "mp-ibot")
    assert math.isfinite(res.metrics["loss_patch"]) and math.isfinite(res.metrics["loss_cls"])


def test_data2vec(ray_session, method_spec):
    method = {"name": "data2vec", "encoder_name": "vit_tiny_patch16_224", "image_size": 16,
              "encoder_kwargs": dict(TINY_ENC), "top_k_blocks": 1}
    spec = method_spec(method, optim=ONE_EPOCH)
    res = run_experiment(spec, run_name="mp-d2v")
    _check_run(res, spec, "mp-d2v")


def test_apl_reports_position_accuracy(ray_session, method_spec):
    method = {"name": "apl", "grid_size": 4, "crop": 1, "image_size": 16, "project_patch_emb": True,
              "embed_dim": 32, "n_blocks": 1, "heads": 2}
    spec = method_spec(method, optim=ONE_EPOCH)
    res = run_experiment(spec, run_name="mp-apl")
    loaded = _check_run(res, spec, "mp-apl")
    assert 0.0 <= res.metrics["position_accuracy"] <= 1.0
    assert loaded["state"]["position_accuracy"] == res.metrics["position_accuracy"]


def test_salt_with_stage1_teacher(ray_session, method_spec, tmp_path):
    from methods import checkpoint_io
    from methods.mae import MAE

    # A stage-1 encoder file as the platform exports it (here: a fresh MAE's encoder, saved with its config).
    mae = MAE(encoder_name="vit_tiny_patch16_224", encoder_kwargs=dict(TINY_ENC), decoder_embed_dim=32,
              decoder_depth=1, decoder_num_heads=2)
    teacher_dir = tmp_path / "stage1"
    checkpoint_io.save_encoder(teacher_dir, "mae", mae.encoder_config(), mae.encoder_state_dict())
    method = {"name": "salt", "encoder_name": "vit_tiny_patch16_224", "encoder_kwargs": mae.encoder_config()["encoder_kwargs"],
              "predictor_embed_dim": 32, "predictor_depth": 1, "predictor_num_heads": 2, "num_targets": 2,
              "teacher": str(teacher_dir)}
    spec = method_spec(method, optim=ONE_EPOCH)
    res = run_experiment(spec, run_name="mp-salt")
    _check_run(res, spec, "mp-salt")
