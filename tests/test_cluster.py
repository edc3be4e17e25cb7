"""Operating on a real cluster: CLI rough edges (units), and a 3-node Ray cluster on loopback (slow).

The cluster is started by ``infra/local/cluster.sh`` (what ``make cluster`` runs): a head at 127.0.0.2 with no CPUs
(GCS, dashboard, job drivers) and worker nodes at 127.0.0.3/.4, token auth on, plus an S3-compatible server (moto)
and an MLflow server on 127.0.0.1. Only the nodes started here are stopped (their process groups).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, tiny_spec_dict

from ssl_platform.cli import build_parser, main, parse_args
from ssl_platform.launch import jobs
from ssl_platform.training.ray_runtime import free_port

VENV_BIN = Path(sys.executable).parent
SCRIPT = ROOT / "infra" / "local" / "cluster.sh"


def _write(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def _sweep_spec(tmp_path: Path, **sections) -> Path:
    raw = tiny_spec_dict(tmp_path, name="cluster-sweep", **sections)
    raw["sweep"] = {"metric": "loss", "mode": "min", "num_samples": 2, "max_concurrent_trials": 1, "scheduler": "fifo",
                    "params": {"optim.lr": {"choice": [1e-3, 2e-3]}}}
    return _write(tmp_path / "sweep.yaml", raw)


# ---- units: no cluster ----------------------------------------------------------------------------------
def test_overrides_after_flags_are_overrides_and_unknown_flags_still_refused(capsys):
    parser = build_parser()
    args = parse_args(parser, ["submit", "s.yaml", "a.b=1", "--sweep", "sweep.num_samples=1", "--name", "x", "c=2"])
    assert args.sweep and args.name == "x" and args.overrides == ["a.b=1", "sweep.num_samples=1", "c=2"]
    args = parse_args(parser, ["run", "s.yaml", "--resume", "--name", "r", "optim.epochs=1"])
    assert args.overrides == ["optim.epochs=1"] and args.resume
    for bad in (["run", "s.yaml", "--bogus"], ["run", "s.yaml", "--name", "r", "not-an-override"],
                ["status", "job", "x=1"]):
        with pytest.raises(SystemExit):
            parse_args(parser, bad)
        assert "unrecognized arguments" in capsys.readouterr().err


def test_submit_sweep_accepts_sweep_overrides_and_rejects_bad_ones(tmp_path):
    path = _sweep_spec(tmp_path)
    assert "sweep spec" in jobs.validate_locally("sweep", str(path), ["sweep.num_samples=1", "optim.epochs=1"])
    with pytest.raises(ValueError, match="sweep.num_samples"):
        jobs.validate_locally("sweep", str(path), ["sweep.num_samples=0"])
    remote = jobs.remote_warnings(str(path), ["sweep.num_samples=1"], "http://10.1.2.3:8265", "sweep")
    assert len(remote) == 2 and "tracking.uri" in remote[0]
    assert jobs.remote_warnings(str(path), ["sweep.num_samples=1"], "http://127.0.0.2:8265", "sweep") == []


def test_unreachable_cluster_is_one_error_line_not_a_traceback(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    address = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    spec = _sweep_spec(tmp_path)
    # the sweep override after the flag is accepted and validated; only then the connection fails, cleanly
    for argv in (["status", "raysubmit_x", "--address", address], ["logs", "raysubmit_x", "--address", address],
                 ["stop", "raysubmit_x", "--address", address],
                 ["submit", str(spec), "--sweep", "sweep.num_samples=1", "--address", address]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith(f"error: cannot reach the Ray dashboard at {address}") and "--address" in err, err
        assert "Traceback" not in err


def test_s3_job_with_local_credentials_needs_an_explicit_choice(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDLOCAL")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "local-secret")
    spec = _write(tmp_path / "s.yaml", tiny_spec_dict(tmp_path))
    address = f"http://127.0.0.1:{free_port()}"
    s3_override = "checkpoint.uri=s3://bucket/ckpt"
    assert main(["submit", str(spec), s3_override, "--address", address]) == 2
    err = capsys.readouterr().err
    assert "--pass-aws-credentials" in err and "--no-pass-aws-credentials" in err and "local-secret" not in err, err
    # a local checkpoint.uri needs no credentials; an explicit choice either way goes on to the cluster
    for argv in ([str(spec)], [str(spec), s3_override, "--pass-aws-credentials"], [str(spec), s3_override, "--no-pass-aws-credentials"]):
        assert main(["submit", *argv, "--address", address]) == 2
        assert "cannot reach the Ray dashboard" in capsys.readouterr().err


def test_submitted_jobs_carry_the_git_commit(monkeypatch):
    from ssl_platform.tracking import mlflow_runs as tracking

    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert len(head) == 40
    env = jobs.build_runtime_env()
    assert env["env_vars"][tracking.GIT_COMMIT_ENV] == head
    monkeypatch.setenv(tracking.GIT_COMMIT_ENV, "abc123")
    assert tracking.git_commit() == "abc123"  # in a job, whose working_dir has no .git


def test_cluster_token_is_never_uploaded_with_a_job():
    assert ".cluster/" in jobs.EXCLUDES
    assert ".cluster/" in (ROOT / ".rayignore").read_text().split() and ".cluster/" in (ROOT / ".gitignore").read_text().split()


def test_placement_strategy_reaches_ray_scaling_config(tiny_spec):
    from ssl_platform.training.trainer import build_trainer

    trainer = build_trainer(tiny_spec(["scaling.placement_strategy=STRICT_SPREAD", "scaling.num_workers=2"]), "r", None)
    assert trainer.scaling_config.placement_strategy == "STRICT_SPREAD"
    assert build_trainer(tiny_spec(), "r", None).scaling_config.placement_strategy == "PACK"
    assert trainer.run_config.logging_config.log_level == "WARNING"


# ---- a real 3-node cluster ------------------------------------------------------------------------------
def _script(cluster: dict, *args: str, timeout: float = 300) -> str:
    out = subprocess.run(["bash", str(SCRIPT), *args], env=cluster["script_env"], capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def _own_tmp(prefix: str) -> Path:
    """A temp dir of this module (pytest's basetemp of a long test can be rotated away by other pytest sessions)."""
    import tempfile

    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))  # short: Ray's unix socket paths have a length limit


@pytest.fixture(scope="module")
def services():
    """moto S3 server + an MLflow server (sqlite store, artifacts on that S3) on 127.0.0.1."""
    import logging

    import boto3
    import requests
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    tmp = _own_tmp("sslsvc")
    s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    s3.start()
    host, port = s3.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    aws = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL_S3": endpoint}
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket="ssl-cluster")
    mport = free_port()
    # MLflow 3's job runners (GenAI jobs: 5 huey consumers, ~275 MB each) serve nothing a training run uses
    env = {**os.environ, **aws, "MLFLOW_S3_ENDPOINT_URL": endpoint, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = (tmp / "mlflow.log").open("w")
    mlflow_proc = subprocess.Popen(
        [str(VENV_BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}",
         "--artifacts-destination", "s3://ssl-cluster/mlflow", "--host", "127.0.0.1", "--port", str(mport), "--workers", "1"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{mport}"

    def wait_ready() -> None:  # called by the cluster fixture: both start at once
        deadline = time.monotonic() + 180
        while True:
            try:
                if requests.get(f"{url}/health", timeout=2).ok:
                    return
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline and mlflow_proc.poll() is None, (tmp / "mlflow.log").read_text()[-3000:]
            time.sleep(0.5)

    try:
        yield {"s3": endpoint, "aws": aws, "mlflow": url, "bucket": "ssl-cluster", "wait_ready": wait_ready}
    finally:
        _kill_group(mlflow_proc)
        log.close()
        s3.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def _kill_group(proc: subprocess.Popen) -> None:
    import signal

    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=10)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def cluster(services):
    """`infra/local/cluster.sh start`: head 127.0.0.2 (0 CPUs) + worker nodes 127.0.0.3/.4 (2 CPUs each); the
    services (MLflow server) start meanwhile and are ready when this is."""
    cdir, ray_tmp = _own_tmp("sslcd"), _own_tmp("sslc")
    dash = free_port()
    script_env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_")) and k != "PYTHONPATH"}
    script_env.update(VENV=str(VENV_BIN.parent), SSL_CLUSTER_DIR=str(cdir), SSL_CLUSTER_TMP=str(ray_tmp),
                      SSL_RAY_PORT=str(free_port()), SSL_DASHBOARD_PORT=str(dash), RAY_raylet_start_wait_time_s="180")
    c = {"script_env": script_env, "address": f"http://127.0.0.2:{dash}", "dir": cdir}
    try:
        start = subprocess.Popen(["bash", str(SCRIPT), "start"], env=script_env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
        services["wait_ready"]()
        try:
            out, _ = start.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            start.kill()
            raise
        assert start.returncode == 0, out[-3000:]
        token = (cdir / "auth_token").read_text().strip()
        # what a user gets from `source .cluster/env`
        cli_env = {**{k: v for k, v in script_env.items() if not k.startswith("SSL_")},
                   "PATH": f"{VENV_BIN}{os.pathsep}{script_env.get('PATH', '')}", "RAY_AUTH_MODE": "token",
                   "RAY_AUTH_TOKEN_PATH": str(cdir / "auth_token"), "RAY_API_SERVER_ADDRESS": c["address"]}
        assert f"RAY_API_SERVER_ADDRESS={c['address']}" in (cdir / "env").read_text()
        c.update(token=token, cli_env=cli_env)
        yield c
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop"], env=script_env, capture_output=True, timeout=120)
        shutil.rmtree(cdir, ignore_errors=True)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _client(cluster):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(cluster["address"], headers={"Authorization": f"Bearer {cluster['token']}"})


def _wait_logs(client, job_id: str, pattern: str, timeout_s: float = 300) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        logs = client.get_job_logs(job_id)
        if re.search(pattern, logs):
            return logs
        status = str(client.get_job_status(job_id).value)
        assert status not in jobs.TERMINAL, f"job {status} before {pattern!r}:\n{logs[-4000:]}"
        assert time.monotonic() < deadline, f"no {pattern!r} after {timeout_s} s:\n{logs[-4000:]}"
        time.sleep(1)


def _train_worker_nodes(cluster, job_id: str) -> set[str]:
    """Node ids of the job's alive Ray Train workers, from the dashboard's State API."""
    import requests

    r = requests.get(f"{cluster['address']}/api/v0/actors", headers={"Authorization": f"Bearer {cluster['token']}"},
                     params={"filter_keys": "class_name", "filter_predicates": "=", "filter_values": "RayTrainWorker",
                             "detail": "true", "limit": 1000}, timeout=30)
    r.raise_for_status()
    actors = r.json()["data"]["result"]["result"]
    job_hex = _client(cluster).get_job_info(job_id).job_id
    return {a["node_id"] for a in actors if a["state"] == "ALIVE" and a.get("job_id") == job_hex}


def _mlflow_runs(uri: str, experiment: str):
    import mlflow

    c = mlflow.MlflowClient(tracking_uri=uri)
    exp = c.get_experiment_by_name(experiment)
    return c, (c.search_runs([exp.experiment_id]) if exp else [])


@pytest.mark.slow
def test_ray_cli_job_on_two_nodes_survives_losing_a_node(cluster, services, tmp_path):
    """Plain `ray job submit`: 2 Train workers on 2 nodes (STRICT_SPREAD), S3 checkpoints, MLflow server; a worker
    node is killed mid-run, the job says what it waits for, a replacement node joins, every epoch is logged once."""
    epochs = 3  # killed in epoch 2, resumed from epoch 1's checkpoint: epochs 2-3 after the restart
    raw = tiny_spec_dict(
        tmp_path, name="two-nodes",
        data={"num_samples": 800},  # 40 steps per epoch (a few seconds): time to kill a node mid-run
        optim={"epochs": epochs, "warmup_epochs": 1},
        scaling={"num_workers": 2, "cpus_per_worker": 1, "placement_strategy": "STRICT_SPREAD", "max_failures": 3},
        checkpoint={"uri": f"s3://{services['bucket']}/ckpt", "every_epochs": 1, "keep": 2},
        tracking={"uri": services["mlflow"], "experiment": "cluster"},
    )
    spec = _write(tmp_path / "spec.yaml", raw)
    job_id = f"raycli-{uuid.uuid4().hex[:8]}"
    runtime_env = {"env_vars": services["aws"]}
    out = subprocess.run(
        [str(VENV_BIN / "ray"), "job", "submit", "--working-dir", ".", "--submission-id", job_id, "--no-wait",
         "--runtime-env-json", json.dumps(runtime_env), "--", "python", "-m", "ssl_platform", "run", str(spec),
         "--name", "two-nodes-run"],
        cwd=ROOT, env=cluster["cli_env"], capture_output=True, text=True, timeout=180,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    client = _client(cluster)
    # epoch 2 is training: epoch 1's report (a barrier) and checkpoint are done, epoch 2 is not logged yet
    _wait_logs(client, job_id, rf"epoch 2/{epochs} step")
    assert len(_train_worker_nodes(cluster, job_id)) == 2  # one Train worker on each worker node

    _script(cluster, "kill", "w2")  # the machine at 127.0.0.3/.4 is gone
    logs = _wait_logs(client, job_id, r"waiting \d+s for resources", timeout_s=240)
    line = re.search(r"\[ssl_platform\] waiting .*", logs).group(0)
    assert "asks for 2 workers x {CPU: 1} (placement STRICT_SPREAD: one worker per node)" in line, line
    # the head (0 CPUs) and the surviving worker node; the lost node's CPUs are gone
    assert re.search(r"the cluster has 2 alive nodes \(1 large enough for a worker\), CPU [\d.]+ free of 2 in all", line), line
    assert "STRICT_SPREAD needs 2 nodes that each fit a worker" in line, line
    _script(cluster, "add", "w3", "127.0.0.5")  # a replacement machine joins
    status = jobs.wait_status(client, job_id, timeout_s=400)
    logs = client.get_job_logs(job_id)
    assert status == "SUCCEEDED", logs[-6000:]
    assert "resumed from checkpoint at epoch" in logs and "resources found after" in logs

    # console: rank 0's step lines and one summary per epoch; no Ray report dumps or preemption-watcher noise
    assert re.search(rf"\[two-nodes-run\] epoch 1/{epochs} step \d+/40 loss \d\.\d{{4}} lr \S+ \| \d+ img/s \| ETA \S+", logs)
    assert re.search(rf"\[two-nodes-run\] epoch {epochs}/{epochs} done in \S+s: loss \d\.\d{{4}}, \d+ img/s", logs)
    assert "Reporting training result" not in logs and "PreemptionWatcher" not in logs

    # MLflow server: one run, every epoch logged once, finished; checkpoints on S3 with their manifests
    c, runs = _mlflow_runs(services["mlflow"], "cluster")
    runs = [r for r in runs if r.data.tags.get("ssl.run_name") == "two-nodes-run"]
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    steps = [m.step for m in c.get_metric_history(runs[0].info.run_id, "loss")]
    assert sorted(steps) == list(range(1, epochs + 1)), steps
    import boto3

    s3 = boto3.client("s3", endpoint_url=services["s3"], region_name="us-east-1", aws_access_key_id="testing",
                      aws_secret_access_key="testing")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=services["bucket"], Prefix="ckpt/two-nodes-run/").get("Contents", [])]
    # Never an incomplete checkpoint: every checkpoint directory has its manifest, and the newest is the last epoch's.
    # checkpoint.keep=2: what the lost group wrote but never registered is pruned once the run ends
    dirs = {k.split("/")[2] for k in keys if k.count("/") > 2 and k.split("/")[2].startswith("checkpoint_")}  # not Ray's files
    manifests = {k.split("/")[2] for k in keys if k.endswith("/manifest.json")}
    assert manifests == dirs and len(manifests) == 2, keys
    newest = json.loads(s3.get_object(Bucket=services["bucket"], Key=f"ckpt/two-nodes-run/{max(manifests)}/manifest.json")["Body"].read())
    assert newest["epoch"] == epochs, newest


@pytest.mark.slow
def test_sweep_submitted_twice_is_refused_with_its_storage_uri(cluster, services, tmp_path, monkeypatch):
    """`ssl_platform submit --sweep` with overrides after the flags; its state lives in s3://, not in Ray's package
    cache, so a second submission is refused naming that URI. The MLflow runs carry the submitting commit."""
    spec = _sweep_spec(tmp_path, checkpoint={"uri": f"s3://{services['bucket']}/sweeps-ckpt"},
                       tracking={"uri": services["mlflow"], "experiment": "cluster-sweep"},
                       optim={"epochs": 1, "warmup_epochs": 0})
    for key, value in {**services["aws"], "RAY_AUTH_TOKEN": cluster["token"]}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    ids = []
    for _ in range(2):
        out = subprocess.run(
            [sys.executable, "-m", "ssl_platform", "submit", str(spec), "--sweep", "sweep.num_samples=1",
             "--name", "twice", "--address", cluster["address"], "--pass-aws-credentials"],
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=180,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        ids.append(re.search(r"submitted job (\S+)", out.stdout).group(1))
        status = jobs.wait_status(_client(cluster), ids[-1], timeout_s=400)
    client = _client(cluster)
    first, second = (client.get_job_logs(i) for i in ids)
    assert str(client.get_job_status(ids[0]).value) == "SUCCEEDED", first[-5000:]
    assert status == "FAILED", second[-3000:]
    root = f"s3://{services['bucket']}/sweeps-ckpt/sweeps/twice"
    assert f"sweep 'twice' already exists at {root}: pass --resume" in second, second[-3000:]
    assert "runtime_resources" not in second.split("already exists", 1)[1].splitlines()[0]

    c, runs = _mlflow_runs(services["mlflow"], "cluster-sweep")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert len(runs) == 2 and all(r.data.tags["git_commit"] == head for r in runs)  # parent + 1 trial
    parent = [r for r in runs if r.data.tags.get("sweep.role") == "parent"][0]
    assert parent.data.tags["sweep.state_uri"] == root and parent.info.status == "FINISHED"


@pytest.mark.slow
def test_status_and_logs_of_an_unknown_job_say_so(cluster, capsys, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", cluster["token"])
    for command in ("status", "logs"):
        assert main([command, "raysubmit_nope", "--address", cluster["address"]]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: no job 'raysubmit_nope' on the cluster at {cluster['address']}"), err
