"""Real local Ray + moto S3 on 127.0.0.1 + sqlite MLflow: runs checkpointing to S3, and a SALT chain
(MAE stage 1 -> S3 -> frozen teacher of SALT stage 2) that is interrupted in stage 2 and resumed."""

from __future__ import annotations

import json

import boto3
import mlflow
import pytest
import torch
import yaml

from ssl_platform.launch.chain import load_chain, run_chain
from ssl_platform.launch.run import run_experiment
from ssl_platform.storage.checkpoint_cache import download_checkpoint
from ssl_platform.storage.run_checkpoints import latest_complete_checkpoint_uri, list_checkpoint_uris
from ssl_platform.storage.training_checkpoints import load_training_checkpoint
from tests.conftest import mlflow_store_uri, tiny_spec_dict
from tests.fault_hooks import PoisonLoss
from tests.test_s3_storage import SALT_TINY

pytestmark = pytest.mark.slow


def _keys(bucket: str, prefix: str) -> list[str]:
    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_run_checkpoints_to_s3_and_resumes_from_latest_complete(ray_session, tiny_spec, s3_server, tmp_path):
    bucket = s3_server["bucket"]
    spec = tiny_spec(checkpoint={"uri": f"s3://{bucket}/runs"})
    first = run_experiment(spec, run_name="s3-run")

    assert first.checkpoint_path.startswith(f"s3://{bucket}/runs/s3-run/checkpoint_")
    keys = _keys(bucket, "runs/s3-run/")
    manifests = sorted(k for k in keys if k.endswith("/manifest.json"))
    assert len(manifests) == 2  # every epoch, keep 2
    for m in manifests:
        files = json.loads(boto3.client("s3").get_object(Bucket=bucket, Key=m)["Body"].read())["files"]
        assert {"model.pt", "optimizer.pt", "encoder.pt", "state.json", "spec.yaml"} <= set(files)
    run_uri = f"s3://{bucket}/runs/s3-run"
    assert len(list_checkpoint_uris(run_uri)) == 2
    assert latest_complete_checkpoint_uri(run_uri) == first.checkpoint_path

    second = run_experiment(tiny_spec(["optim.epochs=3"], checkpoint={"uri": f"s3://{bucket}/runs"}), run_name="s3-run", resume=True)
    assert second.mlflow_run_id == first.mlflow_run_id and second.metrics["epoch"] == 3
    steps = [m.step for m in mlflow.MlflowClient(spec.tracking.uri).get_metric_history(first.mlflow_run_id, "loss")]
    assert sorted(steps) == [1, 2, 3]  # epochs 1-2 were not trained again
    last = load_training_checkpoint(download_checkpoint(second.checkpoint_path, tmp_path / "cache"))
    assert last["state"]["epoch"] == 3


def _chain_file(tmp_path, bucket: str) -> str:
    stage1 = tiny_spec_dict(tmp_path)
    stage1["method"]["mask_type"] = "multiblock"
    stage2 = tiny_spec_dict(tmp_path)
    stage2["name"] = "tiny-salt"
    stage2["method"] = {**SALT_TINY, "teacher": "${stages.stage1.encoder}"}
    for s in (stage1, stage2):  # set once at the chain level; no kNN evaluation, to keep the test short
        del s["checkpoint"]["uri"], s["tracking"]
        s["eval"] = {"knn": {"enabled": False}}
    chain = {"name": "tiny-chain", "checkpoint": {"uri": f"s3://{bucket}/chains"},
             "tracking": {"uri": mlflow_store_uri(tmp_path), "experiment": "chains"},
             "stages": {"stage1": stage1, "stage2": stage2}}
    path = tmp_path / "chain.yaml"
    path.write_text(yaml.safe_dump(chain, sort_keys=False))
    return str(path)


def test_chain_s3_teacher_bit_exact_and_resume_after_stage2_failure(ray_session, s3_server, tmp_path):
    from ray.train import WorkerGroupError

    bucket = s3_server["bucket"]
    # 64 training images / batch 16 = 4 steps per epoch: step 5 is in epoch 2, after stage 2's first checkpoint
    failing = load_chain(_chain_file(tmp_path, bucket))
    with pytest.raises(WorkerGroupError, match="non-finite loss .* at step 5"):
        run_chain(failing, step_hooks={"stage2": [PoisonLoss(at_step=5)]})
    state = json.loads(boto3.client("s3").get_object(Bucket=bucket, Key="chains/tiny-chain/chain_state.json")["Body"].read())
    assert state["stages"]["stage1"]["status"] == "FINISHED"
    assert state["stages"]["stage2"]["status"] == "FAILED"
    stage1_ckpt = state["stages"]["stage1"]["final_checkpoint"]
    assert stage1_ckpt.startswith(f"s3://{bucket}/chains/tiny-chain-stage1/checkpoint_")
    stage1_keys = _keys(bucket, "chains/tiny-chain-stage1/")
    failed_stage2_run = state["stages"]["stage2"]["run_id"]

    res = run_chain(load_chain(_chain_file(tmp_path, bucket)))  # same chain name: resumes

    assert res.stages["stage1"]["skipped"] and not res.stages["stage2"]["skipped"]
    assert _keys(bucket, "chains/tiny-chain-stage1/") == stage1_keys  # stage 1 was not rerun
    tracking_uri = mlflow_store_uri(tmp_path)
    client = mlflow.MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name("chains").experiment_id
    stage1_runs = client.search_runs([exp], "tags.`ssl.chain_stage` = 'stage1'")
    assert len(stage1_runs) == 1
    s2 = res.stages["stage2"]
    assert s2["status"] == "FINISHED" and s2["run_id"] == failed_stage2_run  # same MLflow run, continued
    assert sorted(m.step for m in client.get_metric_history(s2["run_id"], "loss")) == [1, 2]  # epoch 1 not redone
    run2 = client.get_run(s2["run_id"])
    assert run2.data.tags["teacher_uri"] == stage1_ckpt
    assert run2.data.tags["teacher_run_id"] == res.stages["stage1"]["run_id"]
    assert run2.data.tags["mlflow.parentRunId"] == res.parent_run_id
    assert client.get_run(res.parent_run_id).info.status == "FINISHED"

    teacher = torch.load(download_checkpoint(stage1_ckpt, tmp_path / "c1") / "encoder.pt", weights_only=True)["state_dict"]
    model = load_training_checkpoint(download_checkpoint(s2["final_checkpoint"], tmp_path / "c2"))["model"]
    assert set(teacher) == {k[len("teacher."):] for k in model if k.startswith("teacher.")}
    for k, v in teacher.items():
        assert torch.equal(model[f"teacher.{k}"], v), k  # the frozen teacher is stage 1's encoder, bit for bit

    again = run_chain(load_chain(_chain_file(tmp_path, bucket)))
    assert again.stages["stage1"]["skipped"] and again.stages["stage2"]["skipped"]
