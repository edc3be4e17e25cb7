"""Sharded image datasets: ``python -m ssl_platform prepare-data SRC DEST`` and the reader's manifest.

An ImageFolder tree (local directory or ``s3://bucket/prefix``, listed once by
:func:`~ssl_platform.data.sources.list_image_folder`: class = first folder, classes sorted) becomes Parquet shards
``DEST/shard-00000.parquet ...`` (local disk or S3) with one row per image: ``image`` (binary: the original
encoded file, not re-encoded), ``label`` (int32, index into the manifest's ``classes``), ``path`` (string,
relative to SRC). Parquet because it read fastest here (README, "Large datasets: shards"; benchmarks/README.md)
and Ray Data reads it natively (``ray.data.read_parquet``: column projection, file-level shuffle).

* **Assignment.** The sorted file list is permuted once with ``random.Random(seed)`` and cut into shards of
  ``shard_size`` files: a shard mixes classes; the reader shuffles shard order every epoch and rows in a local
  buffer. The same source and settings give the same shards, byte for byte.
* **Streaming.** Files are read and checked by a thread pool (PIL decodes each one; a file it cannot decode is
  skipped with a warning and listed in the manifest's ``skipped``), one shard at a time with the next shard's
  reads in flight: at most two shards of encoded bytes are in memory, whatever the dataset size.
* **Atomic shards, resumable runs.** A shard is written to a temporary name and renamed (local), or uploaded in
  one PUT / multipart upload that aborts on failure (S3: the object exists only once complete); then
  ``DEST/_progress.json`` records its size and SHA-256. A restarted run recomputes the same assignment, keeps
  the recorded shards still present with their size, and writes the others. ``DEST/manifest.json`` is written
  last: a DEST with a manifest is complete.
* **Refusals before work.** SRC missing, empty or not an ImageFolder; DEST not writable; DEST holding a complete
  or unfinished dataset of another source or other settings (``overwrite=True`` replaces it; nothing is
  deleted otherwise).

:func:`read_manifest` is what training calls for ``data.name: shards`` (errors name the spec key and the URI);
:func:`verify_shards` re-reads every shard against its recorded size, SHA-256 and row count.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import re
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from ssl_platform.data.small_sets import DataError
from ssl_platform.data.sources import ImageFolderListing, data_filesystem, list_image_folder
from ssl_platform.storage.retry import retry_with_backoff
from ssl_platform.storage.s3 import boto3_client
from ssl_platform.storage.uri_files import write_text

FORMAT = "parquet"
VERSION = 1
MANIFEST_NAME = "manifest.json"
PROGRESS_NAME = "_progress.json"
DEFAULT_SHARD_SIZE = 1000  # ~110 MB of ImageNet JPEGs (~110 KB each)
DEFAULT_WORKERS = 8
DEFAULT_MAX_BAD_FRACTION = 0.01
ROW_GROUP_SIZE = 64  # rows per Parquet row group: a reader holds one group (~7 MB of ImageNet JPEGs) per column
SHARD_RE = re.compile(r"^shard-(\d{5,})\.parquet$")
_TMP_MARK = ".tmp-"
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def _schema():
    import pyarrow as pa

    return pa.schema([("image", pa.binary()), ("label", pa.int32()), ("path", pa.string())])


# ---- results ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardInfo:
    """One shard file: its name under DEST, rows, size in bytes and SHA-256 of the file."""

    name: str
    num_images: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class SkippedFile:
    """A source file PIL could not decode: its path relative to SRC and why."""

    path: str
    reason: str


@dataclass(frozen=True)
class ShardManifest:
    """A complete sharded dataset (``DEST/manifest.json``): classes (index = label), shards, counts."""

    uri: str  # DEST as given (local path or s3://bucket/prefix)
    source: str
    classes: list[str]
    shards: list[ShardInfo]
    counts: dict[str, int]  # images per class name
    skipped: list[SkippedFile]
    num_images: int
    created: str
    settings: dict[str, Any] = field(default_factory=dict)
    fs_path: str = ""  # DEST on its pyarrow filesystem (no s3:// scheme)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def labelled(self) -> bool:
        """False for shards prepared with ``--labels none`` (no classes; every row's label is -1)."""
        return bool(self.classes)

    @property
    def shard_uris(self) -> list[str]:
        """Every shard as a URI (``s3://bucket/prefix/shard-00000.parquet`` or an absolute local path)."""
        base = self.uri.rstrip("/") if self.uri.startswith("s3://") else self.fs_path
        return [f"{base}/{s.name}" for s in self.shards]

    @property
    def shard_paths(self) -> list[str]:
        """Every shard as a path on the filesystem of :func:`~ssl_platform.data.sources.data_filesystem` (no scheme)."""
        return [f"{self.fs_path}/{s.name}" for s in self.shards]


@dataclass(frozen=True)
class PrepareResult:
    manifest: ShardManifest
    written: list[str]  # shards this run wrote
    reused: list[str]  # shards an interrupted earlier run had completed
    already_complete: bool  # DEST already held this dataset: nothing was written
    seconds: float


# ---- planning ---------------------------------------------------------------------------------------------
def _source_uri(src: str) -> str:
    return src.rstrip("/") if src.startswith("s3://") else os.path.abspath(src)


def relative_paths(listing: ImageFolderListing) -> list[str]:
    return [f[len(listing.path) + 1:] for f in listing.files]


def plan_shards(num_files: int, shard_size: int, seed: int) -> list[list[int]]:
    """Indices into the sorted listing, permuted once with ``random.Random(seed)``, cut into ``shard_size`` runs."""
    order = list(range(num_files))
    random.Random(seed).shuffle(order)
    return [order[i:i + shard_size] for i in range(0, num_files, shard_size)]


def _identity(source: str, listing: ImageFolderListing, shard_size: int, seed: int) -> dict[str, Any]:
    """What makes two preparations the same dataset: format, source, its file listing and the settings (an
    unlabelled preparation says ``labels: none`` there)."""
    digest = hashlib.sha256()
    for rel, label in zip(relative_paths(listing), listing.labels):
        digest.update(f"{label}\t{rel}\n".encode())
    settings: dict[str, Any] = {"shard_size": shard_size, "seed": seed}
    if not listing.labelled:
        settings["labels"] = "none"
    return {"format": FORMAT, "version": VERSION, "source": source, "num_files": len(listing),
            "listing_sha256": digest.hexdigest(), "settings": settings}


def _describe_identity(ident: dict[str, Any]) -> str:
    s = ident.get("settings", {})
    return (f"source {ident.get('source')!r} ({ident.get('num_files')} files, listing {str(ident.get('listing_sha256'))[:12]}), "
            f"shard_size {s.get('shard_size')}, seed {s.get('seed')}, format {ident.get('format')} v{ident.get('version')}")


# ---- checking and reading one file --------------------------------------------------------------------------
def image_problem(data: bytes) -> str | None:
    """None when PIL can decode ``data``; else why not. ``verify()`` checks the container (PNG CRCs, ...); a
    draft-mode load decodes every byte of a JPEG at 1/8 scale, which catches truncation at a fraction of the cost."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.verify()
        with Image.open(io.BytesIO(data)) as img:
            if img.format == "JPEG":
                img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
            img.load()
    except Exception as err:  # noqa: BLE001 -- PIL raises many types for undecodable input (OSError, SyntaxError, ...)
        text = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(err).splitlines()[0] if str(err) else "")
        return f"{type(err).__name__}: {text}"[:200]  # no memory address: the same file, the same manifest
    return None


def _load(fs, path: str) -> tuple[bytes, str | None]:
    with fs.open_input_stream(path) as stream:
        data = stream.read()
    return data, image_problem(data)


# ---- destination ------------------------------------------------------------------------------------------
class _Destination:
    """DEST on local disk or S3: atomic shard writes, small JSON files, one listing of sizes."""

    def __init__(self, uri: str, endpoint: str | None = None):
        self.uri = uri.rstrip("/") if uri.startswith("s3://") else uri
        self.s3 = uri.startswith("s3://")
        self.endpoint = endpoint
        self.fs, self.path = data_filesystem(uri, endpoint)
        self.path = self.path.rstrip("/")

    def where(self, name: str) -> str:
        return f"{self.uri.rstrip('/')}/{name}"

    def prepare(self) -> None:
        """Create DEST (local) or check its bucket (S3); errors name DEST."""
        from pyarrow.fs import FileType

        if not self.s3:
            if os.path.exists(self.path) and not os.path.isdir(self.path):
                raise DataError(f"DEST: expected a directory for the shards, got {self.uri!r}, which is a file")
            try:
                os.makedirs(self.path, exist_ok=True)
            except OSError as err:
                raise DataError(f"DEST: cannot create {self.uri!r}: {type(err).__name__}: {err.strerror or err}") from None
            if not os.access(self.path, os.W_OK | os.X_OK):
                raise DataError(f"DEST: {self.uri!r} is not writable (no write permission)")
            return
        bucket = self.path.split("/", 1)[0]
        try:
            info = self.fs.get_file_info(bucket)
        except OSError as err:
            raise DataError(f"DEST: cannot reach the bucket of {self.uri!r}: {type(err).__name__}: {str(err)[:300]}") from None
        if info.type == FileType.NotFound:
            raise DataError(f"DEST: the bucket {bucket!r} of {self.uri!r} does not exist")

    def sizes(self) -> dict[str, int]:
        """``name -> bytes`` of the files directly under DEST."""
        from pyarrow.fs import FileSelector, FileType

        infos = self.fs.get_file_info(FileSelector(self.path, allow_not_found=True, recursive=False))
        return {i.base_name: i.size for i in infos if i.type == FileType.File}

    def read_json(self, name: str) -> dict[str, Any] | None:
        from pyarrow.fs import FileType

        path = f"{self.path}/{name}"
        if self.fs.get_file_info(path).type != FileType.File:
            return None
        with self.fs.open_input_stream(path) as stream:
            text = stream.read().decode()
        try:
            out = json.loads(text)
        except ValueError as err:
            raise DataError(f"DEST: {self.where(name)!r} is not valid JSON ({err}); pass --overwrite to start over") from None
        if not isinstance(out, dict):
            raise DataError(f"DEST: {self.where(name)!r} is not a JSON object; pass --overwrite to start over")
        return out

    def write_json(self, name: str, payload: dict[str, Any]) -> None:
        text = json.dumps(payload, indent=1, sort_keys=False) + "\n"
        try:
            if self.s3:
                write_text(self.where(name), text, self.fs)  # one PUT: readers see the old or the new object
            else:
                tmp = f"{self.path}/.{name}{_TMP_MARK}{os.getpid()}"
                with open(tmp, "w") as out:
                    out.write(text)
                os.replace(tmp, f"{self.path}/{name}")
        except OSError as err:
            raise DataError(f"DEST: cannot write {self.where(name)!r}: {type(err).__name__}: {str(err)[:300]}") from None

    def delete(self, name: str) -> None:
        try:
            self.fs.delete_file(f"{self.path}/{name}")
        except FileNotFoundError:
            pass

    def local_temp(self, name: str) -> str:
        """Where a shard is written before it is published: next to its final name on local disk."""
        base = self.path if not self.s3 else tempfile.gettempdir()
        prefix = "." if not self.s3 else "ssl-platform-"
        return os.path.join(base, f"{prefix}{name}{_TMP_MARK}{os.getpid()}")

    def publish(self, local_file: str, name: str) -> None:
        """Move a finished shard to its final name: a rename on local disk, an upload on S3 (boto3: one PUT, or a
        multipart upload aborted on failure, so no partial object is ever visible under the name)."""
        if not self.s3:
            os.replace(local_file, f"{self.path}/{name}")
            return
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, _, key = self.path.partition("/")
        client = boto3_client(self.endpoint)
        retry_with_backoff(lambda: client.upload_file(local_file, bucket, f"{key}/{name}" if key else name),
                           f"upload of {self.where(name)}", attempts=5, backoff_s=1.0,
                           retry_on=(OSError, BotoCoreError, ClientError))

    def remove_stale_temporaries(self) -> None:
        """What an interrupted run left behind, never visible as a shard: temporary files next to the shards (local),
        incomplete multipart uploads of shard keys (S3: invisible, but stored and billed until aborted)."""
        if not self.s3:
            for entry in os.scandir(self.path):
                if entry.name.startswith(".shard-") and _TMP_MARK in entry.name and entry.is_file():
                    os.unlink(entry.path)
            return

        bucket, _, key = self.path.partition("/")
        prefix = f"{key}/" if key else ""
        client = boto3_client(self.endpoint)
        for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket, Prefix=prefix):
            for upload in page.get("Uploads", []):
                if SHARD_RE.match(upload["Key"][len(prefix):]):
                    client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])


# ---- writing one shard ------------------------------------------------------------------------------------
def _sha256_file(path: str, chunk: int = 8 * 1024 * 1024) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(chunk):
            digest.update(data)
    return digest.hexdigest()


def write_parquet_shard(path: str, images: list[bytes], labels: list[int], paths: list[str]) -> tuple[int, str]:
    """Write one shard to local ``path``; ``(bytes, sha256)`` of the file. Image bytes are stored uncompressed
    (already compressed; no dictionary, no statistics), labels and paths with Snappy."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = _schema()
    with pq.ParquetWriter(path, schema, compression={"image": "NONE", "label": "SNAPPY", "path": "SNAPPY"},
                          use_dictionary=["label"], write_statistics=["label"]) as writer:  # fmt: skip
        for i in range(0, len(images), ROW_GROUP_SIZE):
            j = i + ROW_GROUP_SIZE
            writer.write_table(pa.table({"image": pa.array(images[i:j], pa.binary()), "label": pa.array(labels[i:j], pa.int32()),
                                         "path": pa.array(paths[i:j], pa.string())}, schema=schema))  # fmt: skip
    return os.path.getsize(path), _sha256_file(path)


# ---- prepare-data -----------------------------------------------------------------------------------------
def _check_settings(shard_size: int, workers: int, max_bad_fraction: float) -> None:
    if not isinstance(shard_size, int) or shard_size < 1:
        raise DataError(f"--shard-size: expected an integer >= 1, got {shard_size!r}")
    if not isinstance(workers, int) or workers < 1:
        raise DataError(f"--workers: expected an integer >= 1, got {workers!r}")
    if not 0 <= max_bad_fraction <= 1:
        raise DataError(f"--max-bad-fraction: expected a fraction in [0, 1], got {max_bad_fraction!r}")


def _warn(msg: str) -> None:
    from tqdm import tqdm

    tqdm.write(f"[ssl_platform] warning: {msg}", file=sys.stderr)  # above a running progress bar, not through it


def _info(msg: str) -> None:
    print(f"[ssl_platform] {msg}", file=sys.stderr, flush=True)


def _manifest_from_json(uri: str, fs_path: str, m: dict[str, Any]) -> ShardManifest:
    return ShardManifest(
        uri=uri, source=m["source"], classes=list(m["classes"]), shards=[ShardInfo(**s) for s in m["shards"]],
        counts=dict(m["counts"]), skipped=[SkippedFile(**s) for s in m["skipped"]], num_images=m["num_images"],
        created=m["created"], settings=dict(m.get("settings", {})), fs_path=fs_path,
    )  # fmt: skip


def _start_state(dest: _Destination, ident: dict[str, Any], overwrite: bool) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """``(complete manifest of this dataset or None, shards already done)``; refuses a DEST holding another dataset."""
    manifest = dest.read_json(MANIFEST_NAME)
    progress = dest.read_json(PROGRESS_NAME)
    if overwrite:
        if manifest is not None:
            dest.delete(MANIFEST_NAME)  # first: DEST is never a manifest over a mix of old and new shards
        return None, {}
    if manifest is not None:
        theirs = {k: manifest.get(k) for k in ident}
        if theirs != ident:
            raise DataError(f"DEST: {dest.uri!r} already holds a complete shard dataset of another source or other "
                            f"settings ({_describe_identity(theirs)}); this run would write {_describe_identity(ident)}. "
                            "Nothing was changed: pass --overwrite to replace it, or choose another DEST")  # fmt: skip
        return manifest, {}
    if progress is not None:
        theirs = {k: progress.get(k) for k in ident}
        if theirs != ident:
            raise DataError(f"DEST: {dest.uri!r} holds an unfinished preparation of another source, file listing or "
                            f"settings ({_describe_identity(theirs)}); this run would write {_describe_identity(ident)}. "
                            "Nothing was changed: rerun with its source and settings to resume it, pass --overwrite to "
                            "start over, or choose another DEST")  # fmt: skip
        return None, dict(progress.get("shards", {}))
    strays = sorted(n for n in dest.sizes() if SHARD_RE.match(n))
    if strays:
        raise DataError(f"DEST: {dest.uri!r} holds shard files ({strays[0]}, ... {len(strays)} in all) without "
                        f"{MANIFEST_NAME} or {PROGRESS_NAME}: not written by prepare-data for this source. Nothing was "
                        "changed: pass --overwrite to replace them, or choose another DEST")  # fmt: skip
    return None, {}


def _reusable(done: dict[str, Any], sizes: dict[str, int], num_shards: int) -> dict[str, dict[str, Any]]:
    """Shards an earlier run recorded that are still present with their recorded size."""
    out = {}
    for name, entry in done.items():
        m = SHARD_RE.match(name)
        if not m or int(m.group(1)) >= num_shards:
            continue
        if sizes.get(name) == entry.get("bytes") and _SHA256_RE.match(str(entry.get("sha256", ""))):
            out[name] = entry
        else:
            _warn(f"{name}: recorded in {PROGRESS_NAME} but {'missing' if name not in sizes else 'of another size'}; writing it again")
    return out


def prepare_shards(
    src: str,
    dest: str,
    *,
    shard_size: int = DEFAULT_SHARD_SIZE,
    workers: int = DEFAULT_WORKERS,
    seed: int = 0,
    overwrite: bool = False,
    verify: bool = False,
    max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
    progress: bool = True,
    after_shard: Callable[[str], None] | None = None,
    labels: str = "folders",
) -> PrepareResult:
    """Turn the ImageFolder ``src`` into Parquet shards under ``dest`` (see the module docstring).

    ``labels``: ``folders`` (class folders, as ImageFolder) or ``none`` (every image at any depth, label -1; the
    manifest has no classes). ``after_shard(name)`` is called once a shard is written and recorded in the progress file (progress
    reporting; tests use it to interrupt a run). Raises :class:`~ssl_platform.data.small_sets.DataError` before any work
    for a bad SRC or DEST, and after the work when more than ``max_bad_fraction`` of the files are undecodable
    (no manifest is written then).

    Steps: :func:`_check_inputs` -> :func:`_start_state` (-> :func:`_already_complete`) -> :func:`_start_job` ->
    :func:`_write_missing_shards` -> :func:`_delete_replaced_shards` -> :func:`_manifest_json` ->
    :func:`_verify_before_manifest` -> the manifest, last.
    """
    start = time.monotonic()
    listing, source, target = _check_inputs(src, dest, shard_size, workers, max_bad_fraction, labels)
    ident = _identity(source, listing, shard_size, seed)
    complete, done = _start_state(target, ident, overwrite)
    if complete is not None:
        return _already_complete(dest, target, verify=verify, workers=workers, progress=progress, start=start)
    job = _start_job(listing, target, ident, done, shard_size=shard_size, seed=seed, max_bad_fraction=max_bad_fraction)
    _write_missing_shards(job, src, workers=workers, progress=progress, after_shard=after_shard)
    if overwrite:
        _delete_replaced_shards(target, len(job.plan))
    manifest_json = _manifest_json(job)
    manifest = _manifest_from_json(dest, target.path, manifest_json)
    if verify:
        _verify_before_manifest(job, manifest, workers=workers, progress=progress)
    target.write_json(MANIFEST_NAME, manifest_json)  # last: DEST is complete from here on
    target.delete(PROGRESS_NAME)
    seconds = time.monotonic() - start
    return PrepareResult(manifest, job.written, [n for n in job.names if n not in job.written], False, seconds)


@dataclass
class _ShardJob:
    """A preparation past its refusals: the listing, its shard plan, DEST and what is done so far."""

    listing: ImageFolderListing
    target: _Destination
    ident: dict[str, Any]
    plan: list[list[int]]  # indices into the listing, per shard
    names: list[str]  # shard file names, per shard
    rel: list[str]  # the listing's paths relative to SRC
    record: dict[str, Any]  # the progress file's content; its "shards" is :attr:`done`
    max_bad_fraction: float
    max_bad: int  # undecodable files allowed, in all
    bad: int = 0  # undecodable files so far (shards of an earlier run included)
    written: list[str] = field(default_factory=list)  # shards this run wrote
    tmp: str | None = None  # the local file of the shard being written, until it is published

    @property
    def done(self) -> dict[str, dict[str, Any]]:
        """``name -> entry`` of the shards recorded in the progress file."""
        return self.record["shards"]


@dataclass
class _ShardRows:
    """One shard's decodable files (encoded bytes, labels, paths relative to SRC) and the files it skipped."""

    images: list[bytes] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)


def _check_inputs(src: str, dest: str, shard_size: int, workers: int, max_bad_fraction: float,
                  labels: str = "folders") -> tuple[ImageFolderListing, str, _Destination]:  # fmt: skip
    """The refusals before any work: bad settings, a bad SRC, DEST = SRC, a DEST that cannot be created or reached.
    Returns SRC's listing, SRC as a URI and DEST."""
    _check_settings(shard_size, workers, max_bad_fraction)
    listing = list_image_folder(src, key="SRC", labels=labels)
    source = _source_uri(src)
    target = _Destination(dest)
    if _source_uri(dest) == source:
        raise DataError(f"DEST: expected a location other than SRC, got {dest!r}")
    target.prepare()
    return listing, source, target


def _already_complete(dest: str, target: _Destination, *, verify: bool, workers: int, progress: bool,
                      start: float) -> PrepareResult:  # fmt: skip
    """DEST already holds this dataset: check it (every shard present with its size; with ``verify``, re-read)
    and write nothing."""
    try:
        manifest = read_manifest(dest, key="DEST")  # validated, every shard present with its size
        _info(f"{target.where(MANIFEST_NAME)} already holds this dataset ({manifest.num_images} images, "
              f"{len(manifest.shards)} shards): nothing to do")  # fmt: skip
        if verify:
            verify_shards(manifest, workers=workers, progress=progress)
    except DataError as err:
        raise DataError(f"{err}. Pass --overwrite to write the dataset again") from None
    return PrepareResult(manifest, [], [s.name for s in manifest.shards], True, time.monotonic() - start)


def _start_job(listing: ImageFolderListing, target: _Destination, ident: dict[str, Any], done: dict[str, Any], *,
               shard_size: int, seed: int, max_bad_fraction: float) -> _ShardJob:  # fmt: skip
    """Plan the shards, clear what an interrupted run left behind, keep its shards still intact and write the
    progress file (the first write into DEST)."""
    plan = plan_shards(len(listing), shard_size, seed)
    names = [shard_name(k) for k in range(len(plan))]
    target.remove_stale_temporaries()
    done = _reusable(done, target.sizes(), len(plan))
    record = {**ident, "shards": done}
    target.write_json(PROGRESS_NAME, record)  # the first write into DEST: fails here, before any work, if not writable
    job = _ShardJob(listing, target, ident, plan, names, relative_paths(listing), record, max_bad_fraction,
                    max_bad=int(max_bad_fraction * len(listing)),
                    bad=sum(len(e.get("skipped", [])) for e in done.values()))  # fmt: skip
    if done:
        _info(f"resuming: {len(done)} of {len(plan)} shards of {target.uri} were completed by an earlier run")
    return job


def _write_missing_shards(job: _ShardJob, src: str, *, workers: int, progress: bool,
                          after_shard: Callable[[str], None] | None) -> None:  # fmt: skip
    """Write every shard not done yet, in plan order, with the next shard's files read while one is written. An
    interruption keeps the shards recorded so far (and removes the one being written)."""
    from tqdm import tqdm

    todo = [k for k in range(len(job.plan)) if job.names[k] not in job.done]
    bar = tqdm(total=len(job.listing), initial=sum(len(job.plan[k]) for k in range(len(job.plan)) if job.names[k] in job.done),
               unit="img", desc="prepare-data", disable=not progress, dynamic_ncols=True, smoothing=0.1)  # fmt: skip
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="prepare-data")
    source_fs = data_filesystem(src)[0]

    def submit(k: int) -> list[Future]:
        return [pool.submit(_load, source_fs, job.listing.files[i]) for i in job.plan[k]]

    try:
        pending = submit(todo[0]) if todo else []
        for pos, k in enumerate(todo):
            futures, pending = pending, (submit(todo[pos + 1]) if pos + 1 < len(todo) else [])
            rows = _collect_rows(job, k, futures, bar)
            del futures
            _write_shard(job, k, rows)
            bar.set_postfix(shards=f"{len(job.done)}/{len(job.plan)}", skipped=job.bad, refresh=False)
            if after_shard is not None:
                after_shard(job.names[k])
    except KeyboardInterrupt:
        _warn(f"interrupted after {len(job.written)} new shard(s): run the same command again to resume")
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
        if job.tmp is not None and os.path.exists(job.tmp):
            os.unlink(job.tmp)


def _collect_rows(job: _ShardJob, k: int, futures: list[Future], bar: Any) -> _ShardRows:
    """Shard ``k``'s files as its reads complete, in plan order; an undecodable file is skipped with a warning.
    Raises once more than ``max_bad_fraction`` of all files were skipped (no manifest is written then)."""
    rows = _ShardRows()
    for i, fut in zip(job.plan[k], futures):
        data, problem = fut.result()
        bar.update(1)
        if problem is not None:
            _warn(f"skipping {job.listing.uri.rstrip('/')}/{job.rel[i]}: not a decodable image ({problem})")
            rows.skipped.append({"path": job.rel[i], "reason": problem})
            continue
        rows.images.append(data)
        rows.labels.append(job.listing.labels[i])
        rows.paths.append(job.rel[i])
    job.bad += len(rows.skipped)
    if job.bad > job.max_bad:
        examples = [s["path"] for e in [*job.done.values(), {"skipped": rows.skipped}] for s in e.get("skipped", [])][:5]
        raise DataError(f"SRC: more than --max-bad-fraction {job.max_bad_fraction} of the {len(job.listing)} files of "
                        f"{job.listing.uri!r} are not decodable images ({job.bad} so far, e.g. {examples}); no manifest "
                        "was written")  # fmt: skip
    return rows


def _write_shard(job: _ShardJob, k: int, rows: _ShardRows) -> None:
    """Write shard ``k`` to a temporary file, publish it under its name, then record it in the progress file."""
    name = job.names[k]
    job.tmp = job.target.local_temp(name)
    size, sha = write_parquet_shard(job.tmp, rows.images, rows.labels, rows.paths)
    rows.images = []  # the encoded bytes are in the file now: free them before the upload
    job.target.publish(job.tmp, name)
    if job.target.s3:
        os.unlink(job.tmp)
    job.tmp = None
    job.done[name] = {"name": name, "num_images": len(rows.labels), "bytes": size, "sha256": sha, "skipped": rows.skipped}
    job.target.write_json(PROGRESS_NAME, job.record)
    job.written.append(name)


def _delete_replaced_shards(target: _Destination, num_shards: int) -> None:
    """With ``overwrite``: the shards of the replaced dataset beyond this one's last shard."""
    for name in target.sizes():
        m = SHARD_RE.match(name)
        if m and int(m.group(1)) >= num_shards:
            target.delete(name)


def _manifest_json(job: _ShardJob) -> dict[str, Any]:
    """The content of ``manifest.json`` once every shard is done: identity, classes, counts, skipped files, shards."""
    done, names, listing = job.done, job.names, job.listing
    skipped_all = [s for n in names for s in done[n].get("skipped", [])]
    skipped_paths = {s["path"] for s in skipped_all}
    counts = Counter(listing.classes[y] for y, p in zip(listing.labels, job.rel) if p not in skipped_paths and y >= 0)
    return {
        "format": FORMAT, "version": VERSION, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **{k: job.ident[k] for k in ("source", "num_files", "listing_sha256", "settings")},
        "num_images": sum(done[n]["num_images"] for n in names),
        "labels": "folders" if listing.labelled else "none",
        "classes": listing.classes,
        "counts": {c: counts.get(c, 0) for c in listing.classes},
        "skipped": skipped_all,
        "shards": [{k: done[n][k] for k in ("name", "num_images", "bytes", "sha256")} for n in names],
    }  # fmt: skip


def _verify_before_manifest(job: _ShardJob, manifest: ShardManifest, *, workers: int, progress: bool) -> None:
    """With ``verify``: re-read every shard; shards that differ are dropped from the progress file (a rerun writes
    them again) and the run fails before the manifest is written."""
    problems = shard_problems(manifest, workers=workers, progress=progress)
    if problems:  # forget them: a rerun writes them again
        for info, _ in problems:
            job.done.pop(info.name, None)
        job.target.write_json(PROGRESS_NAME, job.record)
        raise DataError(f"{_describe_problems(manifest, problems)}; no manifest was written: run the same command "
                        "again to write these shards again")  # fmt: skip


# ---- reading -------------------------------------------------------------------------------------------------
def read_manifest(uri: str, key: str = "data.root", *, check_files: bool = True, endpoint: str | None = None) -> ShardManifest:
    """The manifest of a sharded dataset at ``uri`` (local or ``s3://``; ``endpoint``: the spec's S3 endpoint, else
    the AWS settings), validated; with ``check_files``, every shard is checked to exist with its recorded size (one
    listing). Errors are :class:`DataError` naming ``key`` and ``uri``."""
    dest = _Destination(uri, endpoint)
    where = dest.where(MANIFEST_NAME)
    try:
        m = dest.read_json(MANIFEST_NAME)
        unfinished = m is None and dest.read_json(PROGRESS_NAME) is not None
    except DataError as err:
        raise DataError(f"{key}: {str(err).removeprefix('DEST: ')}") from None
    except OSError as err:
        raise DataError(f"{key}: cannot read {where!r}: {type(err).__name__}: {str(err)[:300]}") from None
    if m is None:
        hint = (" (a prepare-data run there did not finish: run it again to resume)" if unfinished else
                " (write one with `python -m ssl_platform prepare-data SRC DEST`)")  # fmt: skip
        raise DataError(f"{key}: expected a sharded dataset with {MANIFEST_NAME}, got {uri!r} without it{hint}")

    def bad(what: str) -> DataError:
        return DataError(f"{key}: {where!r} is not a valid shard manifest: {what}")

    if m.get("format") != FORMAT:
        raise bad(f"expected format {FORMAT!r}, got {m.get('format')!r}")
    if not isinstance(m.get("version"), int) or m["version"] > VERSION:
        raise bad(f"expected version <= {VERSION} (this ssl_platform), got {m.get('version')!r}")
    for name, kind in (("classes", list), ("shards", list), ("counts", dict), ("skipped", list), ("num_images", int),
                       ("source", str), ("created", str)):  # fmt: skip
        if not isinstance(m.get(name), kind):
            raise bad(f"expected {name!r} to be a {kind.__name__}, got {type(m.get(name)).__name__}")
    unlabelled = m.get("labels") == "none"
    if not (m["classes"] or unlabelled) or not all(isinstance(c, str) for c in m["classes"]):
        raise bad("expected 'classes' to be a non-empty list of class names")
    if not m["shards"]:
        raise bad("no shards")
    for i, s in enumerate(m["shards"]):
        if not isinstance(s, dict) or not {"name", "num_images", "bytes", "sha256"} <= set(s):
            raise bad(f"shard {i}: expected name, num_images, bytes and sha256, got {s!r}"[:300])
        if not SHARD_RE.match(str(s["name"])) or not _SHA256_RE.match(str(s["sha256"])):
            raise bad(f"shard {i}: expected a shard-NNNNN.parquet name and a hex SHA-256, got {s['name']!r} / {s['sha256']!r}")
    counted = m["num_images"] if unlabelled else sum(m["counts"].values())
    if sum(s["num_images"] for s in m["shards"]) != m["num_images"] or counted != m["num_images"]:
        raise bad(f"num_images {m['num_images']} differs from the sum over shards or classes")
    try:
        manifest = _manifest_from_json(uri, dest.path, m)
    except (TypeError, KeyError) as err:
        raise bad(f"{type(err).__name__}: {err}") from None
    if check_files:
        try:
            sizes = dest.sizes()
        except OSError as err:
            raise DataError(f"{key}: cannot list {uri!r}: {type(err).__name__}: {str(err)[:300]}") from None
        for s in manifest.shards:
            if s.name not in sizes:
                raise DataError(f"{key}: shard {dest.where(s.name)!r} listed in {MANIFEST_NAME} is missing")
            if sizes[s.name] != s.bytes:
                raise DataError(f"{key}: shard {dest.where(s.name)!r} has {sizes[s.name]} bytes, {MANIFEST_NAME} says {s.bytes}")
    return manifest


def _check_shard(fs, path: str, info: ShardInfo) -> str | None:
    import pyarrow.parquet as pq

    digest, size = hashlib.sha256(), 0
    try:
        with fs.open_input_stream(path) as stream:
            while data := stream.read(8 * 1024 * 1024):
                digest.update(data)
                size += len(data)
    except FileNotFoundError:
        return "missing"
    if size != info.bytes:
        return f"{size} bytes, the manifest says {info.bytes}"
    if digest.hexdigest() != info.sha256:
        return f"SHA-256 {digest.hexdigest()[:16]}..., the manifest says {info.sha256[:16]}..."
    with fs.open_input_file(path) as f:
        meta = pq.ParquetFile(f).metadata
        names = set(meta.schema.to_arrow_schema().names)
    if meta.num_rows != info.num_images:
        return f"{meta.num_rows} rows, the manifest says {info.num_images}"
    if not {"image", "label", "path"} <= names:
        return f"columns {sorted(names)}, expected image, label, path"
    return None


def shard_problems(manifest: ShardManifest, *, workers: int = DEFAULT_WORKERS, progress: bool = False,
                   endpoint: str | None = None) -> list[tuple[ShardInfo, str]]:  # fmt: skip
    """Re-read every shard (in parallel): ``(shard, problem)`` for each whose size, SHA-256, row count or columns
    differ from the manifest."""
    from tqdm import tqdm

    fs, _ = data_filesystem(manifest.uri, endpoint)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(lambda a: _check_shard(fs, *a), zip(manifest.shard_paths, manifest.shards))
        checked = tqdm(results, total=len(manifest.shards), unit="shard", desc="verify", disable=not progress)
        return [(info, p) for info, p in zip(manifest.shards, checked) if p]


def _describe_problems(manifest: ShardManifest, problems: list[tuple[ShardInfo, str]]) -> str:
    base = manifest.uri.rstrip("/")
    listed = "; ".join(f"{base}/{info.name}: {p}" for info, p in problems[:5])
    return f"{len(problems)} of {len(manifest.shards)} shards of {manifest.uri!r} do not match {MANIFEST_NAME}: {listed}"


def verify_shards(manifest: ShardManifest, *, workers: int = DEFAULT_WORKERS, progress: bool = False,
                  endpoint: str | None = None) -> None:  # fmt: skip
    """:func:`shard_problems`, raised as one :class:`DataError` naming every shard that differs (up to 5)."""
    problems = shard_problems(manifest, workers=workers, progress=progress, endpoint=endpoint)
    if problems:
        raise DataError(_describe_problems(manifest, problems))


def iter_shard_rows(manifest: ShardManifest, columns: tuple[str, ...] = ("image", "label", "path"),
                    endpoint: str | None = None) -> Iterator[dict[str, Any]]:  # fmt: skip
    """Every row of every shard, in manifest order (one row group at a time): for checks and small tools; training
    reads shards through Ray Data."""
    import pyarrow.parquet as pq

    fs, _ = data_filesystem(manifest.uri, endpoint)
    for path in manifest.shard_paths:
        with fs.open_input_file(path) as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=ROW_GROUP_SIZE, columns=list(columns)):
                yield from batch.to_pylist()


# ---- CLI --------------------------------------------------------------------------------------------------
def _cmd_prepare_data(args: argparse.Namespace) -> int:
    try:
        res = prepare_shards(args.src, args.dest, shard_size=args.shard_size, workers=args.workers, seed=args.seed,
                             overwrite=args.overwrite, verify=args.verify, max_bad_fraction=args.max_bad_fraction,
                             progress=not args.no_progress, labels=args.labels)  # fmt: skip
    except KeyboardInterrupt:
        return 130  # the message to rerun was printed; the shards written so far are kept
    m = res.manifest
    rate = sum(s.num_images for s in m.shards if s.name in res.written) / max(res.seconds, 1e-9)
    what = f"of {m.num_classes} classes" if m.labelled else "without labels"
    print(f"[ssl_platform] {m.num_images} images {what} in {len(m.shards)} shards at "
          f"{m.uri.rstrip('/')}/{MANIFEST_NAME}: {len(res.written)} written ({rate:.0f} images/s), "
          f"{len(res.reused)} {'already there' if res.already_complete else 'resumed'}; {len(m.skipped)} file(s) skipped"
          f"{'; every shard verified' if args.verify else ''}", flush=True)  # fmt: skip
    for s in m.skipped[:10]:
        print(f"  skipped {s.path}: {s.reason}", flush=True)
    return 0


def register_cli(sub) -> None:
    p = sub.add_parser("prepare-data", help="convert an ImageFolder (local or s3://) into Parquet shards with a manifest",
                       description="Convert an ImageFolder tree (SRC/class_name/image, local or s3://bucket/prefix) into "
                       "Parquet shards (encoded image bytes, label, path) and DEST/manifest.json, on local disk or S3. "
                       "Resumable: run the same command again after an interruption.")  # fmt: skip
    p.add_argument("src", metavar="SRC", help="ImageFolder root: a local directory or s3://bucket/prefix")
    p.add_argument("dest", metavar="DEST", help="where the shards and manifest.json go: a local directory or s3://bucket/prefix")
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE,
                   help=f"images per shard (default {DEFAULT_SHARD_SIZE}: ~110 MB of ImageNet JPEGs)")
    p.add_argument("--workers", type=int, default=DEFAULT_WORKERS, help=f"threads reading and checking images (default {DEFAULT_WORKERS})")
    p.add_argument("--seed", type=int, default=0, help="seed of the file -> shard assignment (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset of another source or settings already at DEST")
    p.add_argument("--verify", action="store_true", help="re-read every shard (size, SHA-256, rows) before declaring DEST complete")
    p.add_argument("--max-bad-fraction", type=float, default=DEFAULT_MAX_BAD_FRACTION,
                   help=f"fail when more than this fraction of files is not decodable (default {DEFAULT_MAX_BAD_FRACTION})")
    p.add_argument("--labels", choices=("folders", "none"), default="folders",
                   help="folders: SRC/class_name/image (default); none: every image under SRC at any depth, no labels")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_prepare_data)


__all__ = ["PrepareResult", "ShardInfo", "ShardManifest", "SkippedFile", "iter_shard_rows", "plan_shards",
           "prepare_shards", "read_manifest", "register_cli", "shard_problems", "verify_shards"]
