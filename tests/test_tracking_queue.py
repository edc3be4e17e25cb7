"""The tracking queue without Ray: each metric step logged once (a restarted worker, a replay, a second replay), the
pending file replayed by ``sync-tracking``, and ``tracking.require_server_at_start`` refusing before anything starts.
A real sqlite MLflow store; the refusal uses a loopback port nothing listens on."""

from __future__ import annotations

import mlflow
import yaml
from conftest import tiny_spec_dict

from ssl_platform.cli import main
from ssl_platform.spec import spec_from_dict
from ssl_platform.tracking.mlflow_runs import SpecRecord
from ssl_platform.tracking.outbox import Record, read_pending, write_pending
from ssl_platform.tracking.run_log import journal_for, open_run
from ssl_platform.training.ray_runtime import free_port


def _steps(uri: str, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in mlflow.MlflowClient(uri).get_metric_history(run_id, key))


def test_each_step_once_and_sync_tracking_replays_a_pending_file_once(tmp_path, capsys):
    spec = spec_from_dict(tiny_spec_dict(tmp_path))
    journal = journal_for(spec.checkpoint, "q-run")
    run = open_run(spec.tracking, "q-run", SpecRecord.of(spec), journal=journal)
    assert run.run_id, "a local store answers: the run exists before training starts"
    run.log_metrics({"loss": 1.0, "epoch": 1}, step=1)
    run.for_rank0().log_metrics({"loss": 1.0, "epoch": 1}, step=1)  # a restarted rank 0 logs its restored epoch again
    run.log_metrics({"loss": 0.5, "epoch": 2, "note": "text is not a metric"}, step=2)
    assert _steps(spec.tracking.uri, run.run_id, "loss") == [1, 2]

    # what a process whose server never answered leaves: metrics, tags, the run's end
    pending = [Record("log_metrics", run.ref, {"metrics": {"loss": 0.25, "epoch": 3}, "step": 3}, journal, "rank0"),
               Record("set_tags", run.ref, {"tags": {"final_checkpoint": "somewhere"}}, journal, "rank0"),
               Record("set_terminated", run.ref, {"status": "FINISHED"}, journal, "rank0")]
    uri = write_pending(journal, "rank0", pending)
    assert uri == str(tmp_path / "ckpt" / "q-run" / "tracking" / "pending-rank0.jsonl")
    assert [r.kind for r in read_pending(journal, "rank0")] == ["log_metrics", "set_tags", "set_terminated"]
    assert main(["sync-tracking", str(tmp_path / "ckpt" / "q-run")]) == 0
    assert read_pending(journal, "rank0") == []  # removed once sent
    write_pending(journal, "rank0", pending)  # replayed twice (a copy kept somewhere): still once
    assert main(["sync-tracking", "q-run", "--checkpoint-uri", str(tmp_path / "ckpt")]) == 0
    assert main(["sync-tracking", "q-run", "--checkpoint-uri", str(tmp_path / "ckpt")]) == 0
    assert "nothing pending" in capsys.readouterr().out

    c = mlflow.MlflowClient(spec.tracking.uri)
    assert _steps(spec.tracking.uri, run.run_id, "loss") == [1, 2, 3]
    got = c.get_run(run.run_id)
    assert got.info.status == "FINISHED" and got.data.tags["final_checkpoint"] == "somewhere"
    assert got.data.params["optim.lr"] == str(spec.optim.lr)
    assert "spec.yaml" in {a.path for a in c.list_artifacts(run.run_id)}


def test_require_server_at_start_refuses_before_ray_with_one_line(tmp_path, capsys):
    raw = tiny_spec_dict(tmp_path)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    rc = main(["run", str(path), f"tracking.uri={url}", "tracking.require_server_at_start=true"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith(f"error: tracking server {url} does not answer") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and "tracking.require_server_at_start" in err
    assert not (tmp_path / "ckpt").exists()  # refused before the checkpoint storage and Ray


def test_sync_tracking_with_the_server_still_down_is_one_error_line_and_keeps_the_file(tmp_path, capsys, monkeypatch):
    from ssl_platform.tracking.outbox import Journal, RunRef

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    journal = Journal(str(tmp_path / "ckpt" / "r" / "tracking"))
    ref = RunRef(url, "exp", "r", key="k1")
    write_pending(journal, "rank0", [Record("log_metrics", ref, {"metrics": {"loss": 1.0}, "step": 1}, journal, "rank0")])
    assert main(["sync-tracking", str(tmp_path / "ckpt" / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: tracking server {url} does not answer") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert [r.payload["step"] for r in read_pending(journal, "rank0")] == [1]  # nothing lost
