"""The process's tracking queue (:class:`Outbox`, one daemon sender thread) and :class:`TrackedRun`, the handle that
the driver and rank 0 log through; :func:`open_run` / :meth:`TrackedRun.close` start and end a run's tracking.

See :mod:`ssl_platform.tracking.outbox` for what a record is, how it is sent exactly once and where unsent records
are kept.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ssl_platform.storage.s3 import is_s3, spec_filesystem
from ssl_platform.storage.uri_files import join_uri, read_text
from ssl_platform.tracking.mlflow_runs import SpecRecord, client, run_tags
from ssl_platform.tracking.outbox import (
    HTTP_ENV_DEFAULTS,
    LOCAL_WAIT_S,
    MAX_BACKOFF_S,
    PENDING_WRITE_EVERY_S,
    STILL_BEHIND_EVERY_S,
    ArtifactGoneError,
    Journal,
    Record,
    RunRef,
    Sender,
    TrackingUnavailableError,
    _NotYet,
    is_remote,
    log,
    read_pending,
    write_pending,
)

START_WAIT_S = 60.0  # at most this long for a new run to be created before training starts without it


def is_permanent(err: BaseException) -> bool:
    """An error that no retry fixes (a refused value, a deleted run): the record is reported and kept, not retried."""
    if isinstance(err, _NotYet):
        return False
    try:
        from mlflow.exceptions import MlflowException
    except ImportError:  # pragma: no cover
        return False
    if isinstance(err, MlflowException):
        code = err.get_http_status_code()
        return 400 <= code < 500 and code not in (408, 429)
    return isinstance(err, ArtifactGoneError)  # anything else may pass (a store that is locked, busy, restarting)


def _short(err: BaseException) -> str:
    text = str(err).split("\n")[0]
    return f"{type(err).__name__}: {text[:200]}"


class Outbox:
    """This process's queue of records and the one daemon thread that sends them in order (see the module doc)."""

    def __init__(self) -> None:
        self.records: list[Record] = []
        self.rejected: list[Record] = []
        self.cond = threading.Condition()
        self.sender = Sender()
        self.thread: threading.Thread | None = None
        self.spool = Path(tempfile.mkdtemp(prefix="ssl-tracking-"))
        self.behind_since: float | None = None
        self.last_notice = 0.0
        self.last_write = 0.0
        self.files: dict[tuple[str, str], Journal] = {}  # (journal URI, role) of pending files written or taken over
        self.adopted: set[tuple[str, str]] = set()
        self.write_lock = threading.Lock()
        self.stopped = False

    # -- producers (any thread) --
    def put(self, rec: Record) -> Record:
        if rec.kind == "log_artifact" and rec.spool is None:
            rec.spool = self._spool_copy(rec.payload.pop("path"), rec.id)
        with self.cond:
            self.records.append(rec)
            self.cond.notify_all()
            if self.thread is None or not self.thread.is_alive():
                # urllib3 logs every retry of MLflow's HTTP client: an outage says so once, through log()
                logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
                self.thread = threading.Thread(target=self._loop, name="ssl-tracking-sender", daemon=True)
                self.thread.start()
        return rec

    def adopt(self, journal: Journal | None, role: str) -> None:
        """Queue taking over the records a previous process of this run and role left in its pending file (once per
        journal and role; the file is read by the sender, never by the caller)."""
        if journal is None or (journal.uri, role) in self.adopted:
            return
        self.adopted.add((journal.uri, role))
        self.put(Record("_adopt", RunRef("", "", ""), {}, journal, role))

    def _take_over(self, marker: Record) -> None:
        """In the sender: the adopted records replace ``marker`` at the head of the queue."""
        journal, role = marker.journal, marker.role
        try:
            old = read_pending(journal, role)
        except (OSError, ValueError) as err:
            log(f"could not read {journal.pending_uri(role)} ({_short(err)}); replay it with sync-tracking")
            old = []
        if old:
            log(f"{len(old)} record(s) left by an earlier process in {journal.pending_uri(role)}: sending them first")
            with self.write_lock:
                self.files[(journal.uri, role)] = journal
        with self.cond:
            if self.records and self.records[0] is marker:
                self.records[0:1] = old
            self.cond.notify_all()

    def _spool_copy(self, path: str, rec_id: str) -> str:
        """A copy of an artifact that outlives the caller's temporary directory, until it is sent."""
        src = Path(path)
        dest = self.spool / rec_id / src.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dest)
        else:
            shutil.copy2(src, dest)
        return str(dest)

    # -- waiting --
    def wait(self, rec: Record, timeout: float, *, until_failure: bool = False) -> bool:
        """Wait until ``rec`` was sent (True), or it failed once (``until_failure``) or ``timeout`` passed."""
        deadline = time.monotonic() + timeout
        while not rec.done.is_set() and time.monotonic() < deadline:
            if until_failure and (rec.failed.is_set() or self.behind_since is not None):
                break  # it failed, or records ahead of it do: the queue is behind, the caller goes on
            rec.done.wait(0.05)
        return rec.done.is_set()

    def flush(self, timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: not self.records, timeout=max(timeout, 0.0))

    # -- the sender thread --
    def _loop(self) -> None:
        backoff = 0.5
        while True:
            with self.cond:
                self.cond.wait_for(lambda: bool(self.records) or self.stopped)
                if self.stopped:
                    return
                rec = self.records[0]
            if rec.kind == "_adopt":
                self._take_over(rec)
                continue
            try:
                self.sender.apply(rec)
            except Exception as err:  # noqa: BLE001 - any failure: retried or kept, never raised into training
                if is_permanent(err):
                    self._reject(rec, err)
                    continue
                rec.error = _short(err)
                rec.failed.set()
                self._behind(rec)
                time.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
                continue
            backoff = 0.5
            self._sent(rec)

    def _sent(self, rec: Record) -> None:
        with self.cond:
            if self.records and self.records[0] is rec:
                self.records.pop(0)
            left = len(self.records)
            self.cond.notify_all()
        rec.error = None
        rec.done.set()
        if rec.spool and rec.spool.startswith(str(self.spool)):
            shutil.rmtree(Path(rec.spool).parent, ignore_errors=True)
        if self.behind_since is not None and left == 0:
            log(f"{rec.run.uri} answers again: caught up after {time.monotonic() - self.behind_since:.0f} s, "
                "every queued record sent")
            self.behind_since = None
            self.write_pending_files()
        elif self.files and time.monotonic() - self.last_write > PENDING_WRITE_EVERY_S:
            self.write_pending_files()

    def _reject(self, rec: Record, err: BaseException) -> None:
        rec.error = _short(err)
        log(f"error: {rec.run.uri} refused {rec.kind} of run {rec.run.run_name!r}: {rec.error}; kept in the pending "
            "file, not retried")
        with self.cond:
            if self.records and self.records[0] is rec:
                self.records.pop(0)
            self.rejected.append(rec)
            self.cond.notify_all()
        rec.failed.set()
        self.write_pending_files()

    def _behind(self, rec: Record) -> None:
        now = time.monotonic()
        n = len(self.records)
        if self.behind_since is None:
            self.behind_since = self.last_notice = now
            log(f"{rec.run.uri} does not answer ({rec.error}); training goes on, {n} record(s) queued and sent "
                "when it answers")
        elif now - self.last_notice > STILL_BEHIND_EVERY_S:
            self.last_notice = now
            log(f"{rec.run.uri} still unreachable after {now - self.behind_since:.0f} s; {n} record(s) queued")
        if now - self.last_write > PENDING_WRITE_EVERY_S:
            self.write_pending_files()

    def write_pending_files(self) -> list[tuple[str, int]]:
        """Write every journal's unsent (and refused) records to its pending file; remove the files whose
        records all went. Returns ``(pending file URI, records)`` of the files left."""
        if self.stopped and threading.current_thread() is self.thread:
            return []  # the process is exiting: its main thread writes the last version
        with self.write_lock:
            self.last_write = time.monotonic()
            with self.cond:
                todo = [r for r in [*self.rejected, *self.records] if r.journal is not None and r.kind != "_adopt"]
            journals = dict(self.files)
            groups: dict[tuple[str, str], list[Record]] = {key: [] for key in self.files}
            for r in todo:
                journals.setdefault((r.journal.uri, r.role), r.journal)
                groups.setdefault((r.journal.uri, r.role), []).append(r)
            out = []
            for (juri, role), recs in groups.items():
                journal = journals[(juri, role)]
                try:
                    uri = write_pending(journal, role, recs)
                except OSError as err:
                    log(f"could not write {journal.pending_uri(role)} ({_short(err)}); retried later")
                    continue
                if uri:
                    self.files[(juri, role)] = journal
                    out.append((uri, len(recs)))
                else:
                    self.files.pop((juri, role), None)
            return out


    def shutdown(self, timeout: float = 10.0) -> None:
        """At exit: the sender stops (it could otherwise be in the middle of storage I/O while the interpreter
        finalizes), and what is still queued is written to the pending files."""
        with self.cond:
            self.stopped = True
            self.cond.notify_all()
            left = bool(self.records)
        if self.thread is not None:
            self.thread.join(timeout)
        if left:
            self.write_pending_files()


_OUTBOXES: dict[str, Outbox] = {}
_OUTBOX_LOCK = threading.Lock()


def outbox(uri: str) -> Outbox:
    """This process's queue and sender for the tracking store ``uri``: one per store, so that a store that does not
    answer (a server that is down, a test's store that is gone) holds back its own records only."""
    with _OUTBOX_LOCK:
        box = _OUTBOXES.get(uri)
        if box is None:
            box = _OUTBOXES[uri] = Outbox()
            atexit.register(box.shutdown)
        return box


def http_env(uri: str) -> dict[str, str]:
    """MLflow's HTTP retry settings for a process that tracks to ``uri``: the environment's, else
    :data:`HTTP_ENV_DEFAULTS` (short: the sender retries by itself)."""
    if not is_remote(uri):
        return {}
    return {k: os.environ.get(k, v) for k, v in HTTP_ENV_DEFAULTS.items()}


@dataclass(frozen=True)
class TrackedRun:
    """A run's tracking in this process (picklable: the driver hands :meth:`for_rank0` to the workers). Every call
    queues a record and returns at once (a local store: once it is written, as a direct call would)."""

    ref: RunRef
    journal: Journal | None = None
    role: str = "driver"
    flush_timeout_s: float = 60.0
    env: dict[str, str] = field(default_factory=dict)

    @property
    def run_id(self) -> str | None:
        """The server's run id once known in this process (None while the run was not created)."""
        return self.ref.run_id or outbox(self.ref.uri).sender.run_ids.get(self.ref.cache_key)

    @property
    def identity(self) -> str:
        """A name of this run attempt that exists without the server: its run id, else its key."""
        return self.run_id or f"ssl-run-key:{self.ref.key}"

    def for_rank0(self) -> TrackedRun:
        return replace(self, role="rank0")

    def named(self, run_name: str) -> TrackedRun:
        """Another run of the same store and experiment, found by its ``ssl.run_name`` tag (a sweep's trials)."""
        return replace(self, ref=RunRef(self.ref.uri, self.ref.experiment, run_name))

    def put(self, kind: str, payload: dict[str, Any]) -> Record:
        for k, v in self.env.items():
            os.environ[k] = v  # rank 0: the driver's MLflow HTTP settings
        box = outbox(self.ref.uri)
        box.adopt(self.journal, self.role)
        rec = box.put(Record(kind, self.ref, payload, self.journal, self.role))
        if not is_remote(self.ref.uri):
            box.wait(rec, LOCAL_WAIT_S, until_failure=True)
        return rec

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        if numbers:
            self.put("log_metrics", {"metrics": numbers, "step": int(step)})

    def log_params(self, params: dict[str, Any]) -> None:
        self.put("log_params", {"params": {k: str(v) for k, v in params.items()}})

    def set_tags(self, tags: dict[str, Any]) -> None:
        self.put("set_tags", {"tags": {k: str(v) for k, v in tags.items()}})

    def log_artifacts(self, paths: list[str | Path], artifact_path: str | None = None) -> None:
        for p in paths:
            self.put("log_artifact", {"path": str(p), "artifact_path": artifact_path})

    def end(self, status: str = "FINISHED") -> None:
        self.put("set_terminated", {"status": status})

    def close_trial(self, status: str, final: str) -> None:
        self.put("close_trial", {"status": status, "final": final})

    def count_tag(self, tag: str) -> None:
        self.put("count_tag", {"tag": tag})

    def close(self, timeout: float | None = None) -> list[tuple[str, int]]:
        """Wait up to ``timeout`` (``tracking.flush_timeout_s``) for this process's records to be sent, then keep
        what is left in the pending files and say so. Returns ``(pending file URI, records)``."""
        box = outbox(self.ref.uri)
        box.flush(self.flush_timeout_s if timeout is None else timeout)
        left = box.write_pending_files()
        for uri, n in left:
            log(f"{n} record(s) not sent to {self.ref.uri} within tracking.flush_timeout_s={self.flush_timeout_s:g} s "
                f"({self.role}): kept in {uri}")
        return left


def journal_for(checkpoint: DictConfig, run_dir_name: str) -> Journal:
    """``<checkpoint.uri>/<run_dir_name>/tracking`` on the spec's storage."""
    uri = join_uri(checkpoint.uri, run_dir_name, "tracking")
    return Journal(uri, spec_filesystem(checkpoint) if is_s3(uri) else None)


def check_server(tracking: DictConfig) -> None:
    """``tracking.require_server_at_start``: refuse before Ray starts when the tracking server does not answer."""
    if not (tracking.get("require_server_at_start") and is_remote(tracking.uri)):
        return
    import requests

    try:
        requests.get(tracking.uri.rstrip("/") + "/health", timeout=10).raise_for_status()
    except requests.RequestException as err:
        raise TrackingUnavailableError(
            f"tracking server {tracking.uri} does not answer ({type(err).__name__}) and tracking.require_server_at_start "
            "is true: start it (make services), or set tracking.require_server_at_start=false to train now and "
            "create the MLflow run when it answers") from None


def open_run(tracking: DictConfig, run_name: str, record: SpecRecord | None, *, journal: Journal | None,
             resume: bool = False, parent: TrackedRun | None = None, extra_tags: dict[str, str] | None = None,
             run_id_hint: str | None = None, display_name: str | None = None) -> TrackedRun:
    """Queue the creation (``resume``: reopening) of a run and wait for it at most :data:`START_WAIT_S`, or until
    the first try failed: a server that is down at start does not hold training back."""
    for k, v in http_env(tracking.uri).items():
        os.environ.setdefault(k, v)
    run = TrackedRun(RunRef(tracking.uri, tracking.experiment, run_name, key=uuid.uuid4().hex),
                     journal, "driver", float(tracking.get("flush_timeout_s", 60.0)), http_env(tracking.uri))
    payload = {"resume": resume, "tags": run_tags(run_name, record, extra=extra_tags),
               "display_name": display_name or tracking.get("run_name") or run_name,
               "parent": parent.ref.__dict__ if parent else None, "run_id_hint": run_id_hint,
               "params": record.params if record else None, "spec_yaml": record.yaml if record else None}
    rec = run.put("create_run", payload)
    if not outbox(run.ref.uri).wait(rec, START_WAIT_S, until_failure=True):
        log(f"{tracking.uri} does not answer ({rec.error or 'no answer yet'}); training starts anyway and the MLflow run "
            f"{run_name!r} is created when it answers (tracking.require_server_at_start=true refuses to start instead)")
    return run


def pending_files(journal: Journal | None) -> list[str]:
    """The pending files of a run's journal (every role)."""
    if journal is None:
        return []
    found = []
    for role in ("driver", "rank0"):
        try:
            if read_text(journal.pending_uri(role), journal.fs) is not None:
                found.append(journal.pending_uri(role))
        except OSError as err:  # the checkpoint storage does not answer either: say where to look
            log(f"could not check {journal.pending_uri(role)} ({_short(err)})")
    return found


def close_and_report(run: TrackedRun) -> list[str]:
    """:meth:`TrackedRun.close` for a driver: also says what is pending for the run (rank 0's records too) and how to
    replay it. Returns the pending files."""
    run.close()
    pending = pending_files(run.journal)
    if pending:
        log(f"{run.ref.uri} did not get everything of run {run.ref.run_name!r}; nothing is lost: pending in "
            f"{', '.join(pending)}. Once the server answers: {sync_hint(run.journal)}")
    return pending


def find_run_id(run: TrackedRun, timeout: float = 10.0) -> str | None:
    """The run id of ``run`` (by key, else name) if the store answers within ``timeout``, else None: a driver-side
    lookup that never waits long on a server that is down."""
    out: list[str | None] = []

    def look() -> None:
        try:
            out.append(outbox(run.ref.uri).sender.resolve(client(run.ref.uri), run.ref))
        except Exception:  # noqa: BLE001 - not created yet, or no answer: unknown
            out.append(None)

    thread = threading.Thread(target=look, daemon=True)
    thread.start()
    thread.join(timeout)
    return out[0] if out else None


def sync_hint(journal: Journal) -> str:
    run_dir = journal.uri.rstrip("/").rsplit("/", 1)[0]
    return f"python -m ssl_platform sync-tracking {run_dir}"


__all__ = ["Outbox", "TrackedRun", "Journal", "RunRef", "TrackingUnavailableError", "check_server", "journal_for",
           "open_run", "outbox", "pending_files", "sync_hint", "STILL_BEHIND_EVERY_S"]
