"""Shared fixtures: one real local Ray instance per test session, tiny specs, per-test MLflow stores."""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Ray Train's controller polls its workers every 2 s by default: it notices a finished (or dead) worker group up to
# 2 s late, in every one of the suite's ~60 runs. Propagated by Ray Train to its controllers and workers.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def ray_session():
    """A real local Ray instance (4 logical CPUs on this 2-core machine so 2-worker runs fit), shared."""
    import ray

    from ssl_platform.training.ray_runtime import init_ray

    init_ray(num_cpus=4)
    yield ray
    ray.shutdown()


TINY_VIT = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2}


def randomize_layer_norm_(norm):
    """Give a LayerNorm a non-trivial affine part (gain in [0.5, 2], bias in [-1, 1]), so tests see it applied."""
    import torch

    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
        norm.bias.uniform_(-1.0, 1.0)
    return norm


def layer_norm_reference(x, norm):
    """``(x - mean) / sqrt(var + eps) * w + b`` over the last dim, from the formula (not ``F.layer_norm``)."""
    mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    return (x - mean) / (var + norm.eps).sqrt() * norm.weight + norm.bias


@functools.cache
def _empty_mlflow_store() -> Path:
    """An empty MLflow sqlite store, created (schema migrations and all) by MLflow itself, once per session."""
    import tempfile

    import mlflow

    path = Path(tempfile.mkdtemp(prefix="mlflow-empty-")) / "mlflow.db"
    mlflow.MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


def mlflow_store_uri(directory: Path) -> str:
    """A per-test MLflow sqlite store in ``directory``: a copy of :func:`_empty_mlflow_store` (MLflow migrates a new
    sqlite file in 2-3 s on this machine; a copy takes milliseconds). An existing store is left as it is."""
    db = directory / "mlflow.db"
    if not db.exists():
        directory.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_empty_mlflow_store(), db)
    return f"sqlite:///{db}"


def tiny_spec_dict(tmp_path: Path, **sections) -> dict:
    """A run spec that trains in seconds: tiny MAE on 64 generated 16x16 images."""
    spec = {
        "name": "tiny",
        "seed": 0,
        "method": {
            "name": "mae", "encoder_name": "vit_tiny_patch16_224", "encoder_kwargs": dict(TINY_VIT),
            "decoder_embed_dim": 32, "decoder_depth": 1, "decoder_num_heads": 2,
        },
        "data": {"name": "synthetic", "num_samples": 80, "image_size": 16, "batch_size": 16},
        "optim": {"lr": 1e-3, "warmup_epochs": 1, "epochs": 2},
        "scaling": {"num_workers": 1, "cpus_per_worker": 1},
        "checkpoint": {"uri": str(tmp_path / "ckpt"), "every_epochs": 1, "keep": 2},
        "tracking": {"uri": mlflow_store_uri(tmp_path), "experiment": "tests"},
        "eval": {"knn": {"k": 5}},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    return spec


@pytest.fixture
def tiny_spec(tmp_path):
    from ssl_platform.spec import spec_from_dict

    def make(overrides: list[str] | None = None, **sections):
        return spec_from_dict(tiny_spec_dict(tmp_path, **sections), overrides)

    return make


@pytest.fixture
def s3_server(monkeypatch):
    """A real S3-compatible server (moto server mode) on a free loopback port, with a bucket and fake credentials.

    Yields ``{"endpoint": ..., "bucket": ...}``. The environment points boto3 and ``ssl_platform.storage.s3`` at it;
    Ray workers get the endpoint and credentials through the pickled pyarrow filesystem the platform passes.
    """
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per S3 request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": endpoint,
    }.items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(key, raising=False)
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="ssl-test")
    yield {"endpoint": endpoint, "bucket": "ssl-test"}
    server.stop()
