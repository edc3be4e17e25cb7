"""Model registry promotion on a real MLflow sqlite store: alias moves only for a better version."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from conftest import TINY_VIT, mlflow_store_uri

from ssl_platform.tracking import model_registry as registry

ROOT = Path(__file__).resolve().parents[1]


def _make_run(uri: str, value: float | None, *, parent: str | None = None, seed: int = 0, tags: dict | None = None,
              method=None) -> str:
    """A finished MLflow run with a real ``encoder`` artifact (train.py's layout) and a knn_top1 metric."""
    import mlflow

    from methods import build_method
    from methods.checkpoint_io import save_encoder

    torch.manual_seed(seed)
    if method is None:
        method = build_method("mae", encoder_name="vit_tiny_patch16_224", encoder_kwargs=dict(TINY_VIT),
                              decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
    c = mlflow.MlflowClient(tracking_uri=uri)
    exp = c.get_experiment_by_name("tests") or c.get_experiment(c.create_experiment("tests"))
    run_tags = {"method": method.method_name, "spec_hash": f"hash{seed}", "checkpoint_uri": f"/ckpt/run{seed}", **(tags or {})}
    if parent:
        run_tags["mlflow.parentRunId"] = parent
    run = c.create_run(exp.experiment_id, tags=run_tags, run_name=f"run{seed}")
    with tempfile.TemporaryDirectory() as tmp:
        enc = Path(tmp) / "encoder"
        save_encoder(enc, method.method_name, method.encoder_config(), method.encoder_state_dict())
        c.log_artifact(run.info.run_id, str(enc))
    if value is not None:
        c.log_metric(run.info.run_id, "knn_top1", value, step=2)
    c.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


@pytest.fixture
def store(tmp_path):
    return mlflow_store_uri(tmp_path)


def test_promote_moves_alias_only_for_better_version_and_loads_by_alias(store):
    import mlflow

    a = _make_run(store, 0.50, seed=1, tags={"teacher_uri": "s3://b/stage1/encoder"})
    worse = _make_run(store, 0.30, seed=2)
    better = _make_run(store, 0.70, seed=3)

    r1 = registry.promote(a, model="enc", tracking_uri=store)
    assert (r1.version, r1.alias_moved) == ("1", True)
    r2 = registry.promote(worse, model="enc", tracking_uri=store)
    assert (r2.version, r2.alias_moved, r2.previous_version) == ("2", False, "1")
    assert "does not beat" in r2.reason
    c = mlflow.MlflowClient(tracking_uri=store, registry_uri=store)
    assert str(c.get_model_version_by_alias("enc", "champion").version) == "1"
    r3 = registry.promote(better, model="enc", tracking_uri=store)
    assert (r3.version, r3.alias_moved) == ("3", True)
    holder = c.get_model_version_by_alias("enc", "champion")
    assert str(holder.version) == "3"
    assert holder.tags["source_run_id"] == better and float(holder.tags["metric.knn_top1"]) == pytest.approx(0.70)
    assert holder.tags["method"] == "mae" and holder.tags["spec_hash"] == "hash3"
    assert c.get_model_version("enc", "1").tags["teacher_uri"] == "s3://b/stage1/encoder"
    # mode min: 0.30 is better than the holder's 0.70
    r4 = registry.promote(worse, model="enc", mode="min", tracking_uri=store)
    assert r4.alias_moved and str(c.get_model_version_by_alias("enc", "champion").version) == "4"
    # --force moves the alias to a version that does not win (a tie here)
    r5 = registry.promote(worse, model="enc", force=True, tracking_uri=store)
    assert r5.alias_moved and "--force" in r5.reason and str(c.get_model_version_by_alias("enc", "champion").version) == "5"

    mlflow.set_tracking_uri(store)
    mlflow.set_registry_uri(store)
    loaded = mlflow.pytorch.load_model("models:/enc@champion")
    x = torch.randn(3, 3, 16, 16)
    emb = loaded.eval()(x)
    assert emb.shape == (3, TINY_VIT["embed_dim"])
    # the weights are the source run's encoder, not a fresh init
    from methods.checkpoint_io import load_encoder_file

    local = mlflow.artifacts.download_artifacts(run_id=worse, artifact_path="encoder", tracking_uri=store)
    sd = load_encoder_file(local)["state_dict"]
    assert torch.equal(loaded.state_dict()["pos_embed"], sd["pos_embed"])

    table = registry.models_table("enc", store)
    assert "champion" in table and table.count("\n") == 2 + 5


def test_promote_token_encoder_serves_the_methods_embedding(store):
    """APL's encoder returns tokens: the method rebuilds it (``embedding_encoder``) as images -> mean token."""
    import mlflow

    from methods import build_method

    apl = build_method("apl", grid_size=4, crop=1, image_size=16, project_patch_emb=True, embed_dim=16, n_blocks=1, heads=2)
    registry.promote(_make_run(store, 0.5, method=apl), model="apl-enc", tracking_uri=store)
    mlflow.set_tracking_uri(store)
    mlflow.set_registry_uri(store)
    loaded = mlflow.pytorch.load_model("models:/apl-enc@champion").eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(loaded(x), apl.eval()(images=x).embedding, atol=1e-5)


def test_promote_sweep_picks_best_child(store):
    import mlflow

    c = mlflow.MlflowClient(tracking_uri=store)
    exp = c.get_experiment(c.create_experiment("tests"))
    parent = c.create_run(exp.experiment_id, run_name="sweep").info.run_id
    kids = [_make_run(store, v, parent=parent, seed=10 + i) for i, v in enumerate([0.4, 0.9, 0.6])]
    _make_run(store, None, parent=parent, seed=20)  # a trial without the metric is ignored
    res = registry.promote(model="swept", sweep=parent, tracking_uri=store)
    assert res.run_id == kids[1] and res.value == pytest.approx(0.9) and res.alias_moved
    res_min = registry.promote(model="swept", sweep=parent, mode="min", alias="smallest", tracking_uri=store)
    assert res_min.run_id == kids[0]


def test_promote_errors_name_the_problem(store):
    no_metric = _make_run(store, None, seed=5)
    with pytest.raises(registry.PromotionError, match="knn_top1"):
        registry.promote(no_metric, model="enc", tracking_uri=store)
    with pytest.raises(registry.PromotionError, match="exactly one"):
        registry.promote(model="enc", tracking_uri=store)


def test_promote_and_models_cli(store, capsys):
    from ssl_platform.cli import main

    run = _make_run(store, 0.5, seed=7)
    assert main(["promote", run, "--model", "cli", "--tracking-uri", store]) == 0
    assert "alias 'champion' -> v1" in capsys.readouterr().out
    assert main(["models", "cli", "--tracking-uri", store]) == 0
    out = capsys.readouterr().out
    assert "champion" in out and "0.5000" in out and run in out
    assert main(["promote", "--model", "cli", "--tracking-uri", store]) == 2
    assert "exactly one" in capsys.readouterr().err


def test_promote_real_training_run(ray_session, tiny_spec):
    """A run produced by run_experiment (train.py's own encoder artifact) registers and loads back."""
    import mlflow

    from ssl_platform.launch.run import run_experiment

    spec = tiny_spec()
    res = run_experiment(spec)
    out = registry.promote(res.mlflow_run_id, model="real", tracking_uri=spec.tracking.uri)
    assert out.alias_moved and out.value == pytest.approx(res.metrics["knn_top1"])
    c = mlflow.MlflowClient(tracking_uri=spec.tracking.uri, registry_uri=spec.tracking.uri)
    mv = c.get_model_version_by_alias("real", "champion")
    assert mv.tags["checkpoint_uri"].endswith(res.run_name) and mv.tags["method"] == "mae"
    mlflow.set_registry_uri(spec.tracking.uri)
    model = mlflow.pytorch.load_model("models:/real@champion")
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, TINY_VIT["embed_dim"])


def test_new_sqlite_store_created_by_concurrent_processes(tmp_path):
    """Two processes opening the same new sqlite tracking store at once (two jobs submitted together) both work."""
    import subprocess
    import sys

    uri = f"sqlite:///{tmp_path / 'concurrent.db'}"
    code = (
        "import sys; from ssl_platform.tracking import mlflow_runs as tracking; c = tracking.client(sys.argv[1]); "
        "print(tracking.experiment_id(c, 'exp'))"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, uri], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    assert len({out.strip() for out, _ in outs}) == 1  # one experiment, seen by all
