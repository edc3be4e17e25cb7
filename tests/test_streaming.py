"""The streamed data path: listing, CPU decoding into canvases, Ray Data shards per Train worker, bad files.

Real parts only: generated JPEG/PNG trees on disk and on the moto S3 server, real Ray Data in a real local Ray.
"""

from __future__ import annotations

import io
import uuid
from pathlib import Path

import boto3
import mlflow
import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.image_tree import encode_image, write_image_tree
from ssl_platform.data.decode import decode_batch, decode_to_canvas
from ssl_platform.data.small_sets import DataError
from ssl_platform.data.sources import list_image_folder, split_by_hash
from ssl_platform.data.streaming import InMemoryImages


# ---- CPU side ----------------------------------------------------------------------------------------------
def test_decode_fits_the_canvas_keeping_aspect_and_never_enlarges():
    rng = np.random.default_rng(0)
    big = encode_image((rng.random((375, 500, 3)) * 255).astype(np.uint8))
    canvas, h, w = decode_to_canvas(big, 64)
    assert canvas.shape == (64, 64, 3) and canvas.dtype == np.uint8
    assert (h, w) == (48, 64)  # 500x375 -> long side 64
    assert canvas[h:].max() == 0  # zero padding below the image
    small = encode_image((rng.random((20, 10, 3)) * 255).astype(np.uint8), "PNG")
    canvas, h, w = decode_to_canvas(small, 64)
    assert (h, w) == (20, 10) and canvas[:20, :10].any() and canvas[20:].max() == 0 and canvas[:, 10:].max() == 0
    grey = io.BytesIO()
    Image.fromarray((rng.random((30, 30)) * 255).astype(np.uint8), mode="L").save(grey, format="PNG")
    assert decode_to_canvas(grey.getvalue(), 32)[0].shape == (32, 32, 3)  # grey -> RGB


def test_decode_keeps_full_resolution_up_to_the_canvas_and_draft_is_an_option():
    rng = np.random.default_rng(1)
    small = (rng.random((16, 21, 3)) * 255).astype(np.uint8)
    jpeg = encode_image(np.asarray(Image.fromarray(small).resize((500, 375), Image.BICUBIC)))
    decoded = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
    canvas, h, w = decode_to_canvas(jpeg, 512)  # the ImageNet recipes' canvas: ImageNet's 500x375 as it is
    assert (h, w) == (375, 500) and np.array_equal(canvas[:h, :w], decoded) and canvas[h:].max() == 0
    full, h, w = decode_to_canvas(jpeg, 128)
    resized = np.asarray(Image.fromarray(decoded).resize((128, 96), Image.BILINEAR))
    assert (h, w) == (96, 128) and np.array_equal(full[:96, :128], resized)  # full decode, antialiased resize
    draft, dh, dw = decode_to_canvas(jpeg, 128, draft=True)  # the speed option: a 1/2-scale DCT decode first
    assert (dh, dw) == (96, 128) and not np.array_equal(draft, full)
    assert np.abs(draft.astype(int) - full.astype(int)).mean() < 3.0
    assert np.array_equal(decode_to_canvas(jpeg, 512, draft=True)[0], canvas)  # no effect when the image fits
    out = decode_batch({"image": np.array([jpeg], dtype=object), "path": np.array(["a.jpg"], dtype=object),
                        "label": np.array([0])}, canvas=128, draft=True)
    assert np.array_equal(out["image"][0], draft)


def test_decode_batch_keeps_labels_and_flags_corrupt_and_missing_files(tmp_path):
    from pyarrow.fs import LocalFileSystem

    good = encode_image(np.full((12, 16, 3), 200, dtype=np.uint8))
    batch = {
        "image": np.array([good, b"not an image"], dtype=object),
        "path": np.array(["/d/b/1.jpg", "/d/a/2.jpg"], dtype=object),
        "label": np.array([1, -1]),
    }
    out = decode_batch(batch, canvas=16)
    assert list(out["path"]) == ["/d/b/1.jpg", "/d/a/2.jpg"]
    assert out["label"].tolist() == [1, -1] and out["ok"].tolist() == [True, False]
    assert out["image"].shape == (2, 16, 16, 3) and out["size"].tolist() == [[12, 16], [0, 0]]
    # a listing's rows: bytes read from the filesystem; a file gone since the listing is a bad row, named
    (tmp_path / "x.jpg").write_bytes(good)
    rows = {"path": np.array([str(tmp_path / "x.jpg"), str(tmp_path / "gone.jpg")], dtype=object), "label": np.array([3, 4])}
    out = decode_batch(rows, canvas=16, filesystem=LocalFileSystem())
    assert out["ok"].tolist() == [True, False] and out["label"].tolist() == [3, 4]



def test_listing_and_hash_split(tmp_path):
    write_image_tree(tmp_path / "tree", num_classes=3, per_class=20, mean_size=(12, 16))
    listing = list_image_folder(str(tmp_path / "tree"))
    assert listing.classes == ["class_000", "class_001", "class_002"] and len(listing) == 60
    assert listing.labels == [0] * 20 + [1] * 20 + [2] * 20
    train, test = split_by_hash(listing, 0.25)
    assert len(train) + len(test) == 60 and 5 <= len(test) <= 25
    assert not set(train.files) & set(test.files)
    assert split_by_hash(listing, 0.25)[1].files == test.files  # deterministic


def test_listing_errors_name_the_key_and_uri(tmp_path, s3_server):
    with pytest.raises(DataError, match=r"data.root: expected an ImageFolder directory .*nope.*does not exist"):
        list_image_folder(str(tmp_path / "nope"))
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DataError, match="the dataset is empty"):
        list_image_folder(str(tmp_path / "empty"))
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "x.png").write_bytes(encode_image(np.zeros((4, 4, 3), np.uint8), "PNG"))
    with pytest.raises(DataError, match="images lie directly under it"):
        list_image_folder(str(tmp_path / "flat"), key="data.val_root")
    with pytest.raises(DataError, match=r"data.root: .*s3://no-such-bucket-x/train"):
        list_image_folder("s3://no-such-bucket-x/train")
    with pytest.raises(DataError, match=r"data.root: .*s3://ssl-test/missing/prefix.*does not exist"):
        list_image_folder(f"s3://{s3_server['bucket']}/missing/prefix")


def test_unreadable_class_folder_is_refused_naming_the_uri():
    """No read permission on a class folder: refused at listing with the key, the URI and the reason. File modes do
    not bind root, so when the suite runs as root the listing runs in a child process without the capabilities
    that bypass them (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH)."""
    import os
    import stat
    import subprocess
    import sys
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="ssl-perm-", dir="/tmp"))
    try:
        base.chmod(0o755)
        root = base / "train"
        (root / "a").mkdir(parents=True)
        (root / "b").mkdir()
        for cls in ("a", "b"):
            (root / cls / "x.png").write_bytes(encode_image(np.zeros((4, 4, 3), np.uint8), "PNG"))
        root.chmod(0o755)
        (root / "a").chmod(0o755)
        (root / "b").chmod(0)  # no read or traverse permission
        code = ("import sys; from ssl_platform.data.sources import list_image_folder; from ssl_platform.data.small_sets import DataError\n"
                "try:\n    list_image_folder(sys.argv[1])\nexcept DataError as err:\n    print(err); sys.exit(3)\n")
        def without_dac_override() -> None:  # root: drop the capabilities that ignore file modes, then exec
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
                if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
                    raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")

        restricted = without_dac_override if os.geteuid() == 0 else None
        repo = str(Path(__file__).resolve().parents[1])
        res = subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True, text=True, timeout=120,
                             preexec_fn=restricted, cwd="/tmp", env={**os.environ, "PYTHONPATH": repo})  # fmt: skip
        assert res.returncode == 3, (res.returncode, res.stdout, res.stderr[-2000:])
        assert "data.root" in res.stdout and str(root) in res.stdout and "no read permission" in res.stdout, res.stdout
    finally:
        (base / "train" / "b").chmod(stat.S_IRWXU)
        import shutil

        shutil.rmtree(base, ignore_errors=True)


def test_s3_prefix_without_read_permission_is_refused_at_once(monkeypatch):
    """An S3 principal without read permission: refused at listing (one try, no retries), naming the key, the URI and
    the reason. A moto server of its own enforces IAM after its first 4 actions (create the bucket, one object, a
    user without policies and that user's key)."""
    import os
    import socket
    import subprocess
    import sys
    import time

    import boto3

    from ssl_platform.training.ray_runtime import free_port

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "4"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        for _ in range(300):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        endpoint = f"http://127.0.0.1:{port}"
        admin = dict(endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                     aws_secret_access_key="testing")  # fmt: skip
        s3, iam = boto3.client("s3", **admin), boto3.client("iam", **admin)
        s3.create_bucket(Bucket="locked")
        s3.put_object(Bucket="locked", Key="train/a/x.png", Body=encode_image(np.zeros((4, 4, 3), np.uint8), "PNG"))
        iam.create_user(UserName="reader")
        key = iam.create_access_key(UserName="reader")["AccessKey"]  # from here on, requests are authorised
        for name, value in {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
                            "AWS_ENDPOINT_URL_S3": endpoint, "AWS_DEFAULT_REGION": "us-east-1",
                            "AWS_REGION": "us-east-1"}.items():  # fmt: skip
            monkeypatch.setenv(name, value)
        for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL"):
            monkeypatch.delenv(name, raising=False)
        start = time.monotonic()
        with pytest.raises(DataError, match=r"data.root: .*'s3://locked/train'.*no read permission"):
            list_image_folder("s3://locked/train")
        assert time.monotonic() - start < 10  # not retried with backoff (1 + 2 + 4 + 8 s)
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_in_memory_shards_are_disjoint_cover_and_reshuffle():
    data = InMemoryImages.from_float(torch.rand(50, 3, 4, 4), torch.arange(50) % 5)
    epoch0 = [data.shard_indices(r, 2, 0, seed=1) for r in range(2)]
    assert len(epoch0[0]) == len(epoch0[1]) == 25 and not set(epoch0[0].tolist()) & set(epoch0[1].tolist())
    assert not torch.equal(epoch0[0], data.shard_indices(0, 2, 1, seed=1))
    evaluation = torch.cat([data.shard_indices(r, 3, None, seed=1) for r in range(3)])
    assert sorted(evaluation.tolist()) == list(range(50))  # evaluation: every image once, nothing dropped


# ---- through Ray Train ---------------------------------------------------------------------------------
def _folder_spec(tiny_spec, root: str, val_root: str | None, extra: list[str] | None = None):
    overrides = ["data.name=image_folder", f"data.root={root}", "data.batch_size=8", "data.image_size=16",
                 "data.decode_size=24", *([f"data.val_root={val_root}"] if val_root else []), *(extra or [])]
    return tiny_spec(overrides)


@pytest.mark.slow
def test_two_workers_see_disjoint_files_that_cover_each_epoch(ray_session, tiny_spec, tmp_path):
    from ssl_platform.launch.run import run_experiment
    from tests.recording_hooks import RecordKeys

    files = write_image_tree(tmp_path / "train", num_classes=2, per_class=16, mean_size=(30, 40))
    write_image_tree(tmp_path / "val", num_classes=2, per_class=4, mean_size=(30, 40), seed=1)
    spec = _folder_spec(tiny_spec, str(tmp_path / "train"), str(tmp_path / "val"), ["scaling.num_workers=2"])
    hook = RecordKeys(str(tmp_path / "seen"))
    res = run_experiment(spec, run_name=f"stream-{uuid.uuid4().hex[:6]}", step_hooks=[hook])

    assert res.metrics["epoch"] == 2 and res.metrics["global_step"] == 2 * 4  # 32 files / 2 workers / 4 per batch
    assert 0.0 <= res.metrics["knn_top1"] <= 1.0 and res.metrics["bad_images"] == 0
    rows = hook.read()
    everything = sorted(str(f) for f in files)
    orders = []
    for epoch in (0, 1):
        per_rank = {r: [k for row in rows if row["epoch"] == epoch and row["rank"] == r for k in row["keys"]] for r in (0, 1)}
        assert len(per_rank[0]) == len(per_rank[1]) == 16
        assert not set(per_rank[0]) & set(per_rank[1])  # disjoint
        assert sorted(per_rank[0] + per_rank[1]) == everything  # together: the whole epoch
        orders.append(per_rank[0] + per_rank[1])
    assert orders[0] != orders[1]  # files are shuffled again every epoch


@pytest.mark.slow
def test_s3_image_folder_trains_and_resumes(ray_session, tiny_spec, tmp_path, s3_server):
    from ssl_platform.launch.run import run_experiment

    s3 = boto3.client("s3")
    for f in write_image_tree(tmp_path / "tree", num_classes=2, per_class=14, mean_size=(30, 40)):
        s3.put_object(Bucket=s3_server["bucket"], Key=f"data/{f.parent.name}/{f.name}", Body=f.read_bytes())
    root = f"s3://{s3_server['bucket']}/data"
    name = f"s3data-{uuid.uuid4().hex[:6]}"
    first = run_experiment(_folder_spec(tiny_spec, root, None, ["optim.epochs=1", "data.test_fraction=0.25"]), run_name=name)
    assert first.metrics["epoch"] == 1 and "knn_top1" in first.metrics
    second = run_experiment(_folder_spec(tiny_spec, root, None, ["optim.epochs=2", "data.test_fraction=0.25"]),
                            run_name=name, resume=True)
    assert second.mlflow_run_id == first.mlflow_run_id and second.metrics["epoch"] == 2
    assert second.metrics["global_step"] == 2 * first.metrics["global_step"]  # continued, not restarted
    steps = [m.step for m in mlflow.MlflowClient(first.tracking_uri).get_metric_history(first.mlflow_run_id, "loss")]
    assert sorted(steps) == [1, 2]  # epoch 1 was not trained (nor logged) twice


@pytest.mark.slow
def test_corrupt_files_are_skipped_counted_and_stop_the_run_past_the_limit(ray_session, tiny_spec, tmp_path):
    from ray.train import WorkerGroupError

    from ssl_platform.launch.run import run_experiment

    write_image_tree(tmp_path / "train", num_classes=2, per_class=12, mean_size=(30, 40))
    write_image_tree(tmp_path / "val", num_classes=2, per_class=3, mean_size=(30, 40), seed=1)
    broken = tmp_path / "train" / "class_001" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 this is not a jpeg")
    ok = run_experiment(_folder_spec(tiny_spec, str(tmp_path / "train"), str(tmp_path / "val"),
                                     ["optim.epochs=1", "data.max_bad_fraction=0.2"]), run_name=f"bad-{uuid.uuid4().hex[:6]}")
    assert ok.metrics["bad_images"] <= 1 and ok.metrics["epoch"] == 1  # skipped (or dropped with the last batch)
    history = mlflow.MlflowClient(ok.tracking_uri).get_metric_history(ok.mlflow_run_id, "bad_images")
    assert [m.value for m in history] == [ok.metrics["bad_images"]]
    with pytest.raises(WorkerGroupError, match=r"data.max_bad_fraction: .*broken.jpg"):
        run_experiment(_folder_spec(tiny_spec, str(tmp_path / "train"), str(tmp_path / "val"),
                                    ["optim.epochs=1", "data.max_bad_fraction=0.0", "data.batch_size=25"]),
                       run_name=f"bad-{uuid.uuid4().hex[:6]}")


def test_missing_s3_prefix_is_refused_before_ray(tiny_spec, tmp_path, s3_server):
    from ssl_platform.launch.run import run_experiment

    spec = _folder_spec(tiny_spec, f"s3://{s3_server['bucket']}/nothing-here", None)
    with pytest.raises(DataError, match=r"data.root: .*s3://ssl-test/nothing-here.*does not exist"):
        run_experiment(spec, run_name="never-starts")
    assert not Path(spec.checkpoint.uri).exists()


@pytest.mark.slow
def test_shards_prepared_by_the_cli_train_with_their_validation_split(ray_session, tiny_spec, tmp_path):
    import subprocess
    import sys

    from ssl_platform.launch.run import run_experiment
    from tests.conftest import ROOT

    write_image_tree(tmp_path / "train", num_classes=2, per_class=12, mean_size=(30, 40))
    write_image_tree(tmp_path / "val", num_classes=2, per_class=3, mean_size=(30, 40), seed=1)
    for split in ("train", "val"):
        proc = subprocess.run([sys.executable, "-m", "ssl_platform", "prepare-data", str(tmp_path / split),
                               str(tmp_path / f"{split}-shards"), "--shard-size", "8", "--no-progress"],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    spec = tiny_spec(["data.name=shards", f"data.root={tmp_path / 'train-shards'}", f"data.val_root={tmp_path / 'val-shards'}",
                      "data.batch_size=8", "data.image_size=16", "data.decode_size=24", "optim.epochs=1"])
    res = run_experiment(spec, run_name=f"shards-{uuid.uuid4().hex[:6]}")
    assert res.metrics["epoch"] == 1 and res.metrics["global_step"] == 24 // 8 and 0.0 <= res.metrics["knn_top1"] <= 1.0


def test_streamed_run_whose_workers_take_every_cpu_is_refused(ray_session, tiny_spec, tmp_path):
    import ray

    from ssl_platform.launch.run import run_experiment
    from ssl_platform.spec import SpecError

    write_image_tree(tmp_path / "tree", num_classes=2, per_class=10, mean_size=(20, 20))
    cpus = int(ray.cluster_resources()["CPU"])
    spec = _folder_spec(tiny_spec, str(tmp_path / "tree"), None, [f"scaling.cpus_per_worker={cpus}"])
    with pytest.raises(SpecError, match=rf"scaling.cpus_per_worker: expected at most .* decode tasks get a CPU .*got {cpus}"):
        run_experiment(spec, run_name="takes-every-cpu")
