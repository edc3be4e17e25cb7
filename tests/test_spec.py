"""Spec validation: each bad spec gives a specific error (key, expected form, value seen)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import yaml

from ssl_platform import spec as spec_module
from ssl_platform.spec import SpecError, load_spec, spec_from_dict
from tests.conftest import ROOT, tiny_spec_dict

BAD = [
    # (path into the spec dict, value, key named in the error, text expected in the error)
    (("method", "mask_ratio"), 1.5, "method.mask_ratio", "(0, 1)"),
    (("method", "mask_ratio"), 0.0, "method.mask_ratio", "(0, 1)"),
    (("method", "mask_ratio"), "high", "method.mask_ratio", "float"),
    (("data", "batch_size"), 0, "data.batch_size", ">= 1"),
    (("data", "batch_size"), "big", "data.batch_size", "big"),
    (("optim", "epochs"), 0, "optim.epochs", ">= 1"),
    (("optim", "lr"), -1.0, "optim.lr", "> 0"),
    (("method", "name"), "swav", "method.name", "one of"),
    (("method", "encoder_name"), "vit_nonexistent_model", "method.encoder_name", "timm backbone"),
    (("method", "masking_ratio"), 0.5, "method.masking_ratio", "constructor argument"),
    (("data", "name"), "imagenet21k", "data.name", "one of"),
    (("data", "colour"), "red", "data.colour", "known key"),
    (("scaling", "num_workers"), 0, "scaling.num_workers", ">= 1"),
    (("scaling", "precision"), "fp8", "scaling.precision", "bf16"),
    (("scaling", "placement_strategy"), "EVERYWHERE", "scaling.placement_strategy", "STRICT_SPREAD"),
    (("checkpoint", "uri"), "gs://bucket/x", "checkpoint.uri", "s3://"),
    (("checkpoint", "keep"), 0, "checkpoint.keep", ">= 1"),
    (("optim", "warmup_epochs"), 5, "optim.warmup_epochs", "optim.epochs=2"),
    (("eval", "knn", "k"), 0, "eval.knn.k", ">= 1"),
    (("method", "decoder_depth"), 0, "method.decoder_depth", ">= 1"),
]


def _set(d: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        d = d.setdefault(key, {})
    d[path[-1]] = value


@pytest.mark.parametrize("path,value,key,text", BAD, ids=[".".join(b[0]) + "=" + str(b[1]) for b in BAD])
def test_bad_spec_is_rejected_with_key_and_value(tmp_path, path, value, key, text):
    raw = tiny_spec_dict(tmp_path)
    _set(raw, path, value)
    with pytest.raises(SpecError) as info:
        spec_from_dict(raw)
    msg = str(info.value)
    assert info.value.key == key, msg
    assert key in msg and text in msg, msg
    seen = msg.split(", got ", 1)[1]
    assert str(value) in seen or path[-1] in seen, msg  # the value seen (or, for an unknown key, the key)


def test_missing_name_and_yaml_syntax_error(tmp_path):
    raw = tiny_spec_dict(tmp_path)
    del raw["name"]
    with pytest.raises(SpecError, match="name"):
        spec_from_dict(raw)
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmethod: {name: mae\n")
    with pytest.raises(SpecError, match=r"valid YAML \(line"):
        load_spec(bad)


def test_overrides_apply_and_are_validated(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(tiny_spec_dict(tmp_path)))
    spec = load_spec(path, ["method.mask_ratio=0.5", "optim.epochs=3", "data.batch_size=8"])
    assert spec.method.mask_ratio == 0.5 and spec.optim.epochs == 3 and spec.data.batch_size == 8
    with pytest.raises(SpecError, match="method.mask_ratio"):
        load_spec(path, ["method.mask_ratio=2"])
    with pytest.raises(SpecError, match="override"):
        load_spec(path, ["method.mask_ratio"])


def test_relative_paths_are_resolved(tmp_path):
    raw = tiny_spec_dict(tmp_path)
    raw["checkpoint"]["uri"] = "./ck"
    raw["tracking"]["uri"] = "sqlite:///m.db"
    spec = spec_from_dict(raw, base_dir=str(tmp_path))
    assert spec.checkpoint.uri == str(tmp_path / "ck")
    assert spec.tracking.uri == f"sqlite:///{tmp_path / 'm.db'}"


def test_relative_salt_teacher_path_is_resolved_for_the_workers(tmp_path):
    """Ray workers do not run in the submitting directory: a local teacher path becomes absolute, s3:// stays."""
    raw = tiny_spec_dict(tmp_path)
    raw["method"] = {"name": "salt", "encoder_name": "vit_tiny_patch16_224", "teacher": "./ck/stage1/checkpoint_1"}
    spec = spec_from_dict(raw, base_dir=str(tmp_path))
    assert spec.method.teacher == str(tmp_path / "ck" / "stage1" / "checkpoint_1")
    raw["method"]["teacher"] = "s3://bucket/stage1/checkpoint_1"
    assert spec_from_dict(raw, base_dir=str(tmp_path)).method.teacher == "s3://bucket/stage1/checkpoint_1"


def test_all_bundled_experiment_specs_are_valid():
    specs = sorted((ROOT / "experiments").glob("*.yaml"))
    assert specs, "no experiment specs"
    for path in specs:
        load_spec(path)


def test_every_section_rule_names_keys_of_its_section():
    """A typo in a section's ``constraints`` would check nothing (an unset value passes most rules): each rule must
    name keys of its own section, and every section that declares rules is one that validate checks."""
    checked = {schema for _, schema in spec_module.CHECKED_SECTIONS}
    declaring = {obj for obj in vars(spec_module).values()
                 if dataclasses.is_dataclass(obj) and isinstance(obj, type) and "constraints" in vars(obj)}
    assert declaring == checked
    for path, schema in spec_module.CHECKED_SECTIONS:
        keys = {f.name for f in dataclasses.fields(schema)}
        for rule in schema.constraints:
            assert set(rule.params) <= keys, f"{path}: {rule} names a key {schema.__name__} does not have"


def test_cli_rejects_bad_spec_before_ray_starts(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(tiny_spec_dict(tmp_path)))
    proc = subprocess.run(
        [sys.executable, "-m", "ssl_platform", "run", str(path), "data.batch_size=0"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert proc.returncode == 2
    assert "data.batch_size" in proc.stderr and "got 0" in proc.stderr
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr
