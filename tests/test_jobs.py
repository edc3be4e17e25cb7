"""Cluster submission: runtime_env and auth units, and real jobs on a `ray start --head` cluster on loopback."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, TINY_VIT, tiny_spec_dict

from ssl_platform.launch import jobs
from ssl_platform.spec import SpecError
from ssl_platform.training.ray_runtime import free_port

VENV_BIN = Path(sys.executable).parent


# ---- units (no cluster) ---------------------------------------------------------------------------------
def test_runtime_env_uploads_repo_with_excludes_and_passes_endpoints_not_credentials(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3:9000")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value")
    env = jobs.build_runtime_env({"EXTRA": "1"})
    assert env["working_dir"] == str(ROOT)
    for pattern in (".venv/", "mlruns/", "checkpoints/", "ray_results/"):
        assert pattern in env["excludes"]
    assert env["env_vars"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert env["env_vars"]["AWS_ENDPOINT_URL_S3"] == "http://s3:9000" and env["env_vars"]["EXTRA"] == "1"
    assert "AWS_SECRET_ACCESS_KEY" not in env["env_vars"] and "AWS_ACCESS_KEY_ID" not in env["env_vars"]
    with_creds = jobs.build_runtime_env(aws_credentials=True)
    assert with_creds["env_vars"]["AWS_SECRET_ACCESS_KEY"] == "s3cr3t-value"
    shown = str(jobs.redacted(with_creds))
    assert "s3cr3t-value" not in shown and "AKIDEXAMPLE" not in shown and "http://mlflow:5000" in shown
    assert (ROOT / ".rayignore").is_file()
    rayignore = (ROOT / ".rayignore").read_text().split()
    assert ".venv/" in rayignore and "mlruns/" in rayignore and "checkpoints/" in rayignore


def test_auth_token_sources(monkeypatch, tmp_path):
    token_file = tmp_path / "tok"
    token_file.write_text("from-file\n")
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token_file))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    assert jobs.auth_headers() == {"Authorization": "Bearer from-file"}
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert jobs.auth_token() == "from-env"
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert jobs.auth_headers() == {}


def test_spec_is_validated_before_connecting(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(tiny_spec_dict(tmp_path)))
    # Nothing listens on this port: a SpecError (not a connection error) proves validation came first.
    with pytest.raises(SpecError, match="method.name"):
        jobs.submit(str(spec), ["method.name=nope"], address=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(ValueError, match="sweep"):
        jobs.submit(str(spec), [], address=f"http://127.0.0.1:{free_port()}", kind="sweep")
    assert jobs.entrypoint("run", jobs.spec_argument(str(ROOT / "experiments" / "mae_vit_tiny_digits.yaml")), ["optim.epochs=1"]) == (
        "python -m ssl_platform run experiments/mae_vit_tiny_digits.yaml optim.epochs=1"
    )
    assert jobs.spec_argument(str(spec)) == str(spec)
    assert jobs.resolve_address("10.0.0.1:8265") == "http://10.0.0.1:8265"


def test_remote_cluster_warns_about_local_uris():
    default = str(ROOT / "experiments" / "mae_vit_tiny_digits.yaml")
    warnings = jobs.remote_warnings(default, [], "http://10.1.2.3:8265")
    assert len(warnings) == 2 and "tracking.uri" in warnings[0] and "checkpoint.uri" in warnings[1]
    shared = ["tracking.uri=http://mlflow:5000", "checkpoint.uri=s3://bucket/ckpt"]
    assert jobs.remote_warnings(default, shared, "http://10.1.2.3:8265") == []
    assert jobs.remote_warnings(default, [], "http://127.0.0.1:8265") == []


# ---- a real cluster: `ray start --head` in its own process group ---------------------------------------
@pytest.fixture(scope="module")
def ray_cluster():
    """A separate Ray head (2 CPUs, dashboard on loopback, its own temp dir and token); killed afterwards."""
    temp_dir = tempfile.mkdtemp(prefix="sslj", dir="/tmp")  # short: Ray's unix socket paths have a length limit
    token = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH", "RAY_AUTH_TOKEN_PATH")}
    env.update(PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token,
               RAY_USAGE_STATS_ENABLED="0", RAY_raylet_start_wait_time_s="180")
    gcs, dash = free_port(), free_port()
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--port", str(gcs), "--node-ip-address", "127.0.0.1",
           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--num-cpus", "2", "--include-dashboard", "true",
           "--temp-dir", temp_dir,
           # fixed default ports (agent 52365, ...) collide with other local clusters: pick free ones
           "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
           "--metrics-export-port", str(free_port()), "--runtime-env-agent-port", str(free_port()),
           "--ray-client-server-port", str(free_port()), "--object-store-memory", str(200 * 1024**2), "--disable-usage-stats"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=180)
        assert proc.returncode == 0, out
        cluster = {"address": f"http://127.0.0.1:{dash}", "token": token, "env": env}
        _wait_until_accepting_jobs(cluster)
        yield cluster
    finally:
        _kill_group(proc.pid)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _kill_group(pgid: int) -> None:
    """Stop exactly this cluster: every process of the `ray start` process group (daemons keep the group)."""
    for sig, wait_s in ((signal.SIGTERM, 6), (signal.SIGKILL, 5)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.5)


def _wait_until_accepting_jobs(cluster, timeout_s: float = 120) -> None:
    """`ray start` returns before the head's job agent is up ("No available agent"): submit a no-op until it runs."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            job = _client(cluster).submit_job(entrypoint="python -c pass")
            break
        except (RuntimeError, ConnectionError) as err:
            if time.monotonic() > deadline:
                raise AssertionError(f"cluster {cluster['address']} accepts no job after {timeout_s} s: {err}") from err
            time.sleep(2)
    assert jobs.wait_status(_client(cluster), job, timeout_s=timeout_s) == "SUCCEEDED"


def _client(cluster):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(cluster["address"], headers={"Authorization": f"Bearer {cluster['token']}"})


def test_jobs_on_a_cluster_with_ray_cli_and_ssl_platform_submit(ray_cluster, tmp_path, monkeypatch, capsys):
    import mlflow

    from ssl_platform.cli import main

    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(tiny_spec_dict(tmp_path)))
    env = dict(ray_cluster["env"])
    client = _client(ray_cluster)

    # 1. plain `ray job submit` (the Ray CLI: RAY_AUTH_MODE=token + RAY_AUTH_TOKEN), no wait, of a plug-in method
    # from the working directory (examples/custom_method): it ships with the job and imports in its workers
    plugin_spec = tmp_path / "plugin.yaml"
    plugin_spec.write_text(yaml.safe_dump({**tiny_spec_dict(tmp_path), "method": {
        "name": "examples.custom_method.simsiam:SimSiam", "encoder_name": "vit_tiny_patch16_224",
        "encoder_kwargs": dict(TINY_VIT), "proj_dim": 32, "pred_dim": 16}}))
    cli_id = f"raycli-{uuid.uuid4().hex[:8]}"
    out = subprocess.run(
        [str(VENV_BIN / "ray"), "job", "submit", "--address", ray_cluster["address"], "--working-dir", ".",
         "--submission-id", cli_id, "--no-wait", "--", "python", "-m", "ssl_platform", "run", str(plugin_spec), "--name",
         "via-ray-cli"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=180,
    )
    assert out.returncode == 0, out.stdout + out.stderr

    # 2. `python -m ssl_platform submit --follow` (token from RAY_AUTH_TOKEN only: our Authorization header)
    env_sub = {k: v for k, v in env.items() if k != "RAY_AUTH_MODE"}
    env_sub["PYTHONPATH"] = str(ROOT)
    out = subprocess.run(
        [sys.executable, "-m", "ssl_platform", "submit", str(spec), "--name", "via-submit", "--address", ray_cluster["address"],
         "--env", "MY_API_TOKEN=supersecret-value", "--follow", "--timeout", "400"],
        cwd=ROOT, env=env_sub, capture_output=True, text=True, timeout=480,
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "supersecret-value" not in out.stdout + out.stderr
    job_id = re.search(r"submitted job (\S+)", out.stdout).group(1)
    assert f"{ray_cluster['address']}/#/jobs/{job_id}" in out.stdout
    assert "kNN top-1 (trained encoder)" in out.stdout  # the job's own output, streamed

    assert jobs.wait_status(client, cli_id, timeout_s=400) == "SUCCEEDED", client.get_job_logs(cli_id)[-4000:]

    # status / logs through our CLI, in-process
    monkeypatch.setenv("RAY_AUTH_TOKEN", ray_cluster["token"])
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    capsys.readouterr()
    assert main(["status", job_id, "--address", ray_cluster["address"]]) == 0
    assert "SUCCEEDED" in capsys.readouterr().out
    assert main(["logs", cli_id, "--address", ray_cluster["address"]]) == 0
    assert "via-ray-cli" in capsys.readouterr().out

    # each job made a finished MLflow run in the spec's sqlite store; ours carries the job id
    c = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = c.search_runs([c.get_experiment_by_name("tests").experiment_id])
    by_name = {r.data.tags.get("ssl.run_name"): r for r in runs}
    assert set(by_name) == {"via-ray-cli", "via-submit"}
    assert all(r.info.status == "FINISHED" and "knn_top1" in r.data.metrics for r in runs)
    assert by_name["via-submit"].data.tags.get("ray_job_id") == job_id
    assert by_name["via-ray-cli"].data.tags["method"] == "examples.custom_method.simsiam:SimSiam"

    # stop: a long job is stopped through our CLI
    sleeper = client.submit_job(entrypoint="python -c 'import time; time.sleep(300)'")
    deadline = time.monotonic() + 60
    while str(client.get_job_status(sleeper).value) == "PENDING" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert main(["stop", sleeper, "--address", ray_cluster["address"]]) == 0
    assert jobs.wait_status(client, sleeper, timeout_s=60) == "STOPPED"


def test_local_object_store_size(monkeypatch):
    """A local instance's object store (Ray Data's decoded batches): 2 GiB by default, at most 30% of RAM, or
    SSL_PLATFORM_OBJECT_STORE_MB; a bad value is refused naming the variable."""
    from ssl_platform.training.ray_runtime import local_object_store_bytes

    monkeypatch.delenv("SSL_PLATFORM_OBJECT_STORE_MB", raising=False)
    assert local_object_store_bytes(64 * 1024**3) == 2048 * 1024**2
    assert local_object_store_bytes(4 * 1024**3) == int(0.3 * 4 * 1024**3)
    monkeypatch.setenv("SSL_PLATFORM_OBJECT_STORE_MB", "300")
    assert local_object_store_bytes(64 * 1024**3) == 300 * 1024**2
    for bad in ("2GB", "10"):
        monkeypatch.setenv("SSL_PLATFORM_OBJECT_STORE_MB", bad)
        with pytest.raises(ValueError, match="SSL_PLATFORM_OBJECT_STORE_MB"):
            local_object_store_bytes()
