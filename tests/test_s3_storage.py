"""S3 checkpoint helpers and chain-spec checks against a real moto S3 server on 127.0.0.1 (no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import boto3
import pytest
import torch
import yaml

from methods.checkpoint_io import (
    CheckpointError,
    CheckpointMismatchError,
    IncompleteCheckpointError,
    save_encoder,
)
from methods.mae import MAE
from ssl_platform.launch.chain import load_chain
from ssl_platform.spec import SpecError, spec_from_dict
from ssl_platform.storage.checkpoint_cache import download_checkpoint
from ssl_platform.storage.method_checkpoints import preflight_method_checkpoints
from ssl_platform.storage.run_checkpoints import (
    latest_complete_checkpoint_uri,
    list_checkpoint_uris,
    prune_checkpoints_beyond_keep,
)
from ssl_platform.storage.uri_files import read_text, write_text
from tests.conftest import ROOT, TINY_VIT, tiny_spec_dict

SALT_TINY = {"name": "salt", "encoder_name": "vit_tiny_patch16_224", "encoder_kwargs": dict(TINY_VIT),
             "predictor_embed_dim": 16, "predictor_depth": 1, "predictor_num_heads": 2, "num_targets": 2}


def salt_spec_dict(tmp_path: Path, **method) -> dict:
    """The tiny spec with its MAE section replaced by a tiny SALT stage 2."""
    d = tiny_spec_dict(tmp_path)
    d["method"] = {**SALT_TINY, **method}
    return d


def _encoder_checkpoint(path: Path, encoder_kwargs: dict | None = None) -> tuple[Path, dict]:
    mae = MAE(encoder_kwargs=encoder_kwargs or dict(TINY_VIT), decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    (path / "state.json").parent.mkdir(parents=True, exist_ok=True)
    (path / "state.json").write_text(json.dumps({"epoch": 1}))
    save_encoder(path, "mae", mae.encoder_config(), mae.encoder_state_dict())  # manifest written last
    return path, mae.encoder_state_dict()


def _upload(local: Path, bucket: str, prefix: str, skip: tuple[str, ...] = ()) -> None:
    s3 = boto3.client("s3")
    for f in sorted(local.rglob("*")):
        if f.is_file() and f.name not in skip:
            s3.upload_file(str(f), bucket, f"{prefix}/{f.relative_to(local).as_posix()}")


def test_download_verifies_and_finds_latest_complete(s3_server, tmp_path):
    bucket = s3_server["bucket"]
    local, state = _encoder_checkpoint(tmp_path / "src")
    run = f"s3://{bucket}/runs/r1"
    _upload(local, bucket, "runs/r1/checkpoint_000001")
    _upload(local, bucket, "runs/r1/checkpoint_000002", skip=("manifest.json",))  # upload interrupted
    assert list_checkpoint_uris(run) == [f"{run}/checkpoint_000001", f"{run}/checkpoint_000002"]
    assert latest_complete_checkpoint_uri(run) == f"{run}/checkpoint_000001"

    got = download_checkpoint(f"{run}/checkpoint_000001", tmp_path / "cache")
    payload = torch.load(got / "encoder.pt", weights_only=True)
    assert all(torch.equal(payload["state_dict"][k], v) for k, v in state.items())
    assert download_checkpoint(f"{run}/checkpoint_000001", tmp_path / "cache") == got  # cached, re-verified

    with pytest.raises(IncompleteCheckpointError, match="no manifest.json"):
        download_checkpoint(f"{run}/checkpoint_000002", tmp_path / "cache")


@pytest.mark.parametrize("where", ["s3", "local"])
def test_a_finished_run_keeps_its_newest_complete_checkpoints_and_those_ray_tracks(s3_server, tmp_path, where):
    """A worker group restarted after a node loss tracks only its own checkpoints: what came before the loss, and
    what the lost group wrote (complete or not) but never reported, is deleted down to ``keep``."""
    import shutil

    local, _ = _encoder_checkpoint(tmp_path / "src")
    names = ["checkpoint_2026-01-01_10-00-00.000001",  # epoch 1, before the loss
             "checkpoint_2026-01-01_10-00-05.000001",  # epoch 2, written by the lost group, never registered
             "checkpoint_2026-01-01_10-00-06.000001",  # epoch 3, half written by the lost group (no manifest)
             "checkpoint_2026-01-01_10-00-09.000001",  # epoch 2 again, after the restart
             "checkpoint_2026-01-01_10-00-12.000001",  # epoch 3 again (no manifest: an interrupted last upload)
             "checkpoint_2026-01-01_10-00-15.000001"]  # epoch 4, the last
    incomplete = {names[2], names[4]}
    if where == "s3":
        run = f"s3://{s3_server['bucket']}/runs/r2"
        for n in names:
            _upload(local, s3_server["bucket"], f"runs/r2/{n}", skip=("manifest.json",) if n in incomplete else ())
    else:
        run = str(tmp_path / "run")
        for n in names:
            shutil.copytree(local, tmp_path / "run" / n)
            if n in incomplete:
                (tmp_path / "run" / n / "manifest.json").unlink()

    removed = prune_checkpoints_beyond_keep(run, 2, tracked=[f"{run}/{names[5]}"])
    assert removed == [f"{run}/{n}" for n in names[:5] if n != names[3]]
    assert list_checkpoint_uris(run) == [f"{run}/{names[3]}", f"{run}/{names[5]}"]
    assert prune_checkpoints_beyond_keep(run, 2) == []  # nothing more to do
    # a checkpoint Ray tracks stays, even beyond keep; so does a complete one within keep
    assert prune_checkpoints_beyond_keep(run, 1, tracked=[names[3]]) == []
    assert prune_checkpoints_beyond_keep(run, 1) == [f"{run}/{names[3]}"]
    assert latest_complete_checkpoint_uri(run) == f"{run}/{names[5]}"
    # Ray still tracks a checkpoint from before a node loss and the last one; the lost group's complete but
    # unreported checkpoint between them goes (Ray refuses to restore a run whose tracked checkpoints are gone)
    if where == "local":
        for n in (names[0], names[1], names[3]):
            shutil.copytree(local, tmp_path / "run" / n)
        removed = prune_checkpoints_beyond_keep(run, 2, tracked=[names[0], names[5]])
        assert removed == [f"{run}/{names[1]}", f"{run}/{names[3]}"]
        assert list_checkpoint_uris(run) == [f"{run}/{names[0]}", f"{run}/{names[5]}"]


def test_corrupt_upload_is_refused(s3_server, tmp_path):
    bucket = s3_server["bucket"]
    local, _ = _encoder_checkpoint(tmp_path / "src")
    data = bytearray((local / "state.json").read_bytes())
    data[1:2] = b"X"  # same size, different content
    (local / "state.json").write_bytes(bytes(data))
    _upload(local, bucket, "runs/bad/checkpoint_000001")
    with pytest.raises(CheckpointError, match="'state.json' fails its SHA-256 checksum"):
        download_checkpoint(f"s3://{bucket}/runs/bad/checkpoint_000001", tmp_path / "cache")
    assert not any((tmp_path / "cache").iterdir())  # nothing half-verified left in the cache


def test_text_round_trip_on_s3_and_local(s3_server, tmp_path):
    uri = f"s3://{s3_server['bucket']}/chains/c/chain_state.json"
    assert read_text(uri) is None
    write_text(uri, '{"a": 1}')
    assert json.loads(read_text(uri)) == {"a": 1}
    write_text(str(tmp_path / "x" / "s.json"), "hi")
    assert read_text(str(tmp_path / "x" / "s.json")) == "hi"


def test_teacher_preflight_refuses_missing_incomplete_and_other_architecture(tmp_path):
    good, _ = _encoder_checkpoint(tmp_path / "teacher")
    other, _ = _encoder_checkpoint(tmp_path / "other", {**TINY_VIT, "embed_dim": 48})

    def preflight(teacher: str) -> None:
        spec = spec_from_dict(salt_spec_dict(tmp_path, teacher=teacher))
        preflight_method_checkpoints(spec.method, spec.checkpoint)

    preflight(str(good))
    with pytest.raises(SpecError, match="method.teacher: expected an existing checkpoint"):
        preflight(str(tmp_path / "nope"))
    with pytest.raises(CheckpointMismatchError, match="embed_dim: checkpoint 48 vs requested 32"):
        preflight(str(other))
    (good / "manifest.json").unlink()
    with pytest.raises(IncompleteCheckpointError, match="no manifest.json"):
        preflight(str(good))


def test_s3_teacher_is_checked_before_ray_and_downloaded_verified_for_the_workers(s3_server, tmp_path, monkeypatch):
    """The teacher given as s3://: pre-flight downloads and checks it; the workers get a verified local copy."""
    from ssl_platform.storage.method_checkpoints import localize_method_checkpoints

    monkeypatch.setenv("SSL_PLATFORM_CACHE", str(tmp_path / "cache"))
    bucket = s3_server["bucket"]
    local, state = _encoder_checkpoint(tmp_path / "teacher")
    _upload(local, bucket, "stage1/checkpoint_1")
    _upload(local, bucket, "stage1/checkpoint_2", skip=("manifest.json",))
    spec = spec_from_dict(salt_spec_dict(tmp_path, teacher=f"s3://{bucket}/stage1/checkpoint_1"))
    preflight_method_checkpoints(spec.method, spec.checkpoint)
    localized = localize_method_checkpoints(spec.method, spec.checkpoint)
    assert spec.method.teacher == f"s3://{bucket}/stage1/checkpoint_1"  # the spec itself is left as it is
    payload = torch.load(Path(localized.teacher) / "encoder.pt", weights_only=True)
    assert all(torch.equal(payload["state_dict"][k], v) for k, v in state.items())
    with pytest.raises(IncompleteCheckpointError, match="no manifest.json"):
        incomplete = spec_from_dict(salt_spec_dict(tmp_path, teacher=f"s3://{bucket}/stage1/checkpoint_2"))
        preflight_method_checkpoints(incomplete.method, incomplete.checkpoint)


def test_salt_without_teacher_is_refused_by_validation(tmp_path):
    with pytest.raises(SpecError, match="method.teacher: expected a stage-1 checkpoint"):
        spec_from_dict(salt_spec_dict(tmp_path))


def _write_chain(tmp_path: Path, stages: dict, name: str = "c") -> Path:
    path = tmp_path / "chain.yaml"
    path.write_text(yaml.safe_dump({"name": name, "checkpoint": {"uri": str(tmp_path / "ck")}, "stages": stages}))
    return path


def test_chain_references_are_checked_before_anything_runs(tmp_path):
    stage1 = tiny_spec_dict(tmp_path)
    stage2 = salt_spec_dict(tmp_path, teacher="${stages.stage0.encoder}")
    with pytest.raises(SpecError, match=r"stages.stage2.method.teacher: expected a reference to an earlier stage \(one of \['stage1'\]\)"):
        load_chain(_write_chain(tmp_path, {"stage1": stage1, "stage2": stage2}))
    stage2["method"]["teacher"] = "${stages.stage2.encoder}"  # itself: not earlier
    with pytest.raises(SpecError, match="earlier stage"):
        load_chain(_write_chain(tmp_path, {"stage1": stage1, "stage2": stage2}))
    stage2["method"]["teacher"] = "${stages.stage1.encoder}"
    chain = load_chain(_write_chain(tmp_path, {"stage1": stage1, "stage2": stage2}))
    assert [s.name for s in chain.stages] == ["stage1", "stage2"]
    assert chain.state_uri == str(tmp_path / "ck" / "c" / "chain_state.json")
    del stage2["method"]["teacher"]
    with pytest.raises(SpecError, match="method.teacher"):
        load_chain(_write_chain(tmp_path, {"stage1": stage1, "stage2": stage2}))


def test_bundled_chain_spec_is_valid():
    chain = load_chain(ROOT / "experiments" / "chains" / "salt_digits.yaml")
    assert [s.name for s in chain.stages] == ["stage1", "stage2"]
    assert chain.stages[1].refs == [("method.teacher", "stage1", "encoder")]


def test_cli_chain_refuses_unknown_stage_before_ray_starts(tmp_path, capsys):
    from ssl_platform.cli import main

    stage2 = salt_spec_dict(tmp_path, teacher="${stages.stage9.encoder}")
    path = _write_chain(tmp_path, {"stage1": tiny_spec_dict(tmp_path), "stage2": stage2})
    assert main(["chain", str(path)]) == 2
    assert "stages.stage2.method.teacher: expected a reference to an earlier stage" in capsys.readouterr().err
    assert not (tmp_path / "ck").exists()  # nothing ran: no chain state, no checkpoints
