"""``python -m benchmarks.tracking_outage``: how long a tracking-server outage holds training (issue 29).

Starts a real MLflow server (sqlite store, local artifacts) on a loopback port, then runs the command line
(``python -m ssl_platform run SPEC tracking.uri=http://...``) twice for ``--epochs`` epochs: once with the server up
throughout, once with the server killed (SIGKILL) when the driver's console shows epoch 2 done and started again
``--outage-s`` seconds later (``--outage-s 0``: never, and ``sync-tracking`` afterwards). Reported: the seconds from
"epoch 2 done" to "epoch N done" in both runs (the difference is the stall), the exit codes, and whether every
epoch is in MLflow exactly once. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from ssl_platform.training.ray_runtime import free_port

ROOT = Path(__file__).resolve().parents[1]
EPOCH_DONE = re.compile(r"epoch (\d+)/(\d+) done")


def start_mlflow_server(root: Path, port: int, env: dict[str, str]) -> subprocess.Popen:
    """``mlflow server`` on 127.0.0.1:``port`` (sqlite store, artifacts and ``mlflow.log`` in ``root``) in its own
    process group, so that it can be killed as a whole."""
    return subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
         f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts"),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env={**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, stdout=(root / "mlflow.log").open("a"),
        stderr=subprocess.STDOUT, start_new_session=True)


class Server:
    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = start_mlflow_server(self.root, self.port, dict(os.environ))
        for _ in range(600):
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=2)
                return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"mlflow server did not start: see {self.root / 'mlflow.log'}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def run_once(args: argparse.Namespace, server: Server, work: Path, name: str, outage_s: float | None) -> dict:
    """One CLI run; with ``outage_s`` the server is killed after epoch 2 (and restarted ``outage_s`` later)."""
    cmd = [sys.executable, "-m", "ssl_platform", "run", args.spec, "--name", name, f"optim.epochs={args.epochs}",
           f"tracking.uri={server.url}", "tracking.experiment=outage-bench", f"checkpoint.uri={work / 'ckpt'}",
           f"tracking.flush_timeout_s={args.flush_timeout_s}", *args.overrides]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    done: dict[int, float] = {}
    restart: threading.Thread | None = None
    for line in proc.stdout:
        m = EPOCH_DONE.search(line)
        if m and int(m.group(1)) not in done:
            done[int(m.group(1))] = time.monotonic()
            if outage_s is not None and int(m.group(1)) == 2:
                server.kill()
                if outage_s > 0:
                    restart = threading.Thread(target=lambda: (time.sleep(outage_s), server.start()), daemon=True)
                    restart.start()
        if args.verbose or "tracking" in line or "error" in line.lower():
            print(line, end="", flush=True)
    rc = proc.wait()
    if restart is not None:
        restart.join()
    return {"exit_code": rc, "epoch2_to_last_s": round(done[args.epochs] - done[2], 1) if {2, args.epochs} <= set(done) else None}


def logged_once(server: Server, name: str, epochs: int) -> bool:
    import mlflow

    c = mlflow.MlflowClient(server.url)
    exp = c.get_experiment_by_name("outage-bench")
    runs = c.search_runs([exp.experiment_id], filter_string=f"tags.`ssl.run_name` = '{name}'")
    if len(runs) != 1:
        return False
    steps = sorted(m.step for m in c.get_metric_history(runs[0].info.run_id, "loss"))
    return steps == list(range(1, epochs + 1)) and c.get_run(runs[0].info.run_id).info.status == "FINISHED"


def run_tracking_outage(spec: str = "experiments/mae_vit_tiny_digits.yaml", epochs: int = 8, outage_s: float = 45.0,
                        flush_timeout_s: float = 120.0, overrides: list[str] | None = None, verbose: bool = False,
                        log=print) -> dict:
    """The two runs (server up; killed after epoch 2 for ``outage_s``) and what they took: the ``tracking`` section
    of ``make bench``."""
    args = argparse.Namespace(spec=spec, epochs=epochs, outage_s=outage_s, flush_timeout_s=flush_timeout_s,
                              overrides=list(overrides or []), verbose=verbose)
    work = Path(tempfile.mkdtemp(prefix="tracking-outage-"))
    server = Server(work)
    server.start()
    try:
        span = f"for {outage_s:g} s" if outage_s else "until the end"
        log(f"tracking outage: {epochs} epochs of {spec}, server up, then killed after epoch 2 {span}")
        base = run_once(args, server, work, "bench-up", None)
        out = run_once(args, server, work, "bench-outage", outage_s)
        if server.proc is None or server.proc.poll() is not None:
            server.start()
        if outage_s == 0:
            sync = subprocess.run([sys.executable, "-m", "ssl_platform", "sync-tracking", str(work / "ckpt" / "bench-outage")],
                                  cwd=ROOT, check=False)
            out["sync_exit_code"] = sync.returncode
        stall = (round(out["epoch2_to_last_s"] - base["epoch2_to_last_s"], 1)
                 if out["epoch2_to_last_s"] is not None and base["epoch2_to_last_s"] is not None else None)
        return {"spec": spec, "epochs": epochs, "outage_s": outage_s, "server_up": base, "with_outage": out,
                "stall_s": stall, "every_epoch_logged_once": logged_once(server, "bench-up", epochs)
                and logged_once(server, "bench-outage", epochs)}
    finally:
        server.kill()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.tracking_outage", description=__doc__.split("\n\n")[0])
    ap.add_argument("--spec", default="experiments/mae_vit_tiny_digits.yaml")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--outage-s", type=float, default=45.0, help="server down this long after epoch 2 (0: until the end)")
    ap.add_argument("--flush-timeout-s", type=float, default=120.0)
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("overrides", nargs="*", help="spec overrides for both runs")
    a = ap.parse_args(argv)
    result = run_tracking_outage(a.spec, a.epochs, a.outage_s, a.flush_timeout_s, a.overrides, a.verbose)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
