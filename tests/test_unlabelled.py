"""Unlabelled data: image folders of any layout and shards without labels train; kNN and the probe use ``eval.data``
or are skipped (said once, tagged in MLflow); bad input is refused before Ray starts."""

from __future__ import annotations

import re
import subprocess
import sys
import uuid
from pathlib import Path

import boto3
import mlflow
import numpy as np
import pytest
import yaml

from benchmarks.image_tree import encode_image, write_image_tree
from ssl_platform.data.small_sets import DataError
from ssl_platform.data.sources import NO_LABEL, list_image_folder
from ssl_platform.spec import SpecError
from tests.conftest import ROOT, tiny_spec_dict


def write_unlabelled_tree(root: Path, n: int, seed: int = 0) -> list[Path]:
    """``n`` JPEGs: a third directly under ``root``, a third one folder down, a third three folders down."""
    rng = np.random.default_rng(seed)
    files = []
    for i in range(n):
        folder = [root, root / f"batch_{i % 2}", root / "deep" / f"d{i % 3}" / "x"][i % 3]
        folder.mkdir(parents=True, exist_ok=True)
        image = rng.integers(0, 256, size=(int(rng.integers(20, 40)), int(rng.integers(20, 40)), 3), dtype=np.uint8)
        path = folder / f"img_{i:04d}.jpg"
        path.write_bytes(encode_image(image))
        files.append(path)
    (root / "notes.txt").write_text("not an image")
    return files


def _unlabelled_spec(tmp_path: Path, root: str, **sections) -> dict:
    spec = tiny_spec_dict(tmp_path, **sections)
    spec["data"] = {"name": "image_folder", "labels": "none", "root": root, "batch_size": 8, "image_size": 16,
                    "decode_size": 24, **sections.get("data", {})}
    spec["optim"] = {**spec["optim"], "epochs": 1}
    return spec


# ---- listing and refusals (no Ray) ----------------------------------------------------------------------
def test_unlabelled_listing_takes_any_layout(tmp_path):
    files = write_unlabelled_tree(tmp_path / "photos", 9)
    listing = list_image_folder(str(tmp_path / "photos"), labels="none")
    assert sorted(listing.files) == sorted(str(f) for f in files)  # flat, nested and deep; notes.txt left out
    assert listing.labels == [NO_LABEL] * 9 and listing.classes == [] and not listing.labelled
    with pytest.raises(DataError, match="images lie directly under it.*data.labels=none"):
        list_image_folder(str(tmp_path / "photos" / "batch_0"))  # as ImageFolder: no class folder


def test_unlabelled_root_without_images_is_refused(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match=r"data.root: expected a folder holding images .* for data.labels=none, got .*empty"):
        list_image_folder(str(tmp_path / "empty"), labels="none")


def test_bad_labels_value_and_unlabelled_eval_data_are_refused(tmp_path):
    from ssl_platform.launch.preflight import check_data
    from ssl_platform.spec import spec_from_dict

    write_unlabelled_tree(tmp_path / "photos", 6)
    with pytest.raises(SpecError, match=r"data.labels: expected one of \['folders', 'none'\], got 'maybe'"):
        spec_from_dict(_unlabelled_spec(tmp_path, str(tmp_path / "photos"), data={"labels": "maybe"}))
    with pytest.raises(SpecError, match=r"eval.data.labels: expected a labelled source .*got 'none'"):
        spec_from_dict(_unlabelled_spec(tmp_path, str(tmp_path / "photos"),
                                        eval={"data": {"name": "image_folder", "root": str(tmp_path), "labels": "none"}}))
    # shards without labels as eval.data: found from their manifest, before Ray starts
    prep = subprocess.run([sys.executable, "-m", "ssl_platform", "prepare-data", str(tmp_path / "photos"),
                           str(tmp_path / "shards"), "--labels", "none", "--no-progress"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert prep.returncode == 0 and "without labels" in prep.stdout, prep.stdout + prep.stderr
    spec = spec_from_dict(_unlabelled_spec(tmp_path, str(tmp_path / "photos"),
                                           eval={"data": {"name": "shards", "root": str(tmp_path / "shards"),
                                                          "val_root": str(tmp_path / "shards")}}))
    with pytest.raises(DataError, match=r"eval.data: expected a labelled source .* without labels"):
        check_data(spec)


# ---- through Ray Train ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_trains_a_nested_unlabelled_folder_without_knn_and_shows_progress_early(tmp_path):
    """100 images at batch 2: 50 steps, quarter-epoch lines at 12, 24, ...; a line comes by step 10."""
    write_unlabelled_tree(tmp_path / "photos", 100)
    spec = _unlabelled_spec(tmp_path, str(tmp_path / "photos"), data={"batch_size": 2})
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    proc = subprocess.run([sys.executable, "-m", "ssl_platform", "run", str(path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={**__import__("os").environ, "SSL_PLATFORM_NUM_CPUS": "2"})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert out.count("no kNN / linear probe: the training data has no labels") == 1
    steps = [int(m) for m in re.findall(r"epoch 1/1 step (\d+)/50", out)]
    assert steps and steps[0] <= 10, steps
    assert re.search(r"kNN top-1 \(trained encoder\)\s+\| n/a", out), out[-2000:]
    run_id = re.search(r"MLflow run id\s+\| (\w+)", out).group(1)
    run = mlflow.MlflowClient(spec["tracking"]["uri"]).get_run(run_id)
    assert "eval_skipped" in run.data.tags and "knn_top1" not in run.data.metrics and run.info.status == "FINISHED"


@pytest.mark.slow
def test_unlabelled_s3_prefix_trains_without_knn(ray_session, tmp_path, s3_server):
    from ssl_platform.launch.run import run_experiment
    from ssl_platform.spec import spec_from_dict

    s3 = boto3.client("s3")
    for f in write_unlabelled_tree(tmp_path / "photos", 24):
        s3.put_object(Bucket=s3_server["bucket"], Key=f"raw/{f.relative_to(tmp_path / 'photos')}", Body=f.read_bytes())
    spec = spec_from_dict(_unlabelled_spec(tmp_path, f"s3://{s3_server['bucket']}/raw"))
    res = run_experiment(spec, run_name=f"unl-s3-{uuid.uuid4().hex[:6]}")
    assert res.metrics["epoch"] == 1 and res.metrics["global_step"] == 24 // 8
    assert "knn_top1" not in res.metrics and "knn_top1_random_init" not in res.metrics


@pytest.mark.slow
def test_unlabelled_shards_train_and_digits_as_eval_data_give_knn(ray_session, tmp_path):
    """Shards prepared with --labels none train; eval.data (digits, its own image size) gives kNN for the trained
    and the random-init encoder."""
    from ssl_platform.launch.run import run_experiment
    from ssl_platform.spec import spec_from_dict

    write_unlabelled_tree(tmp_path / "photos", 24)
    prep = subprocess.run([sys.executable, "-m", "ssl_platform", "prepare-data", str(tmp_path / "photos"),
                           str(tmp_path / "shards"), "--labels", "none", "--shard-size", "8", "--no-progress"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert prep.returncode == 0, prep.stdout + prep.stderr
    raw = _unlabelled_spec(tmp_path, str(tmp_path / "shards"), data={"name": "shards", "labels": "folders"})
    res = run_experiment(spec_from_dict(raw), run_name=f"unl-shards-{uuid.uuid4().hex[:6]}")
    assert res.metrics["epoch"] == 1 and "knn_top1" not in res.metrics  # the manifest says: no labels
    raw["eval"] = {**raw["eval"], "data": {"name": "digits", "image_size": 16}}
    res = run_experiment(spec_from_dict(raw), run_name=f"unl-digits-{uuid.uuid4().hex[:6]}")
    assert 0.0 <= res.metrics["knn_top1"] <= 1.0 and 0.0 <= res.metrics["knn_top1_random_init"] <= 1.0


@pytest.mark.slow
def test_unlabelled_folder_with_a_labelled_image_folder_as_eval_data(ray_session, tmp_path):
    from ssl_platform.launch.run import run_experiment
    from ssl_platform.spec import spec_from_dict

    write_unlabelled_tree(tmp_path / "photos", 24)
    write_image_tree(tmp_path / "labelled", num_classes=2, per_class=10, mean_size=(30, 40))
    raw = _unlabelled_spec(tmp_path, str(tmp_path / "photos"),
                           eval={"knn": {"k": 5}, "data": {"name": "image_folder", "root": str(tmp_path / "labelled"),
                                                           "image_size": 16, "decode_size": 24, "test_fraction": 0.3}})
    res = run_experiment(spec_from_dict(raw), run_name=f"unl-folder-{uuid.uuid4().hex[:6]}")
    assert res.metrics["global_step"] == 24 // 8  # every unlabelled image trains: no hold-out taken from it
    assert 0.0 <= res.metrics["knn_top1"] <= 1.0 and 0.0 <= res.metrics["knn_top1_random_init"] <= 1.0
