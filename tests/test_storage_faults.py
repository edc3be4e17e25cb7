"""Storage faults while a checkpoint is written: retries with backoff, a clear error naming the URI, and the last
complete checkpoint still loadable. The S3-compatible server (moto on 127.0.0.1) sits behind a TCP proxy that the
test cuts -- the endpoint becomes unreachable -- and restores with the server's data intact."""

from __future__ import annotations

import re
import threading
import time
import uuid

import boto3
import mlflow
import pytest

from methods.checkpoint_io import IncompleteCheckpointError, write_manifest
from ssl_platform.launch.run import run_experiment
from ssl_platform.storage.checkpoint_cache import download_checkpoint
from ssl_platform.storage.checkpoint_upload import CheckpointUploadError, upload_checkpoint_dir
from ssl_platform.storage.retry import StorageUnavailableError, retry_with_backoff
from ssl_platform.storage.run_checkpoints import (
    latest_complete_checkpoint_uri,
    list_checkpoint_uris,
    remote_manifest,
)
from ssl_platform.storage.s3 import filesystem
from ssl_platform.storage.training_checkpoints import load_training_checkpoint
from ssl_platform.storage.uri_files import read_text
from tests.tcp_proxy import CuttableProxy

CKPT_FILES = ["encoder.pt", "model.pt", "optimizer.pt", "spec.yaml", "state.json"]


@pytest.fixture
def proxy(s3_server):
    host, port = s3_server["endpoint"][len("http://"):].split(":")
    p = CuttableProxy(host, int(port)).start()
    yield p
    p.close()


def _keys(bucket: str, prefix: str) -> set[str]:
    """Object keys under ``prefix``, asked of moto directly (not through the proxy)."""
    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"][len(prefix):] for page in pages for o in page.get("Contents", [])}


# ---- the retry helper ------------------------------------------------------------------------------------
def test_retry_succeeds_after_failures_with_doubling_backoff(capsys):
    calls, sleeps = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise OSError("AWS Error NETWORK_CONNECTION during PutObject operation: Could not connect to server")
        return "ok"

    assert retry_with_backoff(flaky, "upload of s3://b/run/ckpt", attempts=4, backoff_s=0.5, sleep=sleeps.append) == "ok"
    assert len(calls) == 3 and sleeps == [0.5, 1.0]
    out = capsys.readouterr().out
    assert "upload of s3://b/run/ckpt: attempt 1/4 failed (OSError: AWS error NETWORK_CONNECTION" in out
    assert "attempt 2/4 failed" in out and "retrying in 1.0 s" in out


def test_retry_gives_up_naming_what_failed_and_skips_non_retryable():
    sleeps = []

    def dead():
        raise OSError("AWS Error NETWORK_CONNECTION during PutObject operation")

    with pytest.raises(StorageUnavailableError) as info:
        retry_with_backoff(dead, "checkpoint upload to s3://b/run/ckpt ('model.pt')", attempts=3, backoff_s=20, sleep=sleeps.append)
    msg = str(info.value)
    assert msg.startswith("checkpoint upload to s3://b/run/ckpt ('model.pt'): failed after 3 attempts over"), msg
    assert "last error: OSError: AWS error NETWORK_CONNECTION" in msg
    assert "AWS Error" not in msg  # else Ray Train would run the whole upload again, 3 times
    assert sleeps == [20, 30.0]  # doubled, capped at 30 s
    assert isinstance(info.value.__cause__, OSError)

    calls = []
    with pytest.raises(FileNotFoundError):  # an answer, not an outage: not retried, not reworded
        retry_with_backoff(lambda: calls.append(1) or open("/nonexistent/x"), "read", attempts=5, backoff_s=0, sleep=sleeps.append)
    assert len(calls) == 1

    denied = []

    def refused(err: OSError):
        def fn():
            denied.append(1)
            raise err

        return fn

    s3_denied = OSError("When getting information for key 'x' in bucket 'b': AWS Error ACCESS_DENIED during HeadObject")
    with pytest.raises(StorageUnavailableError, match=r"read s3://b/x: refused, not retried .*ACCESS_DENIED"):
        retry_with_backoff(refused(s3_denied), "read s3://b/x", attempts=5, backoff_s=1, sleep=sleeps.append)
    with pytest.raises(StorageUnavailableError, match="read /x: refused, not retried"):
        retry_with_backoff(refused(PermissionError(13, "Permission denied")), "read /x", attempts=5, backoff_s=1,
                           sleep=sleeps.append)  # fmt: skip
    assert denied == [1, 1] and sleeps == [20, 30.0]  # one try each, no waiting

    def bug():
        calls.append(1)
        raise ValueError("not retried")

    with pytest.raises(ValueError, match="not retried"):  # other errors pass through at once
        retry_with_backoff(bug, "x", attempts=5, backoff_s=0)
    assert len(calls) == 2


# ---- upload_checkpoint_dir against the S3 server behind the proxy ----------------------------------------
def _checkpoint_dir(path, epoch: int):
    path.mkdir(parents=True)
    for name in CKPT_FILES:
        (path / name).write_text(f"{name} of epoch {epoch}\n" * 100)
    write_manifest(path, {"epoch": epoch})
    return path


def test_upload_rides_out_a_short_outage_and_writes_the_manifest_last(s3_server, proxy, tmp_path):
    bucket = s3_server["bucket"]
    fs = filesystem(proxy.endpoint)
    local = _checkpoint_dir(tmp_path / "c1", 1)
    proxy.cut()
    threading.Timer(2.0, proxy.restore).start()  # the endpoint comes back while the upload retries
    t0 = time.monotonic()
    uri = upload_checkpoint_dir(local, fs, f"{bucket}/runs/outage/checkpoint_1", attempts=6, backoff_s=0.5)
    assert uri == f"s3://{bucket}/runs/outage/checkpoint_1" and time.monotonic() - t0 >= 2.0
    puts = [r.split("?")[0].rsplit("/", 1)[-1] for r in proxy.requests if r.startswith(("PUT", "POST")) and "checkpoint_1/" in r]
    assert puts[-1] == "manifest.json" and set(CKPT_FILES) <= set(puts)
    assert _keys(bucket, "runs/outage/checkpoint_1/") >= {*CKPT_FILES, "manifest.json"}
    assert download_checkpoint(uri, tmp_path / "cache", fs=fs).is_dir()  # sizes and SHA-256 verified


def test_upload_cut_mid_checkpoint_leaves_no_manifest_and_names_the_uri(s3_server, proxy, tmp_path, capsys):
    bucket = s3_server["bucket"]
    fs = filesystem(proxy.endpoint)
    run = f"s3://{bucket}/runs/cut"
    upload_checkpoint_dir(_checkpoint_dir(tmp_path / "c1", 1), fs, f"{bucket}/runs/cut/checkpoint_1", attempts=2, backoff_s=0.1)
    proxy.cut_on(r"^PUT /ssl-test/runs/cut/checkpoint_2/model\.pt")  # the endpoint dies during the 2nd file
    with pytest.raises(CheckpointUploadError) as info:
        upload_checkpoint_dir(_checkpoint_dir(tmp_path / "c2", 2), fs, f"{bucket}/runs/cut/checkpoint_2", attempts=3, backoff_s=0.1)
    msg = str(info.value)
    assert f"checkpoint upload to {run}/checkpoint_2 ('model.pt'): failed after 3 attempts" in msg, msg
    assert "has no manifest.json there and is never loaded" in msg
    assert "attempt 2/3 failed" in capsys.readouterr().out
    assert proxy.cuts == 1 and not proxy.is_up

    assert _keys(bucket, "runs/cut/checkpoint_2/") == {"encoder.pt"}  # cut after one file: no manifest
    proxy.restore()  # the server is back, with its data
    assert list_checkpoint_uris(run, fs) == [f"{run}/checkpoint_1", f"{run}/checkpoint_2"]
    with pytest.raises(IncompleteCheckpointError, match="no manifest.json"):
        remote_manifest(f"{run}/checkpoint_2", fs)
    assert latest_complete_checkpoint_uri(run, fs) == f"{run}/checkpoint_1"


def test_retrying_filesystem_rides_out_an_outage_and_names_the_uri_when_it_lasts(s3_server, proxy):
    """Ray Train's controller writes its bookkeeping (e.g. checkpoint_manager_snapshot.json) through this filesystem."""
    import pickle

    bucket = s3_server["bucket"]
    fs = pickle.loads(pickle.dumps(filesystem(proxy.endpoint, attempts=6, backoff_s=0.5)))  # as Ray's processes get it
    assert (fs.retry_attempts, fs.retry_backoff_s) == (6, 0.5)
    proxy.cut()
    threading.Timer(1.5, proxy.restore).start()
    with fs.open_output_stream(f"{bucket}/runs/r/snapshot.json") as f:  # Ray's way of writing it
        f.write(b'{"ok": 1}')
    assert read_text(f"s3://{bucket}/runs/r/snapshot.json", fs) == '{"ok": 1}'

    proxy.cut()
    dead = filesystem(proxy.endpoint, attempts=2, backoff_s=0.1)
    with pytest.raises(StorageUnavailableError, match=rf"^writing s3://{bucket}/runs/r/other.json: failed after 2 attempts"):
        with dead.open_output_stream(f"{bucket}/runs/r/other.json") as f:
            f.write(b"{}")
    with pytest.raises(StorageUnavailableError, match=rf"^listing s3://{bucket}/runs/r/snapshot.json: failed after 2"):
        dead.get_file_info(f"{bucket}/runs/r/snapshot.json")


def test_upload_refuses_a_directory_without_manifest(tmp_path):
    from pyarrow.fs import LocalFileSystem

    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "model.pt").write_text("x")
    with pytest.raises(IncompleteCheckpointError, match="no manifest.json, refusing to upload"):
        upload_checkpoint_dir(tmp_path / "c", LocalFileSystem(), str(tmp_path / "dest"))
    assert not (tmp_path / "dest").exists()


# ---- a training run whose S3 endpoint dies while it writes its second checkpoint, then resumes -----------
def _wait_for_output(capfd, needles: list[str], timeout_s: float = 15.0) -> str:
    """Worker and controller lines reach the driver through Ray's log monitor, a little later."""
    seen, deadline = "", time.monotonic() + timeout_s
    while True:
        out, err = capfd.readouterr()
        seen += out + err
        if all(n in seen for n in needles) or time.monotonic() > deadline:
            return seen
        time.sleep(0.5)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_s3_dies_during_checkpoint_write_run_stops_naming_uri_then_resumes(ray_session, tiny_spec, s3_server, proxy, tmp_path, capfd):
    bucket = s3_server["bucket"]
    name = f"s3fault-{uuid.uuid4().hex[:8]}"
    run_uri = f"s3://{bucket}/runs/{name}"
    spec = tiny_spec(
        ["optim.epochs=3", "eval.knn.enabled=false", "checkpoint.upload_attempts=3", "checkpoint.upload_backoff_s=0.5"],
        checkpoint={"uri": f"s3://{bucket}/runs", "endpoint_url": proxy.endpoint, "every_epochs": 1, "keep": 3},
    )
    # Epoch 1's checkpoint is written whole; the endpoint dies when epoch 2's model.pt is sent (its encoder.pt is
    # there). The cut waits for Ray Train's controller to record epoch 1's checkpoint (its snapshot file): with
    # epochs this short it would otherwise be writing during the outage too, and its own error -- naming that
    # file after 3 tries -- could end the run first. (test_retrying_filesystem_* covers that path.)
    snapshot = rf"/{bucket}/runs/{name}/checkpoint_manager_snapshot\.json"
    proxy.cut_on(rf"^PUT /{bucket}/runs/{name}/checkpoint_[^/]+/model\.pt", nth=2,
                 after=rf"^(PUT {snapshot}$|POST {snapshot}\?uploadId=)")
    t0 = time.monotonic()
    with pytest.raises(StorageUnavailableError) as info:
        run_experiment(spec, run_name=name)
    elapsed = time.monotonic() - t0
    assert proxy.cuts == 1 and not proxy.is_up
    msg = str(info.value)
    assert msg.startswith(f"run {name!r} stopped: its checkpoint storage {run_uri} is unreachable or failing -- "), msg
    assert re.search(rf"checkpoint upload to {run_uri}/checkpoint_[^ ]+ \('model.pt'\): failed after 3 attempts over", msg), msg
    assert "AWS error NETWORK_CONNECTION" in msg and "`--resume` continues from the last complete checkpoint" in msg
    out = _wait_for_output(capfd, ["('model.pt'): attempt 1/3 failed", "attempt 2/3 failed"])
    assert f"checkpoint upload to {run_uri}/checkpoint_" in out and "('model.pt'): attempt 1/3 failed" in out
    assert "attempt 2/3 failed" in out and "retrying in 1.0 s" in out  # 0.5 s, then doubled
    print(f"run stopped {elapsed:.1f} s after it started")

    # the server comes back: the cut checkpoint has no manifest, the one before it loads
    proxy.restore()
    fs = filesystem(proxy.endpoint)
    ckpts = list_checkpoint_uris(run_uri, fs)
    assert len(ckpts) == 2
    assert _keys(bucket, ckpts[1][len(f"s3://{bucket}/"):] + "/") == {"encoder.pt"}
    assert ckpts[1] in msg
    with pytest.raises(IncompleteCheckpointError, match="no manifest.json"):
        remote_manifest(ckpts[1], fs)
    assert latest_complete_checkpoint_uri(run_uri, fs) == ckpts[0]
    loaded = load_training_checkpoint(download_checkpoint(ckpts[0], tmp_path / "cache", fs=fs))
    assert loaded["state"]["epoch"] == 1 and loaded["state"]["global_step"] == 4

    client = mlflow.MlflowClient(tracking_uri=spec.tracking.uri)
    run = client.search_runs([client.get_experiment_by_name("tests").experiment_id],
                             filter_string=f"tags.`ssl.run_name` = '{name}'")[0]
    assert run.info.status == "FAILED"

    # and the run continues from that checkpoint, not from the cut one
    res = run_experiment(spec, run_name=name, resume=True)
    assert "resumed from checkpoint at epoch 1 (step 4)" in _wait_for_output(capfd, ["resumed from checkpoint"])
    assert res.metrics["epoch"] == 3 and res.mlflow_run_id == run.info.run_id
    assert res.checkpoint_path not in ckpts and latest_complete_checkpoint_uri(run_uri, fs) == res.checkpoint_path
