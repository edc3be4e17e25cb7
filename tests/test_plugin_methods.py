"""Methods from a user's own package (``method.name: package.module:Class``) and the refusals of bad plug-in paths;
the two-step smoke run of every built-in method through the platform."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from methods.checkpoint_io import load_encoder_file
from methods.registry import BUILTIN_METHODS, MethodNotFound, get_method_class
from ssl_platform.cli import main
from ssl_platform.spec import SpecError, load_spec, spec_from_dict
from ssl_platform.tracking.model_registry import rebuild_encoder
from tests.conftest import ROOT, TINY_VIT, tiny_spec_dict

PLUGIN = "examples.custom_method.simsiam:SimSiam"
EXAMPLE_SPEC = ROOT / "examples" / "custom_method" / "simsiam_digits.yaml"


def _with_method(raw: dict, method: dict) -> dict:
    """``raw`` with its method section replaced (tiny_spec_dict merges sections: MAE's keys would stay)."""
    return {**raw, "method": method}


def _plugin_spec(tmp_path: Path, **method) -> dict:
    return _with_method(tiny_spec_dict(tmp_path), {"name": PLUGIN, "encoder_name": "vit_tiny_patch16_224",
                                                   "encoder_kwargs": dict(TINY_VIT), "proj_dim": 32, "pred_dim": 16,
                                                   **method})


def test_example_spec_validates_and_the_class_is_found_by_its_path():
    spec = load_spec(EXAMPLE_SPEC)
    cls = get_method_class(spec.method.name)
    assert cls.__name__ == "SimSiam" and cls.method_name == PLUGIN  # recorded in checkpoints, resolvable again
    assert set(cls.training_views(spec.data)) == {"view1", "view2"}
    assert len((ROOT / "examples" / "custom_method" / "simsiam.py").read_text().splitlines()) <= 70


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    """A user's package on the path: one good module, one whose import raises, one with a non-method class."""
    pkg = tmp_path / "userpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "broken.py").write_text("import not_a_real_dependency_xyz\n")
    (pkg / "raises.py").write_text("raise RuntimeError('plug-in module failed at import')\n")
    (pkg / "plain.py").write_text("class NotAMethod:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return pkg


@pytest.mark.parametrize("name, fragment", [
    ("userpkg.missing_module:X", "no module 'userpkg.missing_module' on the Python path"),
    ("nopkg_xyz.mod:X", "no module 'nopkg_xyz.mod' on the Python path"),
    ("userpkg.plain:Missing", "module 'userpkg.plain' has no 'Missing'"),
    ("userpkg.plain:NotAMethod", "not a subclass of methods.base.SSLMethod"),
    ("userpkg.broken:X", "ModuleNotFoundError: No module named 'not_a_real_dependency_xyz'"),
    ("userpkg.raises:X", "RuntimeError: plug-in module failed at import"),
    ("userpkg.plain", "or a plug-in path 'package.module:ClassName', got 'userpkg.plain'"),
    ("userpkg.plain:Not A Class", "or a plug-in path 'package.module:ClassName'"),
])
def test_bad_plugin_paths_are_refused_naming_the_key(tmp_path, plugin_dir, name, fragment):
    with pytest.raises(SpecError) as err:
        spec_from_dict(tiny_spec_dict(tmp_path, method={"name": name}))
    assert "method.name" in str(err.value) and fragment in str(err.value), str(err.value)


def test_plugin_constraints_and_arguments_are_checked_before_ray(tmp_path):
    with pytest.raises(SpecError, match=r"method\.proj_dim: expected an integer >= 1"):
        spec_from_dict(_plugin_spec(tmp_path, proj_dim=0))
    with pytest.raises(SpecError, match=r"method\.projector_dims: expected a constructor argument of SimSiam"):
        spec_from_dict(_plugin_spec(tmp_path, projector_dims=[8]))
    with pytest.raises(MethodNotFound, match="unknown method 'swav'"):
        get_method_class("swav")


def test_unsupported_backbone_is_refused_before_ray(tmp_path):
    with pytest.raises(SpecError, match=r"method\.encoder_name: expected a timm backbone of a family MAE supports "
                                        r"\(vit\), not a resnet, got 'resnet18'"):
        spec_from_dict(tiny_spec_dict(tmp_path, method={"name": "mae", "encoder_name": "resnet18"}))
    with pytest.raises(SpecError, match=r"method\.encoder_name: expected a timm backbone"):
        spec_from_dict(_plugin_spec(tmp_path, encoder_name="convnext_tiny"))


@pytest.mark.slow
def test_plugin_runs_through_the_cli_and_its_encoder_is_served(ray_session, tmp_path, capsys):
    """``ssl_platform run`` on a spec naming the plug-in: trains, evaluates, checkpoints; the exported encoder
    records the plug-in path and is rebuilt through it (what the model registry serves)."""
    path = tmp_path / "plugin.yaml"
    path.write_text(yaml.safe_dump(_plugin_spec(tmp_path)))
    assert main(["run", str(path), "--name", "plugin-run"]) == 0
    assert "kNN top-1 (trained encoder)" in capsys.readouterr().out
    payload = load_encoder_file(next((tmp_path / "ckpt" / "plugin-run").rglob("encoder.pt")))
    assert payload["method"] == PLUGIN
    model, example = rebuild_encoder(payload)
    assert model(example).shape == (2, TINY_VIT["embed_dim"])


def _smoke_method(name: str) -> dict:
    """A two-step configuration of built-in ``name``: tiny backbone and heads at 16 px."""
    tiny = {"encoder_name": "vit_tiny_patch16_224", "encoder_kwargs": dict(TINY_VIT)}
    heads = {
        "simclr": {"projector_dims": [32, 16]},
        "byol": {"projector_dims": [32, 16], "predictor_dims": [32, 16]},
        "mocov3": {"projector_dims": [32, 16], "predictor_hidden_dim": 32},
        "vicreg": {"projector_dims": [32, 32]},
        "barlow_twins": {"projector_dims": [32, 32]},
        "ijepa": {"predictor_embed_dim": 32, "predictor_depth": 1, "predictor_num_heads": 2, "min_keep": 1},
        "dinov2": {"projector_hidden_dim": 32, "projector_bottleneck_dim": 16, "n_cls_prototypes": 64,
                   "n_patch_prototypes": 32, "image_size": 16, "warmup_epochs_temperature_teacher": 0},
    }
    return {"name": name, **tiny, **heads.get(name, {})}


NEW_METHODS = ("simclr", "byol", "mocov3", "vicreg", "barlow_twins", "ijepa", "dinov2")


@pytest.mark.parametrize("name", [m for m in NEW_METHODS if m in BUILTIN_METHODS])
def test_new_method_two_steps_through_the_platform(tmp_path, name):
    """Spec validation, the declared views, the worker loop's epoch (train steps, hooks, health readings) and its kNN
    evaluation, in one process (:func:`local_worker`: the Train worker's own steps without Ray; the Ray path is
    method-agnostic and runs in the plug-in CLI test above and the platform tests)."""
    from ssl_platform.training.trainer import evaluate, local_worker, train_one_epoch

    raw = tiny_spec_dict(tmp_path, data={"name": "synthetic", "num_samples": 40, "image_size": 16, "batch_size": 16,
                                         "multicrop": {"n_local": 2, "local_size": 8}},
                         optim={"lr": 1e-3, "warmup_epochs": 0, "epochs": 1})
    spec = spec_from_dict(_with_method(raw, _smoke_method(name)))
    threads = torch.get_num_threads()
    try:
        worker, data, training = local_worker(spec)
        training.watch = None
        before = [p.detach().clone() for p in training.method.parameters() if p.requires_grad]
        metrics = train_one_epoch(worker, data, training, 0)
        scores = evaluate(worker, data, training.method, final=True, epoch=1)
    finally:
        torch.set_num_threads(threads)
    assert metrics["global_step"] == 2 and torch.isfinite(torch.tensor(metrics["loss"]))
    after = [p for p in training.method.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(after, before)), "two steps changed no weight"
    assert 0.0 <= scores["knn_top1"] <= 1.0
