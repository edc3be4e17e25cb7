"""A real MLflow server killed (SIGKILL) and restarted during real runs (local Ray, ``python -m ssl_platform`` command
line in-process): tracking never stops training, and every epoch's metrics end up in MLflow exactly once.

MLflow's own retry budget is shortened through its environment variables (2 retries, backoff factor 1, 5 s
timeout): before the tracking queue, an outage longer than that ended the run with ``MlflowException ... Max retries
exceeded`` from ``report_epoch``, and a shorter one held every epoch for the whole outage.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import threading
import time
from pathlib import Path

import boto3
import mlflow
import pytest
import requests
import yaml
from conftest import tiny_spec_dict

from benchmarks.tracking_outage import start_mlflow_server
from ssl_platform.cli import main
from ssl_platform.training.ray_runtime import free_port
from tests.tracking_hooks import EpochGates, epoch_times

pytestmark = pytest.mark.slow
MLFLOW_BUDGET = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
KEYS = ("epoch", "loss", "lr", "global_step", "images_per_sec")


class MlflowServer:
    """``mlflow server`` on a loopback port (sqlite store and artifacts in ``root``), in its own process group."""

    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}  # not the client's retry budget
        self.proc = start_mlflow_server(self.root, self.port, env)

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if requests.get(f"{self.url}/health", timeout=2).ok:
                    return
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline and self.proc.poll() is None, (self.root / "mlflow.log").read_text()[-2000:]
            time.sleep(0.3)

    @property
    def up(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.up:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    yield server
    server.kill()


def _wait_file(path: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.1)


def _run_of(url: str, run_name: str):
    c = mlflow.MlflowClient(url)
    exp = c.get_experiment_by_name("outage")
    runs = c.search_runs([exp.experiment_id], filter_string=f"tags.`ssl.run_name` = '{run_name}'") if exp else []
    return c, runs


def _wait_logged(url: str, run_name: str, epochs: set[int], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        c, runs = _run_of(url, run_name)
        if runs and epochs <= {m.step for m in c.get_metric_history(runs[0].info.run_id, "epoch")}:
            return
        assert time.monotonic() < deadline, f"epochs {epochs} of {run_name} never reached MLflow"
        time.sleep(0.5)


def _assert_every_epoch_once(url: str, run_name: str, epochs: int) -> None:
    c, runs = _run_of(url, run_name)
    assert len(runs) == 1, [r.info.run_id for r in runs]
    run = c.get_run(runs[0].info.run_id)
    assert run.info.status == "FINISHED"
    for key in KEYS:
        assert sorted(m.step for m in c.get_metric_history(run.info.run_id, key)) == list(range(1, epochs + 1)), key
    # the random-init baseline: at step 0 (logged once it is computed) and beside every epoch's metrics
    assert sorted(m.step for m in c.get_metric_history(run.info.run_id, "knn_top1_random_init")) == list(range(epochs + 1))
    assert run.data.params["optim.epochs"] == str(epochs) and run.data.tags["final_checkpoint"]
    assert {"spec.yaml", "encoder"} <= {a.path for a in c.list_artifacts(run.info.run_id)}


def _spec_file(tmp_path: Path, url: str, epochs: int, **sections) -> Path:
    raw = tiny_spec_dict(tmp_path, name="outage", optim={"lr": 1e-3, "warmup_epochs": 1, "epochs": epochs},
                         tracking={"uri": url, "experiment": "outage", **sections.pop("tracking", {})}, **sections)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _in_thread(fn) -> threading.Thread:
    errors: list[BaseException] = []

    def target() -> None:
        try:
            fn()
        except BaseException as err:  # noqa: BLE001 - re-raised by the test
            errors.append(err)

    thread = threading.Thread(target=target, daemon=True)
    thread.errors = errors
    thread.start()
    return thread


def test_server_down_at_start_then_an_outage_longer_than_mlflows_retries(ray_session, mlflow_server, tmp_path,
                                                                         monkeypatch, capsys):
    """Down at start (the MLflow run is created when the server answers); killed again for epochs 2-5 (longer than
    MLflow's retry budget); back from epoch 6. The run trains through both, exits 0, and logs every epoch once."""
    for k, v in MLFLOW_BUDGET.items():
        monkeypatch.setenv(k, v)
    server, marks, name, epochs = mlflow_server, tmp_path / "marks", "down-at-start", 8
    server.kill()
    spec = _spec_file(tmp_path, server.url, epochs, tracking={"flush_timeout_s": 150})

    def outages() -> None:
        _wait_file(marks / "mark-2")
        try:
            server.start()  # the server appears during the run; epoch 2 waits until it has the run and epoch 1
            server.wait_ready()
            _wait_logged(server.url, name, {1})
            server.kill()  # killed again: epochs 2-5 train while it is down
        finally:
            (marks / "open-2").write_text("")
        _wait_file(marks / "mark-6")
        server.start()

    control = _in_thread(outages)
    hooks = [EpochGates(str(marks), gates=(2,), step_sleep_s=0.3)]
    monkeypatch.setattr("ssl_platform.cli.run_experiment", _with_hooks(hooks))
    assert main(["run", str(spec), "--name", name]) == 0
    control.join(60)
    assert not control.errors, control.errors
    out = capsys.readouterr().out
    assert f"tracking: {server.url} does not answer" in out and "training starts anyway" in out

    _assert_every_epoch_once(server.url, name, epochs)
    times = epoch_times(marks, epochs)
    outage = times[1:5]  # epochs 2-5: the server was down for all of them
    assert max(outage) <= 1.5 * statistics.median(times) + 4, f"epochs stalled during the outage: {times}"


def test_outage_until_the_end_then_sync_tracking_replays_it(ray_session, mlflow_server, tmp_path, monkeypatch,
                                                            capsys, s3_server):
    """Killed at epoch 2 and not back before the run ends: exit 0 with the result table, the unsent records kept
    beside the checkpoints on S3, and ``sync-tracking`` completes the MLflow run once the server is back."""
    for k, v in MLFLOW_BUDGET.items():
        monkeypatch.setenv(k, v)
    server, marks, name, epochs, bucket = mlflow_server, tmp_path / "marks", "never-back", 4, s3_server["bucket"]
    if not server.up:
        server.start()
    server.wait_ready()
    spec = _spec_file(tmp_path, server.url, epochs, tracking={"flush_timeout_s": 2},
                      checkpoint={"uri": f"s3://{bucket}/ckpt", "every_epochs": 1, "keep": 2})

    def outage() -> None:
        _wait_file(marks / "mark-2")
        try:
            _wait_logged(server.url, name, {1})
            server.kill()
        finally:
            (marks / "open-2").write_text("")

    control = _in_thread(outage)
    monkeypatch.setattr("ssl_platform.cli.run_experiment", _with_hooks([EpochGates(str(marks), gates=(2,), step_sleep_s=0.3)]))
    assert main(["run", str(spec), "--name", name]) == 0
    control.join(60)
    assert not control.errors, control.errors
    out = capsys.readouterr().out
    assert "kNN top-1 (trained encoder)" in out and f"sync-tracking s3://{bucket}/ckpt/{name}" in out
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix=f"ckpt/{name}/tracking/")["Contents"]]
    assert {f"ckpt/{name}/tracking/pending-rank0.jsonl", f"ckpt/{name}/tracking/pending-driver.jsonl"} <= set(keys)
    assert any("/artifacts-rank0/" in k and "/encoder/" in k for k in keys)  # the unsent encoder, kept

    server.start()
    server.wait_ready()
    assert main(["sync-tracking", f"s3://{bucket}/ckpt/{name}"]) == 0
    _assert_every_epoch_once(server.url, name, epochs)
    assert main(["sync-tracking", f"s3://{bucket}/ckpt/{name}"]) == 0  # nothing left: harmless
    assert "nothing pending" in capsys.readouterr().out
    _assert_every_epoch_once(server.url, name, epochs)


def _with_hooks(hooks: list):
    """``run_experiment`` with ``step_hooks`` (the command line has no option for test hooks)."""
    from ssl_platform.launch import run as run_module

    original = run_module.run_experiment

    def wrapped(spec, **kwargs):
        return original(spec, step_hooks=hooks, **kwargs)

    return wrapped
