"""``python -m ssl_platform sync-tracking RUN [RUN ...]``: replay the tracking records a run could not send.

A run whose tracking server did not answer by its end keeps the unsent records in
``<checkpoint.uri>/<run>/tracking/pending-<role>.jsonl`` (local or ``s3://``; see
:mod:`ssl_platform.tracking.outbox`). This sends them, the driver's first (it creates the run), in order; metric
steps the run already has are left out, so replaying twice, or after the run's own sender got some through, logs
each step once. A file is removed once all of it went; a server that still does not answer ends with one error
line, and what was sent so far is not sent again.
"""

from __future__ import annotations

import argparse

from ssl_platform.storage.s3 import filesystem, is_s3
from ssl_platform.storage.uri_files import join_uri
from ssl_platform.tracking.outbox import (
    Journal,
    Record,
    Sender,
    TrackingUnavailableError,
    read_pending,
    write_pending,
)
from ssl_platform.tracking.run_log import is_permanent

ROLES = ("driver", "rank0")


def journal_of(target: str, checkpoint_root: str, endpoint_url: str | None = None) -> Journal:
    """The journal of ``target``: a run name under ``checkpoint_root``, a run's checkpoint directory URI, or its
    ``tracking`` directory."""
    if not is_s3(target) and "/" not in target:
        target = join_uri(checkpoint_root, target)
    uri = target.rstrip("/")
    if not uri.endswith("/tracking"):
        uri = join_uri(uri, "tracking")
    return Journal(uri, filesystem(endpoint_url) if is_s3(uri) else None)


def sync_journal(journal: Journal) -> dict[str, int]:
    """Replay every pending file of ``journal``; returns records sent / already there / refused per file."""
    sender = Sender()
    out: dict[str, int] = {"sent": 0, "refused": 0, "files": 0}
    for role in ROLES:
        records = read_pending(journal, role)
        if not records:
            continue
        out["files"] += 1
        refused = _replay(sender, journal, role, records, out)
        write_pending(journal, role, refused)  # removed when empty
        out["refused"] += len(refused)
    return out


def _replay(sender: Sender, journal: Journal, role: str, records: list[Record], out: dict[str, int]) -> list[Record]:
    refused: list[Record] = []
    for i, rec in enumerate(records):
        try:
            sender.apply(rec)
        except Exception as err:  # noqa: BLE001 - sorted below: refused (kept) or no answer (stop, keep the rest)
            if is_permanent(err):
                rec.error = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
                print(f"[ssl_platform] sync-tracking: {rec.run.uri} refused {rec.kind} of run {rec.run.run_name!r}: "
                      f"{rec.error}", flush=True)
                refused.append(rec)
                continue
            write_pending(journal, role, refused + records[i:])
            raise TrackingUnavailableError(
                f"tracking server {rec.run.uri} does not answer ({type(err).__name__}: "
                f"{str(err).splitlines()[0][:160]}); {len(records) - i} record(s) still pending in "
                f"{journal.pending_uri(role)}: run sync-tracking again once it answers") from None
        out["sent"] += 1
    return refused


def _cmd_sync(args: argparse.Namespace) -> int:
    code = 0
    for target in args.runs:
        journal = journal_of(target, args.checkpoint_uri, args.endpoint_url)
        res = sync_journal(journal)
        if not res["files"]:
            print(f"[ssl_platform] sync-tracking: nothing pending in {journal.uri}", flush=True)
            continue
        print(f"[ssl_platform] sync-tracking: {res['sent']} record(s) of {res['files']} pending file(s) in {journal.uri} "
              f"replayed (metric steps already logged were left out)"
              + (f"; {res['refused']} refused, kept in the pending file" if res["refused"] else ""), flush=True)
        code = code or (1 if res["refused"] else 0)
    return code


def register_cli(sub) -> None:
    p = sub.add_parser("sync-tracking", help="send the MLflow records a run kept while its tracking server was down")
    p.add_argument("runs", nargs="+", metavar="RUN",
                   help="run name (under --checkpoint-uri) or the run's checkpoint URI (local or s3://)")
    p.add_argument("--checkpoint-uri", default="./checkpoints", help="checkpoint.uri of the runs named (default ./checkpoints)")
    p.add_argument("--endpoint-url", help="S3-compatible endpoint of an s3:// checkpoint URI (default: AWS_ENDPOINT_URL_S3)")
    p.set_defaults(func=_cmd_sync)
