"""``prepare-data``: ImageFolder (local or S3) -> Parquet shards + manifest (local or S3), resumable, bad files
skipped; the reader's manifest checks. Real files, a real moto S3 server on 127.0.0.1, the real CLI; no Ray."""

from __future__ import annotations

import hashlib
import io
import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import boto3
import numpy as np
import pytest
from PIL import Image

from ssl_platform.cli import main
from ssl_platform.data.shards import (
    MANIFEST_NAME,
    PROGRESS_NAME,
    iter_shard_rows,
    plan_shards,
    prepare_shards,
    read_manifest,
    verify_shards,
)
from ssl_platform.data.small_sets import DataError
from tests.conftest import ROOT

CLASSES = ("ant", "bee", "cat")


def make_tree(root: Path, per_class: int = 7, seed: int = 0) -> dict[str, tuple[bytes, int]]:
    """JPEGs and PNGs of mixed sizes and modes under ``root/class/``; ``{relative path: (file bytes, label)}``."""
    rng = np.random.default_rng(seed)
    out = {}
    for label, cls in enumerate(CLASSES):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h, w = (int(v) for v in rng.integers(12, 90, 2))
            mode = "L" if i % 5 == 4 else "RGB"
            pixels = (rng.random((h, w, 3) if mode == "RGB" else (h, w)) * 255).astype(np.uint8)
            rel = f"{cls}/{'sub/' if i == 3 else ''}img{i}.{'jpg' if i % 2 else 'png'}"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels, mode).save(root / rel)
            out[rel] = ((root / rel).read_bytes(), label)
    return out


def rows_of(dest: str) -> dict[str, tuple[bytes, int]]:
    manifest = read_manifest(dest)
    rows = list(iter_shard_rows(manifest))
    assert len(rows) == manifest.num_images
    return {r["path"]: (r["image"], r["label"]) for r in rows}


def comparable(manifest_json: dict) -> dict:
    return {k: v for k, v in manifest_json.items() if k != "created"}


def local_json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_local_round_trip_through_the_cli(tmp_path, capsys):
    tree = make_tree(tmp_path / "src")
    dest = tmp_path / "shards"
    assert main(["prepare-data", str(tmp_path / "src"), str(dest), "--shard-size", "5", "--workers", "3", "--seed", "7",
                 "--verify"]) == 0  # fmt: skip
    assert "21 images of 3 classes in 5 shards" in capsys.readouterr().out

    assert rows_of(str(dest)) == tree  # every image's bytes and label come back
    m = local_json(dest / MANIFEST_NAME)
    assert m["format"] == "parquet" and m["classes"] == list(CLASSES) and m["num_images"] == 21
    assert m["counts"] == {c: 7 for c in CLASSES} and m["skipped"] == []
    assert m["source"] == str(tmp_path / "src") and m["settings"] == {"shard_size": 5, "seed": 7}
    assert [s["num_images"] for s in m["shards"]] == [5, 5, 5, 5, 1]
    for s in m["shards"]:
        data = (dest / s["name"]).read_bytes()
        assert s["bytes"] == len(data) and s["sha256"] == hashlib.sha256(data).hexdigest()
    assert sorted(p.name for p in dest.iterdir()) == [MANIFEST_NAME] + [f"shard-0000{i}.parquet" for i in range(5)]

    manifest = read_manifest(str(dest))
    assert manifest.shard_uris == [str(dest / s["name"]) for s in m["shards"]]
    labels_per_shard = [{label for _, label in rows_of_shard(path)} for path in manifest.shard_paths]
    assert any(len(labels) > 1 for labels in labels_per_shard)  # shuffled once: shards mix classes
    # the assignment is the seeded permutation of the sorted listing
    listing = sorted(tree)
    expected_first = [listing[i] for i in plan_shards(21, 5, seed=7)[0]]
    assert [p for p, _ in rows_of_shard(manifest.shard_paths[0])] == expected_first
    assert plan_shards(21, 5, seed=7) != plan_shards(21, 5, seed=8)

    # a second identical run changes nothing; another DEST gets byte-identical shards
    before = {p.name: p.stat().st_mtime_ns for p in dest.iterdir()}
    res = prepare_shards(str(tmp_path / "src"), str(dest), shard_size=5, seed=7, progress=False)
    assert res.already_complete and res.written == []
    assert {p.name: p.stat().st_mtime_ns for p in dest.iterdir()} == before
    again = prepare_shards(str(tmp_path / "src"), str(tmp_path / "again"), shard_size=5, seed=7, progress=False)
    assert [s.sha256 for s in again.manifest.shards] == [s["sha256"] for s in m["shards"]]


def rows_of_shard(path: str) -> list[tuple[str, int]]:
    import pyarrow.parquet as pq

    t = pq.read_table(path, columns=["path", "label"])
    return list(zip(t.column("path").to_pylist(), t.column("label").to_pylist()))


def test_corrupt_files_are_skipped_listed_and_counted_up_to_the_limit(tmp_path, capsys):
    tree = make_tree(tmp_path / "src")
    src = tmp_path / "src"
    (src / "bee" / "garbage.jpg").write_bytes(b"this is not a JPEG" * 10)
    good = tree["cat/img1.jpg"][0]
    (src / "cat" / "truncated.jpg").write_bytes(good[: len(good) // 2])

    res = prepare_shards(str(src), str(tmp_path / "ok"), shard_size=4, max_bad_fraction=0.1, progress=False)
    err = capsys.readouterr().err
    assert "skipping" in err and "bee/garbage.jpg" in err and "cat/truncated.jpg" in err
    m = local_json(tmp_path / "ok" / MANIFEST_NAME)
    assert sorted(s["path"] for s in m["skipped"]) == ["bee/garbage.jpg", "cat/truncated.jpg"]
    assert all(s["reason"] and "0x" not in s["reason"] for s in m["skipped"])
    assert m["num_images"] == 21 and m["num_files"] == 23 and m["counts"] == {c: 7 for c in CLASSES}
    assert rows_of(str(tmp_path / "ok")) == tree
    assert [s.path for s in res.manifest.skipped] == [s["path"] for s in m["skipped"]]

    # 2 bad files of 23 > 1%: the default refuses, names examples and writes no manifest
    code = main(["prepare-data", str(src), str(tmp_path / "strict"), "--shard-size", "4", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "--max-bad-fraction 0.01" in err and "garbage.jpg" in err
    assert not (tmp_path / "strict" / MANIFEST_NAME).exists()


def test_interrupted_run_resumes_without_rewriting_finished_shards(tmp_path):
    make_tree(tmp_path / "src")
    src, dest = str(tmp_path / "src"), tmp_path / "dest"

    def stop_after_two(name: str) -> None:
        if name == "shard-00001.parquet":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare_shards(src, str(dest), shard_size=4, workers=2, progress=False, after_shard=stop_after_two)
    assert not (dest / MANIFEST_NAME).exists()
    progress = local_json(dest / PROGRESS_NAME)
    assert sorted(progress["shards"]) == ["shard-00000.parquet", "shard-00001.parquet"]
    assert sorted(p.name for p in dest.glob("shard-*")) == ["shard-00000.parquet", "shard-00001.parquet"]
    finished = {n: ((dest / n).stat().st_ino, (dest / n).stat().st_mtime_ns) for n in progress["shards"]}
    (dest / ".shard-00002.parquet.tmp-999999").write_bytes(b"half a shard")  # what a killed writer leaves
    with pytest.raises(DataError, match=f"{MANIFEST_NAME}.*did not finish: run it again to resume"):
        read_manifest(str(dest))

    res = prepare_shards(src, str(dest), shard_size=4, workers=2, progress=False)
    assert res.reused == ["shard-00000.parquet", "shard-00001.parquet"] and len(res.written) == 4
    assert {n: ((dest / n).stat().st_ino, (dest / n).stat().st_mtime_ns) for n in finished} == finished
    assert not (dest / PROGRESS_NAME).exists() and not list(dest.glob(".shard-*"))

    fresh = prepare_shards(src, str(tmp_path / "fresh"), shard_size=4, workers=2, progress=False)
    assert comparable(local_json(dest / MANIFEST_NAME)) == comparable(local_json(tmp_path / "fresh" / MANIFEST_NAME))
    for s in fresh.manifest.shards:
        assert (dest / s.name).read_bytes() == (tmp_path / "fresh" / s.name).read_bytes()

    # a shard recorded as done but gone (or of another size) since is written again
    (dest / MANIFEST_NAME).unlink()
    progress["shards"]["shard-00001.parquet"]["bytes"] += 1
    (dest / PROGRESS_NAME).write_text(json.dumps(progress))
    res = prepare_shards(src, str(dest), shard_size=4, workers=2, progress=False)
    assert res.written == ["shard-00001.parquet", "shard-00002.parquet", "shard-00003.parquet", "shard-00004.parquet",
                           "shard-00005.parquet"]  # fmt: skip
    verify_shards(read_manifest(str(dest)))

    # --verify finds a recorded shard whose content changed (same size): no manifest; the rerun rewrites only it
    (dest / MANIFEST_NAME).unlink()
    (dest / PROGRESS_NAME).write_text(json.dumps(progress))
    data = bytearray((dest / "shard-00000.parquet").read_bytes())
    data[100] ^= 0xFF
    (dest / "shard-00000.parquet").write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"1 of 6 shards .*shard-00000.parquet: SHA-256.*run the same command again"):
        prepare_shards(src, str(dest), shard_size=4, workers=2, progress=False, verify=True)
    assert not (dest / MANIFEST_NAME).exists()
    res = prepare_shards(src, str(dest), shard_size=4, workers=2, progress=False, verify=True)
    assert res.written == ["shard-00000.parquet"]
    assert (dest / "shard-00000.parquet").read_bytes() == (tmp_path / "fresh" / "shard-00000.parquet").read_bytes()


def test_refusals_before_work_and_nothing_stored_is_lost(tmp_path):
    make_tree(tmp_path / "src")
    src = str(tmp_path / "src")
    with pytest.raises(DataError, match=r"SRC: .*'/nonexistent/tree'.*does not exist"):
        prepare_shards("/nonexistent/tree", str(tmp_path / "d"), progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"SRC: .*empty"):
        prepare_shards(str(tmp_path / "empty"), str(tmp_path / "d"), progress=False)
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "a.png")
    with pytest.raises(DataError, match=r"SRC: .*root/class_name"):
        prepare_shards(str(tmp_path / "flat"), str(tmp_path / "d"), progress=False)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(DataError, match=r"DEST: .*afile.*is a file"):
        prepare_shards(src, str(tmp_path / "afile"), progress=False)
    with pytest.raises(DataError, match=r"--shard-size: expected an integer >= 1, got 0"):
        prepare_shards(src, str(tmp_path / "d"), shard_size=0, progress=False)
    with pytest.raises(DataError, match="DEST: expected a location other than SRC"):
        prepare_shards(src, src + "/", progress=False)
    assert not (tmp_path / "d").exists()

    dest = tmp_path / "dest"
    prepare_shards(src, str(dest), shard_size=4, progress=False)
    stored = {p.name: p.read_bytes() for p in dest.iterdir()}
    with pytest.raises(DataError, match=r"already holds a complete shard dataset.*shard_size 4.*shard_size 8.*--overwrite"):
        prepare_shards(src, str(dest), shard_size=8, progress=False)
    (tmp_path / "src" / "ant" / "new.png").write_bytes((tmp_path / "src" / "ant" / "img0.png").read_bytes())
    with pytest.raises(DataError, match=r"22 files.*21 files|21 files.*22 files"):
        prepare_shards(src, str(dest), shard_size=4, progress=False)  # the source changed since
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == stored

    res = prepare_shards(src, str(dest), shard_size=8, overwrite=True, progress=False)
    assert sorted(p.name for p in dest.iterdir()) == [MANIFEST_NAME, *(s.name for s in res.manifest.shards)]
    assert len(res.manifest.shards) == 3 and res.manifest.num_images == 22  # the 6 old shards' extras are gone

    # an unfinished run of other settings, and shard files of unknown origin, are refused too
    with pytest.raises(KeyboardInterrupt):
        prepare_shards(src, str(tmp_path / "half"), shard_size=4, progress=False,
                       after_shard=lambda name: (_ for _ in ()).throw(KeyboardInterrupt))  # fmt: skip
    with pytest.raises(DataError, match=r"unfinished preparation.*--overwrite"):
        prepare_shards(src, str(tmp_path / "half"), shard_size=5, progress=False)
    (tmp_path / "strays").mkdir()
    (tmp_path / "strays" / "shard-00000.parquet").write_bytes(b"someone else's")
    with pytest.raises(DataError, match=r"holds shard files .*shard-00000.parquet"):
        prepare_shards(src, str(tmp_path / "strays"), progress=False)
    assert (tmp_path / "strays" / "shard-00000.parquet").read_bytes() == b"someone else's"


def test_read_manifest_and_verify_name_the_key_and_the_problem(tmp_path):
    make_tree(tmp_path / "src", per_class=3)
    dest = tmp_path / "dest"
    prepare_shards(str(tmp_path / "src"), str(dest), shard_size=4, progress=False)
    manifest = read_manifest(str(dest), key="data.val_root")
    assert manifest.classes == list(CLASSES) and manifest.counts == {c: 3 for c in CLASSES} and manifest.num_classes == 3
    assert sum(s.num_images for s in manifest.shards) == manifest.num_images == 9

    with pytest.raises(DataError, match=rf"data.root: expected a sharded dataset with {MANIFEST_NAME}, got '{tmp_path / 'src'}'"):
        read_manifest(str(tmp_path / "src"))
    shard = dest / manifest.shards[1].name
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other content
    shard.write_bytes(bytes(data))
    read_manifest(str(dest))  # sizes agree: only a checksum finds it
    with pytest.raises(DataError, match=r"1 of 3 shards .*shard-00001.parquet: SHA-256"):
        verify_shards(manifest)
    shard.write_bytes(bytes(data[:-10]))
    with pytest.raises(DataError, match=r"data.val_root: shard .*shard-00001.parquet.* has \d+ bytes"):
        read_manifest(str(dest), key="data.val_root")
    shard.unlink()
    with pytest.raises(DataError, match=r"data.root: shard .*shard-00001.parquet.* is missing"):
        read_manifest(str(dest))
    with pytest.raises(DataError, match=r"DEST: shard .*shard-00001.parquet.* is missing. Pass --overwrite"):
        prepare_shards(str(tmp_path / "src"), str(dest), shard_size=4, progress=False)
    m = local_json(dest / MANIFEST_NAME)
    del m["shards"][0]["sha256"]
    (dest / MANIFEST_NAME).write_text(json.dumps(m))
    with pytest.raises(DataError, match=r"data.root: .*manifest.json.* not a valid shard manifest: shard 0: expected .*sha256"):
        read_manifest(str(dest))


# ---- S3 ------------------------------------------------------------------------------------------------------
def _upload_tree(local: Path, bucket: str, prefix: str) -> None:
    s3 = boto3.client("s3")
    for f in sorted(local.rglob("*")):
        if f.is_file():
            s3.upload_file(str(f), bucket, f"{prefix}/{f.relative_to(local).as_posix()}")


def _versions(bucket: str, prefix: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for v in boto3.client("s3").list_object_versions(Bucket=bucket, Prefix=prefix).get("Versions", []):
        out.setdefault(v["Key"].rsplit("/", 1)[-1], []).append(v["VersionId"])
    return out


def test_s3_to_local_through_the_cli(s3_server, tmp_path, capsys):
    tree = make_tree(tmp_path / "src")
    bucket = s3_server["bucket"]
    _upload_tree(tmp_path / "src", bucket, "datasets/tiny")
    code = main(["prepare-data", f"s3://{bucket}/datasets/tiny/", str(tmp_path / "dest"), "--shard-size", "6",
                 "--verify", "--no-progress"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert rows_of(str(tmp_path / "dest")) == tree
    m = local_json(tmp_path / "dest" / MANIFEST_NAME)
    assert m["source"] == f"s3://{bucket}/datasets/tiny" and m["counts"] == {c: 7 for c in CLASSES}

    code = main(["prepare-data", f"s3://{bucket}/datasets/none", str(tmp_path / "d2"), "--no-progress"])
    assert code == 2 and f"SRC: expected an ImageFolder directory (root/class_name/image), got 's3://{bucket}/datasets/none'" in capsys.readouterr().err
    code = main(["prepare-data", str(tmp_path / "src"), "s3://no-such-bucket/shards", "--no-progress"])
    assert code == 2 and "DEST: the bucket 'no-such-bucket' of 's3://no-such-bucket/shards' does not exist" in capsys.readouterr().err


def test_local_to_s3_killed_mid_run_resumes_without_reuploading(s3_server, tmp_path):
    """A hard kill (SIGKILL, no clean-up) after the second shard; the rerun uploads only the missing shards: the
    bucket is versioned, so a re-upload would add an object version."""
    tree = make_tree(tmp_path / "src")
    bucket = s3_server["bucket"]
    s3 = boto3.client("s3")
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    src, dest = str(tmp_path / "src"), f"s3://{bucket}/shards/tiny"
    code = f"""
import os, signal
from ssl_platform.data.shards import prepare_shards

def kill(name):
    if name == "shard-00001.parquet":
        os.kill(os.getpid(), signal.SIGKILL)

prepare_shards({src!r}, {dest!r}, shard_size=5, workers=2, progress=False, after_shard=kill)
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=120, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    versions = _versions(bucket, "shards/tiny/")
    assert sorted(n for n in versions if n.startswith("shard-")) == ["shard-00000.parquet", "shard-00001.parquet"]
    assert MANIFEST_NAME not in versions
    with pytest.raises(DataError, match="did not finish: run it again to resume"):
        read_manifest(dest)
    # what a kill in the middle of a large shard's multipart upload leaves: invisible, aborted by the rerun
    cut = s3.create_multipart_upload(Bucket=bucket, Key="shards/tiny/shard-00002.parquet")
    s3.upload_part(Bucket=bucket, Key="shards/tiny/shard-00002.parquet", UploadId=cut["UploadId"], PartNumber=1, Body=b"x" * 1024)
    other = s3.create_multipart_upload(Bucket=bucket, Key="shards/tiny/notes.bin")  # not ours: left alone

    res = prepare_shards(src, dest, shard_size=5, workers=2, progress=False, verify=True)
    assert [u["UploadId"] for u in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])] == [other["UploadId"]]
    assert res.reused == ["shard-00000.parquet", "shard-00001.parquet"] and len(res.written) == 3
    after = _versions(bucket, "shards/tiny/")
    assert all(len(after[f"shard-0000{i}.parquet"]) == 1 for i in range(5))  # each shard uploaded once
    assert after["shard-00000.parquet"] == versions["shard-00000.parquet"]
    assert {k: len(v) for k, v in after.items() if k == MANIFEST_NAME} == {MANIFEST_NAME: 1}

    manifest = read_manifest(dest)
    assert manifest.shard_uris[0] == f"{dest}/shard-00000.parquet" and manifest.shard_paths[0] == f"{bucket}/shards/tiny/shard-00000.parquet"
    assert rows_of(dest) == tree
    fresh = prepare_shards(src, str(tmp_path / "fresh"), shard_size=5, progress=False)
    remote = json.loads(s3.get_object(Bucket=bucket, Key=f"shards/tiny/{MANIFEST_NAME}")["Body"].read())
    assert comparable(remote) == comparable(local_json(tmp_path / "fresh" / MANIFEST_NAME))
    assert [s.sha256 for s in manifest.shards] == [s.sha256 for s in fresh.manifest.shards]
    assert PROGRESS_NAME not in {o["Key"].rsplit("/", 1)[-1] for o in s3.list_objects_v2(Bucket=bucket, Prefix="shards/tiny/")["Contents"]}


def test_image_problem_names_truncation_and_non_images():
    from ssl_platform.data.shards import image_problem

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 10, 10)).save(buf, "JPEG")
    data = buf.getvalue()
    assert image_problem(data) is None
    assert "truncated" in image_problem(data[: math.ceil(len(data) * 0.6)]).lower()
    assert image_problem(b"\x00" * 100).startswith("UnidentifiedImageError")
