"""Cluster submission through the Ray Job Submission SDK: ``submit``, ``status``, ``logs``, ``stop``.

``python -m ssl_platform submit SPEC [overrides] --address http://HEAD:8265`` validates the spec locally,
uploads the repository as the job's ``working_dir`` (``.rayignore``/``.gitignore`` honoured, plus
:data:`EXCLUDES`), passes tracking/S3 endpoint settings as ``env_vars`` and runs
``python -m ssl_platform run|sweep|chain SPEC ...`` on the cluster. Secret values are never printed.
AWS credentials go with a job only on request (``--pass-aws-credentials``); a job that uses ``s3://`` while they
are set locally is refused until the user chooses. The job records the submitting commit
(``SSL_PLATFORM_GIT_COMMIT``: the uploaded working_dir has no ``.git``). An unreachable dashboard, a refused token or
an unknown job id is a :class:`ClusterError` (one line from the CLI, no traceback).

Token authentication (Ray >= 2.52 enables it for local clusters when ``~/.ray/auth_token`` exists): the
client sends ``Authorization: Bearer <token>`` read from ``RAY_AUTH_TOKEN``, the file ``RAY_AUTH_TOKEN_PATH``
or ``~/.ray/auth_token`` (in that order), unless ``RAY_AUTH_MODE=disabled``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from ssl_platform.launch.chain import load_chain
from ssl_platform.spec import is_secret_key, load_spec, read_yaml
from ssl_platform.storage.s3 import spec_needs_s3
from ssl_platform.sweeps.sweep_spec import load_sweep
from ssl_platform.tracking.mlflow_runs import GIT_COMMIT_ENV, local_git_commit

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# On top of .gitignore/.rayignore (Ray honours both) and Ray's own defaults (.git, .venv, __pycache__).
EXCLUDES = [
    ".venv/", ".git/", "**/__pycache__/", "mlruns/", "mlruns.db", "mlflow.db", "checkpoints/", "ray_results/",
    "outputs/", ".services/", ".cluster/", ".pytest_cache/", ".ruff_cache/", "*.egg-info/", "benchmarks/results/",
]
# Environment passed to the job when set locally (endpoints and regions; not credentials).
PASSTHROUGH_ENV = [
    "MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
    "AWS_DEFAULT_REGION", "AWS_REGION", "SSL_PLATFORM_NUM_CPUS",
]
AWS_CREDENTIAL_ENV = ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def repo_root() -> Path:
    """The directory holding ``ssl_platform/`` (uploaded as the job's working_dir)."""
    return Path(__file__).resolve().parents[2]


def resolve_address(address: str | None) -> str:
    """``--address``, else ``RAY_API_SERVER_ADDRESS``/``RAY_ADDRESS`` (as ``ray job``), else the local dashboard."""
    addr = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS
    if addr in ("auto", "local"):
        return DEFAULT_ADDRESS
    if "://" not in addr:
        addr = f"http://{addr}"
    return addr.rstrip("/")


def auth_token() -> str | None:
    """The Ray auth token from ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def auth_headers() -> dict[str, str]:
    token = auth_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


class ClusterError(OSError):
    """The cluster cannot be reached, refuses the token, or does not know the job: one line, no traceback."""


@contextlib.contextmanager
def cluster_errors(address: str | None, job_id: str | None = None):
    """Turn the Job SDK's connection errors and HTTP errors into a :class:`ClusterError` saying what to do."""
    addr = resolve_address(address)
    try:
        yield
    except ClusterError:
        raise
    except ConnectionError as err:
        raise ClusterError(
            f"cannot reach the Ray dashboard at {addr} ({err}): start a cluster (`make cluster`, or `ray start --head`) "
            "or pass --address http://HEAD:8265 (or set RAY_ADDRESS)"
        ) from None
    except RuntimeError as err:
        text = str(err)
        if job_id is not None and ("404" in text or "does not exist" in text):
            raise ClusterError(f"no job {job_id!r} on the cluster at {addr} (list them: `ray job list --address {addr}`)") from None
        if "401" in text or "403" in text or "auth" in text.lower():
            raise ClusterError(
                f"the cluster at {addr} refused the request ({text.splitlines()[0][:200]}): set RAY_AUTH_TOKEN or "
                "RAY_AUTH_TOKEN_PATH to the cluster's token (`ray start` keeps it in ~/.ray/auth_token)"
            ) from None
        raise


def job_client(address: str | None):
    from ray.job_submission import JobSubmissionClient

    with cluster_errors(address):
        return JobSubmissionClient(resolve_address(address), headers=auth_headers())


def parse_env(items: list[str] | None) -> dict[str, str]:
    """``NAME=VALUE`` or ``NAME`` (value taken from the local environment) -> dict."""
    out: dict[str, str] = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not name or not name.replace("_", "").isalnum():
            raise ValueError(f"--env: expected NAME or NAME=VALUE, got {item!r}")
        if not sep:
            if name not in os.environ:
                raise ValueError(f"--env {name}: not set in the local environment (use {name}=VALUE)")
            value = os.environ[name]
        out[name] = value
    return out


def build_runtime_env(extra_env: dict[str, str] | None = None, *, aws_credentials: bool = False, pip: list[str] | None = None) -> dict[str, Any]:
    """runtime_env for a job: the repo as working_dir, excludes, passthrough env vars (+ ``extra_env``)."""
    names = PASSTHROUGH_ENV + (AWS_CREDENTIAL_ENV if aws_credentials else [])
    env = {k: os.environ[k] for k in names if os.environ.get(k)}
    env.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    env.setdefault("PYTHONUNBUFFERED", "1")
    # the uploaded working_dir has no .git: the MLflow run's git_commit tag comes from here
    env.setdefault(GIT_COMMIT_ENV, local_git_commit())
    env.update(extra_env or {})
    runtime_env: dict[str, Any] = {"working_dir": str(repo_root()), "excludes": list(EXCLUDES), "env_vars": env}
    if pip:
        runtime_env["pip"] = list(pip)
    return runtime_env


def redacted(runtime_env: dict[str, Any]) -> dict[str, Any]:
    """A copy safe to print: values of secret-like env vars replaced by ``***``."""
    env = {k: ("***" if is_secret_key(k) else v) for k, v in runtime_env.get("env_vars", {}).items()}
    return {**runtime_env, "env_vars": env}


def spec_argument(spec_path: str) -> str:
    """The spec path as the job sees it: relative to the working_dir when inside the repo, else absolute."""
    p = Path(spec_path).resolve()
    try:
        return p.relative_to(repo_root()).as_posix()
    except ValueError:
        return str(p)


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback  # 127.0.0.0/8: a local multi-node cluster (make cluster)
    except ValueError:
        return False


def run_spec(kind: str, spec_path: str, overrides: list[str]):
    """The validated run spec of a run or sweep spec (a sweep's ``sweep.*`` overrides go to its sweep section)."""
    if kind == "sweep":
        return load_sweep(spec_path, overrides).base

    return load_spec(spec_path, overrides)


def remote_warnings(spec_path: str, overrides: list[str], address: str | None, kind: str = "run") -> list[str]:
    """Local-only tracking/checkpoint URIs in a spec sent to a non-loopback cluster (results would stay there)."""
    from urllib.parse import urlparse

    host = urlparse(resolve_address(address)).hostname or ""
    if _is_loopback(host):
        return []
    spec = run_spec(kind, spec_path, overrides)
    out = []
    if not spec.tracking.uri.startswith(("http://", "https://", "databricks")):
        out.append(f"tracking.uri {spec.tracking.uri!r} is local to the node that runs the driver; "
                   "pass tracking.uri=http://MLFLOW_HOST:5000 (or set MLFLOW_TRACKING_URI on the cluster)")
    if not spec.checkpoint.uri.startswith("s3://"):
        out.append(f"checkpoint.uri {spec.checkpoint.uri!r} is a local path: multi-node runs need shared storage "
                   "(checkpoint.uri=s3://bucket/prefix)")
    return out


def validate_locally(kind: str, spec_path: str, overrides: list[str]) -> str:
    """Validate the spec before anything is submitted; return a one-line summary."""

    if kind == "chain":
        load_chain(spec_path, overrides)
        return f"chain spec {spec_path}"
    if kind == "sweep" and "sweep" not in read_yaml(spec_path):
        raise ValueError(f"sweep: expected a `sweep:` section in {spec_path} (a run spec plus sweep: {{metric, params, ...}}), got none")
    spec = run_spec(kind, spec_path, overrides)  # `sweep.*` overrides belong to the sweep section
    return f"{kind} spec {spec_path}: method={spec.method.name} data={spec.data.name} epochs={spec.optim.epochs}"


def uses_s3(kind: str, spec_path: str, overrides: list[str]) -> bool:
    """Whether the job reads or writes ``s3://`` (checkpoints, a teacher, chain stages)."""
    if kind == "chain":
        return "s3://" in Path(spec_path).read_text() or any("s3://" in o for o in overrides)

    spec = run_spec(kind, spec_path, overrides)
    return spec_needs_s3(spec.checkpoint, spec.method)


def check_aws_credentials(kind: str, spec_path: str, overrides: list[str], aws_credentials: bool | None) -> None:
    """Refuse, before submitting, a job that uses S3 while the local AWS credentials would silently stay behind.

    The job's processes see the cluster nodes' environment, not the submitting shell's: without
    ``--pass-aws-credentials`` (or a node-side IAM role, ``--no-pass-aws-credentials``) its first S3 request fails.
    """
    if aws_credentials is not None or not os.environ.get("AWS_ACCESS_KEY_ID"):
        return
    if uses_s3(kind, spec_path, overrides):
        raise ValueError(
            "AWS credentials: the spec uses s3:// and AWS_ACCESS_KEY_ID is set here, but the job runs with the cluster "
            "nodes' environment: pass --pass-aws-credentials to send AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY/"
            "AWS_SESSION_TOKEN with the job (never printed), or --no-pass-aws-credentials if the nodes have their own "
            "(IAM role, instance profile)"
        )


def entrypoint(kind: str, spec_arg: str, overrides: list[str], extra_args: list[str] | None = None) -> str:
    parts = ["python", "-m", "ssl_platform", kind, spec_arg, *overrides, *(extra_args or [])]
    return " ".join(shlex.quote(p) for p in parts)


def new_submission_id(kind: str, spec_path: str) -> str:
    import re
    import uuid

    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", Path(spec_path).stem)[:40]
    return f"ssl-{kind}-{stem}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def dashboard_url(address: str, job_id: str) -> str:
    return f"{resolve_address(address)}/#/jobs/{job_id}"


def follow_logs(client, job_id: str, out=None, timeout_s: float | None = None) -> str:
    """Print the job's logs as they come until it ends; return its final status."""
    out = out or sys.stdout

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(asyncio.wait_for(tail(), timeout_s))
    except asyncio.TimeoutError:
        print(f"[ssl_platform] stopped following job {job_id} after {timeout_s:.0f} s (it keeps running)", file=out)
    return wait_status(client, job_id, timeout_s=30)


def wait_status(client, job_id: str, timeout_s: float = 600, poll_s: float = 1.0) -> str:
    deadline = time.monotonic() + timeout_s
    status = str(client.get_job_status(job_id).value)
    while status not in TERMINAL and time.monotonic() < deadline:
        time.sleep(poll_s)
        status = str(client.get_job_status(job_id).value)
    return status


def submit(
    spec_path: str,
    overrides: list[str] | None = None,
    *,
    address: str | None = None,
    kind: str = "run",
    extra_args: list[str] | None = None,
    extra_env: dict[str, str] | None = None,
    aws_credentials: bool | None = False,
    pip: list[str] | None = None,
    submission_id: str | None = None,
    out=None,
) -> str:
    """Validate ``spec_path`` locally, then submit it as a Ray job; return the job (submission) id.

    ``aws_credentials``: True sends the local AWS credentials with the job, False does not, None (the CLI's default)
    refuses a job that uses S3 while credentials are set locally (:func:`check_aws_credentials`).
    """
    out = out or sys.stdout
    overrides = list(overrides or [])
    summary = validate_locally(kind, spec_path, overrides)
    check_aws_credentials(kind, spec_path, overrides, aws_credentials)
    print(f"[ssl_platform] {summary} is valid", file=out, flush=True)
    if kind != "chain":
        for warning in remote_warnings(spec_path, overrides, address, kind):
            print(f"[ssl_platform] warning: {warning}", file=out, flush=True)
    submission_id = submission_id or new_submission_id(kind, spec_path)
    # The MLflow run records it as its ray_job_id tag (tracking.start_run reads RAY_JOB_SUBMISSION_ID).
    runtime_env = build_runtime_env({"RAY_JOB_SUBMISSION_ID": submission_id, **(extra_env or {})},
                                    aws_credentials=bool(aws_credentials), pip=pip)
    ep = entrypoint(kind, spec_argument(spec_path), overrides, extra_args)
    with cluster_errors(address):
        job_id = job_client(address).submit_job(
            entrypoint=ep, runtime_env=runtime_env, submission_id=submission_id, metadata={"ssl_platform.kind": kind}
        )
    print(f"[ssl_platform] entrypoint: {ep}", file=out)
    print(f"[ssl_platform] runtime_env: {redacted(runtime_env)}", file=out)
    print(f"[ssl_platform] submitted job {job_id}", file=out)
    print(f"[ssl_platform] dashboard: {dashboard_url(address, job_id)}", file=out)
    print(f"[ssl_platform] follow: python -m ssl_platform logs {job_id} --follow --address {resolve_address(address)}", file=out, flush=True)
    return job_id


# ---- CLI ----------------------------------------------------------------------------------------------
def _cmd_submit(args: argparse.Namespace) -> int:
    kind = "sweep" if args.sweep else "chain" if args.chain else "run"
    extra = []
    if args.name:
        extra += ["--name", args.name]
    job_id = submit(
        args.spec, args.overrides, address=args.address, kind=kind, extra_args=extra, extra_env=parse_env(args.env),
        aws_credentials=args.pass_aws_credentials, pip=args.pip, submission_id=args.job_id,
    )
    if not args.follow:
        return 0
    with cluster_errors(args.address, job_id):
        status = follow_logs(job_client(args.address), job_id, timeout_s=args.timeout)
    print(f"[ssl_platform] job {job_id}: {status}")
    return 0 if status == "SUCCEEDED" else 1


def _cmd_status(args: argparse.Namespace) -> int:
    with cluster_errors(args.address, args.job_id):
        info = job_client(args.address).get_job_info(args.job_id)
    rows = [("job", args.job_id), ("status", str(info.status.value)), ("entrypoint", info.entrypoint),
            ("message", info.message or ""), ("dashboard", dashboard_url(args.address, args.job_id))]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k.ljust(width)} | {v}" for k, v in rows))
    return 0


def _cmd_logs(args: argparse.Namespace) -> int:
    with cluster_errors(args.address, args.job_id):
        client = job_client(args.address)
        if args.follow:
            client.get_job_status(args.job_id)  # an unknown job fails here, not inside the log stream
            status = follow_logs(client, args.job_id, timeout_s=args.timeout)
            print(f"[ssl_platform] job {args.job_id}: {status}")
            return 0
        sys.stdout.write(client.get_job_logs(args.job_id))
    return 0


def _cmd_stop(args: argparse.Namespace) -> int:
    with cluster_errors(args.address, args.job_id):
        stopped = job_client(args.address).stop_job(args.job_id)
    print(f"[ssl_platform] job {args.job_id}: {'stop requested' if stopped else 'already finished'}")
    return 0


def _add_address(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help=f"Ray dashboard address (default: RAY_API_SERVER_ADDRESS, RAY_ADDRESS or {DEFAULT_ADDRESS})")


def register_cli(sub) -> None:
    p = sub.add_parser("submit", help="submit a spec as a Ray job (ray job submit with the right runtime_env)")
    p.add_argument("spec", help="experiment spec YAML (inside the repo, or an absolute path present on the cluster)")
    p.add_argument("overrides", nargs="*", help="OmegaConf dotlist overrides")
    _add_address(p)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--sweep", action="store_true", help="run `ssl_platform sweep SPEC` on the cluster")
    mode.add_argument("--chain", action="store_true", help="run `ssl_platform chain SPEC` on the cluster")
    p.add_argument("--name", help="run name passed to the command on the cluster")
    p.add_argument("--job-id", help="submission id (default: generated by Ray)")
    p.add_argument("--env", action="append", metavar="NAME[=VALUE]", help="extra env var for the job (repeatable)")
    p.add_argument("--pass-aws-credentials", action=argparse.BooleanOptionalAction, default=None,
                   help="send AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY/AWS_SESSION_TOKEN with the job (never printed); "
                        "--no-pass-aws-credentials when the nodes have their own. A job using s3:// with credentials "
                        "set here and neither flag is refused")
    p.add_argument("--pip", action="append", help="extra pip requirement installed in the job's runtime_env (repeatable)")
    p.add_argument("--follow", action="store_true", help="stream the logs until the job ends; exit 1 unless it succeeded")
    p.add_argument("--timeout", type=float, default=None, help="stop following after this many seconds")
    p.set_defaults(func=_cmd_submit)

    for name, fn, help_ in (("status", _cmd_status, "status of a Ray job"), ("logs", _cmd_logs, "logs of a Ray job"),
                            ("stop", _cmd_stop, "stop a Ray job")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("job_id")
        _add_address(p)
        if name == "logs":
            p.add_argument("--follow", action="store_true")
            p.add_argument("--timeout", type=float, default=None)
        p.set_defaults(func=fn)
