"""Bad input is refused before Ray starts: a corpus of malformed specs, and corrupt or foreign checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from methods.checkpoint_io import CheckpointError, IncompleteCheckpointError, write_manifest
from ssl_platform.spec import SpecError, load_spec
from ssl_platform.storage.training_checkpoints import load_training_checkpoint, write_training_checkpoint
from tests.conftest import ROOT

BAD_DIR = ROOT / "tests" / "data" / "bad_specs"
EXPECTED: dict[str, str] = yaml.safe_load((BAD_DIR / "expected.yaml").read_text())


def test_corpus_is_complete():
    on_disk = {p.name for p in BAD_DIR.glob("*.yaml") if p.name != "expected.yaml"}
    assert on_disk == set(EXPECTED), "every bad spec needs an expected message fragment, and vice versa"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bad_spec_names_the_problem(name):
    with pytest.raises(SpecError) as info:
        load_spec(BAD_DIR / name)
    assert EXPECTED[name] in str(info.value)


def test_cli_run_exits_2_before_ray_starts(tmp_path):
    name = "unknown_nested_key.yaml"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": ""}
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from ssl_platform.cli import main; rc = main(sys.argv[1:]); "
         "print('ray initialized:', 'ray' in sys.modules and sys.modules['ray'].is_initialized()); sys.exit(rc)",
         "run", str(BAD_DIR / name)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert EXPECTED[name] in proc.stderr
    assert "ray initialized: False" in proc.stdout
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_cli_module_entry_point_exits_2(tmp_path):
    name = "salt_without_teacher.yaml"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "ssl_platform", "run", str(BAD_DIR / name)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert EXPECTED[name] in proc.stderr and "Traceback" not in proc.stderr
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr


# ---- corrupt / foreign checkpoints -----------------------------------------------------------------------
@pytest.fixture
def good_checkpoint(tiny_spec, tmp_path) -> Path:
    from ssl_platform.training.optim import build_optimizer, build_scheduler
    from ssl_platform.training.trainer import build_method_from_spec

    spec = tiny_spec()
    method = build_method_from_spec(spec.method)
    opt = build_optimizer(method, spec.optim, torch.device("cpu"))
    sched = build_scheduler(opt, spec.optim, 4)
    d = write_training_checkpoint(tmp_path / "ckpt_good", method=method, optimizer=opt, scheduler=sched, spec=spec,
                                  state={"epoch": 1, "global_step": 4})
    assert load_training_checkpoint(d)["state"]["epoch"] == 1
    return d


def test_checkpoint_without_manifest(good_checkpoint):
    (good_checkpoint / "manifest.json").unlink()
    with pytest.raises(IncompleteCheckpointError, match="no manifest.json"):
        load_training_checkpoint(good_checkpoint)


def test_checkpoint_changed_after_manifest(good_checkpoint):
    f = good_checkpoint / "model.pt"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different content
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"'model.pt' fails its SHA-256 checksum"):
        load_training_checkpoint(good_checkpoint)


def test_checkpoint_truncated_file(good_checkpoint):
    f = good_checkpoint / "optimizer.pt"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"'optimizer.pt' has 100 bytes, the manifest says"):
        load_training_checkpoint(good_checkpoint)


def test_random_bytes_with_matching_manifest(good_checkpoint):
    (good_checkpoint / "model.pt").write_bytes(os.urandom(4096))
    write_manifest(good_checkpoint)  # the manifest agrees with the garbage: the torch load must still fail clearly
    with pytest.raises(CheckpointError, match=r"unreadable torch file 'model.pt'"):
        load_training_checkpoint(good_checkpoint)


def test_foreign_torch_files(good_checkpoint):
    torch.save({"epoch": 3, "net": {"w": torch.zeros(2)}}, good_checkpoint / "optimizer.pt")
    write_manifest(good_checkpoint)
    with pytest.raises(CheckpointError, match=r"'optimizer.pt' expected keys \['optimizer', 'scheduler'\], got \['epoch', 'net'\]"):
        load_training_checkpoint(good_checkpoint)


def test_foreign_model_file(good_checkpoint):
    torch.save([torch.zeros(2)], good_checkpoint / "model.pt")
    write_manifest(good_checkpoint)
    with pytest.raises(CheckpointError, match=r"'model.pt' is not a state dict of tensors"):
        load_training_checkpoint(good_checkpoint)


def test_single_torch_file_instead_of_directory(tmp_path):
    f = tmp_path / "resnet50.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, f)
    with pytest.raises(CheckpointError, match="expected a training checkpoint directory"):
        load_training_checkpoint(f)


def test_bad_state_json(good_checkpoint):
    (good_checkpoint / "state.json").write_text(json.dumps({"step": 1}))
    write_manifest(good_checkpoint)
    with pytest.raises(CheckpointError, match="no epoch/global_step"):
        load_training_checkpoint(good_checkpoint)
