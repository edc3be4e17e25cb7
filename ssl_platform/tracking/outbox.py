"""Tracking off the training path: every MLflow write goes through a queue that a background sender drains.

A process that tracks (the driver of a run, sweep or chain; rank 0 of a run's workers) puts *records* in its
process-wide :class:`Outbox`: create or reopen a run, params, tags, metrics at a step, an artifact, the run's end.
One daemon thread sends them in order, retrying with backoff (at most :data:`MAX_BACKOFF_S` between tries) while
the process lives; a step or an epoch only appends to a list. Records name their run by a :class:`RunRef`: the
``ssl.run_name`` tag and, for the attempt that created or reopened it, a fresh ``ssl.run_key`` tag, because the
server's run id does not exist while the server is down at start. Only the driver creates the run; rank 0 finds
it by its key once it exists.

Exactly once: before metrics are sent, the sender reads the run's history of each key (once per key and process,
again after a failed send whose outcome is unknown) and leaves out the steps already there, so a replay, a
retried batch the server had stored, or an epoch logged again after a worker restart never duplicates a point.
Every other record is idempotent (tags, params with the same values, artifacts at the same path).

While the server does not answer, the console says so once, and again when it catches up. The records not sent
yet are kept in a *pending file*, ``<checkpoint.uri>/<run_name>/tracking/pending-<role>.jsonl`` (local or S3,
through the storage layer), with copies of the unsent artifacts under ``artifacts-<role>/``; it is rewritten while
the server is away (a crashed process loses nothing already written there), removed once everything is sent, and
written a last time at the run's end after a bounded wait (``tracking.flush_timeout_s``). A process that starts for
the same run and role takes the file over; ``python -m ssl_platform sync-tracking RUN`` replays it later.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ssl_platform.storage.s3 import is_s3
from ssl_platform.storage.uri_files import join_uri, read_text, resolve_uri, write_text
from ssl_platform.tracking.mlflow_runs import RUN_NAME_TAG, client, experiment_id, log_params

RUN_KEY_TAG = "ssl.run_key"
MAX_BACKOFF_S = 5.0  # between tries of a record; a refused connection costs nothing
STILL_BEHIND_EVERY_S = 60.0
PENDING_WRITE_EVERY_S = 5.0
# MLflow's HTTP client retries one request for minutes by default (7 retries, backoff factor 2, 120 s timeout): in
# the sender that only delays noticing that the server is back. A process that tracks over HTTP uses these unless
# the environment sets them; they travel with the run to rank 0.
HTTP_ENV_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                     "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
LOCAL_WAIT_S = 30.0  # a local store (sqlite, a directory) is not a server: its writes are waited for, as before


class TrackingUnavailableError(OSError):
    """The tracking server could not be reached where the run needs it (one message naming the URI)."""


class ArtifactGoneError(FileNotFoundError):
    """A queued artifact whose copies are gone: it can never be sent."""


class _NotYet(Exception):
    """The run a record belongs to was not created yet (by the driver): retried, not an outage."""


def is_remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://", "databricks"))


def log(msg: str) -> None:
    print(f"[ssl_platform] tracking: {msg}", flush=True)


# ---- what a record names ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunRef:
    """One MLflow run, independent of the server's run id: found by ``key`` (the ``ssl.run_key`` tag set by the
    attempt that created or reopened it), else by ``run_name`` (the ``ssl.run_name`` tag, newest run);
    ``run_id`` when it is known up front."""

    uri: str
    experiment: str
    run_name: str
    key: str | None = None
    run_id: str | None = None

    @property
    def cache_key(self) -> str:
        return self.run_id or f"{self.uri}|{self.experiment}|{self.key or ''}|{self.run_name}"


@dataclass(frozen=True)
class Journal:
    """Where unsent records are kept: ``uri`` (``.../tracking``, local or ``s3://``) on ``fs`` (None: local/default)."""

    uri: str
    fs: Any = None

    def pending_uri(self, role: str) -> str:
        return join_uri(self.uri, f"pending-{role}.jsonl")

    def artifacts_uri(self, role: str) -> str:
        return join_uri(self.uri, f"artifacts-{role}")


@dataclass
class Record:
    kind: str  # create_run | log_params | set_tags | log_metrics | log_artifact | set_terminated | close_trial
    run: RunRef
    payload: dict[str, Any]
    journal: Journal | None = None
    role: str = "driver"
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    ts: int = field(default_factory=lambda: int(time.time() * 1000))
    spool: str | None = None  # log_artifact: this process's copy of the file or directory
    stored: str | None = None  # log_artifact: its copy beside the pending file (relative to the journal)
    done: threading.Event = field(default_factory=threading.Event, repr=False)
    failed: threading.Event = field(default_factory=threading.Event, repr=False)
    error: str | None = None

    def to_json(self) -> str:
        return json.dumps({"id": self.id, "kind": self.kind, "ts": self.ts, "run": self.run.__dict__,
                           "payload": self.payload, "stored": self.stored, "error": self.error}, sort_keys=True)

    @classmethod
    def from_json(cls, line: str, journal: Journal | None, role: str) -> Record:
        d = json.loads(line)
        return cls(d["kind"], RunRef(**d["run"]), d["payload"], journal, role, d["id"], d["ts"], None,
                   d.get("stored"))


# ---- applying one record ---------------------------------------------------------------------------------
class Sender:
    """Applies records to MLflow: resolves run refs (cached), de-duplicates metric steps, creates runs."""

    def __init__(self) -> None:
        self.run_ids: dict[str, str] = {}
        self.history: dict[tuple[str, str], set[int]] = {}

    def apply(self, rec: Record) -> None:
        c = client(rec.run.uri)
        if rec.kind == "create_run":
            self.run_ids[rec.run.cache_key] = self._create(c, rec)
            return
        run_id = self.resolve(c, rec.run)
        p = rec.payload
        if rec.kind == "log_metrics":
            self._log_metrics(c, run_id, p["metrics"], int(p["step"]), rec.ts)
        elif rec.kind == "log_params":
            log_params(c, run_id, p["params"])
        elif rec.kind == "set_tags":
            _set_tags(c, run_id, p["tags"])
        elif rec.kind == "log_artifact":
            c.log_artifact(run_id, _artifact_path(rec), p.get("artifact_path"))
        elif rec.kind == "set_terminated":
            c.set_terminated(run_id, status=p["status"])
        elif rec.kind == "close_trial":
            _close_trial(c, run_id, p)
        elif rec.kind == "count_tag":  # e.g. a trial's sweep.attempts: one more than the run says
            c.set_tag(run_id, p["tag"], str(int(c.get_run(run_id).data.tags.get(p["tag"], "0")) + 1))
        else:
            raise ValueError(f"unknown tracking record {rec.kind!r}")

    def resolve(self, c, ref: RunRef) -> str:
        if ref.run_id:
            return ref.run_id
        if ref.cache_key in self.run_ids:
            return self.run_ids[ref.cache_key]
        found = _search(c, ref)
        if found is None:
            raise _NotYet(f"run {ref.run_name!r} not created yet in experiment {ref.experiment!r}")
        self.run_ids[ref.cache_key] = found
        return found

    def _create(self, c, rec: Record) -> str:
        """Create the run (or, ``resume``, reopen the newest one of that name) and give it this attempt's key;
        a run created by an earlier try of this record (found by key) gets its params and spec again."""
        p, ref = rec.payload, rec.run
        exp_id = experiment_id(c, ref.experiment)
        run_id = _search(c, ref)
        if run_id is None and p.get("resume"):
            reopened = _existing(c, exp_id, ref, p.get("run_id_hint"))
            if reopened:
                c.update_run(reopened, status="RUNNING")
                c.set_tag(reopened, RUN_KEY_TAG, ref.key)
                return reopened
        if run_id is None:
            tags = dict(p["tags"], **{RUN_KEY_TAG: ref.key})
            if p.get("parent"):
                tags["mlflow.parentRunId"] = self.resolve(c, RunRef(**p["parent"]))
            run_id = c.create_run(exp_id, tags=tags, run_name=p.get("display_name") or ref.run_name).info.run_id
        if p.get("params"):
            log_params(c, run_id, p["params"])
        if p.get("spec_yaml"):
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "spec.yaml"
                path.write_text(p["spec_yaml"])
                c.log_artifact(run_id, str(path))
        return run_id

    def _log_metrics(self, c, run_id: str, metrics: dict[str, float], step: int, ts: int) -> None:
        from mlflow.entities import Metric

        todo = {k: v for k, v in metrics.items() if step not in self._steps(c, run_id, k)}
        if not todo:
            return
        try:
            c.log_batch(run_id, metrics=[Metric(k, float(v), ts, step) for k, v in todo.items()])
        except Exception:
            for k in todo:  # the server may have stored the batch: read the history again before the next try
                self.history.pop((run_id, k), None)
            raise
        for k in todo:
            self.history[(run_id, k)].add(step)

    def _steps(self, c, run_id: str, key: str) -> set[int]:
        if (run_id, key) not in self.history:
            self.history[(run_id, key)] = {m.step for m in c.get_metric_history(run_id, key)}
        return self.history[(run_id, key)]


def _search(c, ref: RunRef) -> str | None:
    exp = c.get_experiment_by_name(ref.experiment)
    if exp is None:
        return None
    tag, value = (RUN_KEY_TAG, ref.key) if ref.key else (RUN_NAME_TAG, ref.run_name)
    runs = c.search_runs([exp.experiment_id], filter_string=f"tags.`{tag}` = '{value}'", max_results=1,
                         order_by=["attributes.start_time DESC"])
    return runs[0].info.run_id if runs else None


def _existing(c, exp_id: str, ref: RunRef, hint: str | None) -> str | None:
    """The run a resumed run continues: ``hint`` (a recorded run id) if it still exists, else the newest run named
    ``ref.run_name``."""
    if hint:
        try:
            return c.get_run(hint).info.run_id
        except Exception:  # the store was reset: look the run up by name
            pass
    runs = c.search_runs([exp_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{ref.run_name}'", max_results=1,
                         order_by=["attributes.start_time DESC"])
    return runs[0].info.run_id if runs else None


def _set_tags(c, run_id: str, tags: dict[str, Any]) -> None:
    from mlflow.entities import RunTag

    c.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def _close_trial(c, run_id: str, p: dict[str, Any]) -> None:
    """A sweep trial's run: its Tune status as a tag, and closed as Tune saw it (a scheduler may end a trial's
    function before it closed its run, or while it was closing it: then the run says FAILED although every epoch
    was done)."""
    c.set_tag(run_id, "sweep.status", p["status"])
    final = p["final"]
    status = c.get_run(run_id).info.status
    if status == "RUNNING" or (status == "FAILED" and final != "FAILED"):
        c.set_terminated(run_id, status=final)


def _artifact_path(rec: Record) -> str:
    """A local path of the record's artifact: this process's spool copy, or the copy beside the pending file."""
    if rec.spool and Path(rec.spool).exists():
        return rec.spool
    if not rec.stored or rec.journal is None:
        raise ArtifactGoneError(f"artifact of record {rec.id} is gone (no spool copy, nothing stored)")
    local = Path(tempfile.mkdtemp(prefix="ssl-tracking-get-")) / Path(rec.stored).name
    copy_tree(join_uri(rec.journal.uri, rec.stored), rec.journal.fs, str(local), None)
    rec.spool = str(local)
    return rec.spool


def copy_tree(src_uri: str, src_fs, dest_uri: str, dest_fs) -> None:
    """Copy a file or directory between local paths and S3 URIs (the storage layer's filesystems)."""
    from pyarrow.fs import FileSelector, FileType

    sfs, spath = resolve_uri(src_uri, src_fs)
    dfs, dpath = resolve_uri(dest_uri, dest_fs)
    info = sfs.get_file_info(spath)
    if info.type == FileType.Directory:
        files = [f.path for f in sfs.get_file_info(FileSelector(spath, recursive=True)) if f.type == FileType.File]
    else:
        files = [spath]
    for f in files:
        rel = os.path.relpath(f, spath) if info.type == FileType.Directory else ""
        target = os.path.join(dpath, rel) if rel else dpath
        if not is_s3(dest_uri):
            Path(target).parent.mkdir(parents=True, exist_ok=True)
        with sfs.open_input_stream(f) as src, dfs.open_output_stream(target) as dst:
            shutil.copyfileobj(src, dst)


def delete_uri(uri: str, fs) -> None:
    from pyarrow.fs import FileType

    f, path = resolve_uri(uri, fs)
    kind = f.get_file_info(path).type
    if kind == FileType.Directory:
        f.delete_dir(path)
    elif kind == FileType.File:
        f.delete_file(path)


def read_pending(journal: Journal, role: str) -> list[Record]:
    text = read_text(journal.pending_uri(role), journal.fs)
    return [Record.from_json(line, journal, role) for line in (text or "").splitlines() if line.strip()]


def write_pending(journal: Journal, role: str, records: list[Record]) -> str | None:
    """Rewrite ``pending-<role>.jsonl`` with ``records`` (artifacts copied beside it once); with none, remove it
    and the artifact copies. Returns the file's URI, or None when nothing is pending."""
    uri = journal.pending_uri(role)
    if not records:
        delete_uri(uri, journal.fs)
        delete_uri(journal.artifacts_uri(role), journal.fs)
        return None
    for rec in records:
        if rec.kind == "log_artifact" and rec.stored is None and rec.spool:
            stored = f"artifacts-{role}/{rec.id}/{Path(rec.spool).name}"
            copy_tree(rec.spool, None, join_uri(journal.uri, stored), journal.fs)
            rec.stored = stored
    write_text(uri, "".join(r.to_json() + "\n" for r in records), journal.fs)
    return uri
