"""Methods declare the rules on their arguments and their checkpoint arguments; the platform applies them generically.

The spec's ``method.*`` errors come from the method class's declarations (``SSLMethod.constraints``,
``checkpoint_params``), not from names the platform knows: a method defined here, unknown to ``ssl_platform``,
gets the same checks, path resolution and pre-flight as SALT's teacher.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from methods import constraints as C
from methods.base import SSLMethod
from methods.checkpoint_io import (
    CheckpointMismatchError,
    IncompleteCheckpointError,
    check_encoder_config,
    load_encoder_file,
)
from methods.constraints import ConstraintError
from methods.mae import MAE
from methods.registry import available_methods, get_method_class
from ssl_platform.spec import SpecError, spec_from_dict
from ssl_platform.storage.method_checkpoints import preflight_method_checkpoints
from tests.conftest import TINY_VIT, tiny_spec_dict


def _method_spec(tmp_path: Path, method: dict) -> dict:
    raw = tiny_spec_dict(tmp_path)
    raw["method"] = method
    return raw


# (method section, key named in the error, the error's text after "spec error: ")
BAD_METHODS = [
    ({"name": "dino", "temperature_teacher": 0.0}, "method.temperature_teacher", "expected a number > 0, got 0.0"),
    ({"name": "dino", "center_momentum": 1.5}, "method.center_momentum", "expected a number in [0, 1], got 1.5"),
    ({"name": "dino", "n_prototypes": 0}, "method.n_prototypes", "expected an integer >= 1, got 0"),
    ({"name": "dino", "ema_decay_start": 0.99, "ema_decay_end": 0.9}, "method.ema_decay_end",
     "expected >= method.ema_decay_start (0.99), got 0.9"),
    ({"name": "ibot", "mask_ratio": 1.0}, "method.mask_ratio", "expected a number in (0, 1), got 1.0"),
    ({"name": "ibot", "n_patch_prototypes": 0}, "method.n_patch_prototypes", "expected an integer >= 1, got 0"),
    ({"name": "data2vec", "ema_decay_start": -0.1}, "method.ema_decay_start", "expected a number in [0, 1], got -0.1"),
    ({"name": "data2vec", "top_k_blocks": 0}, "method.top_k_blocks", "expected an integer >= 1, got 0"),
    ({"name": "apl", "dropout": 2.0}, "method.dropout", "expected a number in [0, 1], got 2.0"),
    ({"name": "apl", "patch_dropout": 1.0}, "method.patch_dropout", "expected a number in [0, 1), got 1.0"),
    ({"name": "apl", "method": "PUZZLE"}, "method.method", "expected one of ['PLT', 'PLT_MASKED'], got 'PUZZLE'"),
    ({"name": "mae", "mask_type": "grid"}, "method.mask_type", "expected one of ['random', 'multiblock'], got 'grid'"),
    ({"name": "salt", "teacher_state_dict": {}, "target_scale": [0.5, 0.2]}, "method.target_scale",
     "expected [min, max] with 0.0 <= min <= max <= 1.0, got [0.5, 0.2]"),
    ({"name": "salt", "teacher_state_dict": {}, "target_aspect_ratio": [0.001, 2.0]}, "method.target_aspect_ratio",
     "expected [min, max] with 0.01 <= min <= max <= 100.0, got [0.001, 2.0]"),
    ({"name": "salt", "teacher_state_dict": {}, "num_targets": 0}, "method.num_targets", "expected an integer >= 1, got 0"),
]


@pytest.mark.parametrize("method,key,text", BAD_METHODS, ids=[f"{m['name']}:{k}" for m, k, _ in BAD_METHODS])
def test_declared_constraints_reach_the_spec_with_key_expected_and_value(tmp_path, method, key, text):
    with pytest.raises(SpecError) as info:
        spec_from_dict(_method_spec(tmp_path, method))
    assert info.value.key == key
    assert str(info.value) == f"spec error: {key}: {text}"


def test_every_method_accepts_its_own_defaults():
    for name in available_methods():
        cls = get_method_class(name)
        kwargs = {"teacher_state_dict": {}} if "teacher" in cls.checkpoint_params else {}  # SALT needs a teacher
        cls.check_kwargs(kwargs)


def test_every_declared_constraint_names_a_constructor_argument():
    """A typo in a declaration would silently check nothing: each one must name arguments some method takes."""
    classes = [get_method_class(n) for n in available_methods()]
    owners = {klass for cls in classes for klass in cls.__mro__ if "constraints" in vars(klass)}
    for owner in owners:
        users = [cls for cls in classes if issubclass(cls, owner)]
        for constraint in vars(owner)["constraints"]:
            takers = [cls for cls in users if set(constraint.params) <= set(inspect.signature(cls.__init__).parameters)]
            assert takers, f"{owner.__name__}: {constraint} names no argument of {[c.__name__ for c in users]}"
    for cls in classes:
        for param in cls.checkpoint_params:
            assert param in inspect.signature(cls.__init__).parameters, (cls.__name__, param)


def test_constructors_use_the_same_declarations():
    with pytest.raises(ConstraintError, match=r"^mask_ratio: expected a number in \(0, 1\), got 1.5$") as info:
        MAE(mask_ratio=1.5, encoder_kwargs=dict(TINY_VIT), decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    assert isinstance(info.value, ValueError) and info.value.key == "mask_ratio"


def test_constraint_forms():
    with pytest.raises(ConstraintError, match=r"^m.x: expected an integer >= 1, got 1.5$"):
        C.positive_int("x").check({"x": 1.5}, "m.")
    with pytest.raises(ConstraintError, match=r"expected a number > 0, got True"):
        C.positive("t").check({"t": True})  # a boolean is not a number
    with pytest.raises(ConstraintError, match=r"expected a number in \(0, 1\), got None"):
        C.open_unit_interval("r").check({"r": None})
    C.positive_int("w", optional=True).check({"w": None})
    C.NotBelow("end", "start").check({"end": 0.5})  # one side missing: nothing to compare
    with pytest.raises(ConstraintError, match=r"^p.a: expected a checkpoint or p.b, got None$"):
        C.RequiresAny(("a", "b"), "a checkpoint or {prefix}b").check({"a": None, "b": ""}, "p.")
    C.RequiresAny(("a", "b"), "x").check({"a": None, "b": "/ckpt"})


def test_worded_and_cross_field_forms():
    """The forms the spec sections declare (ssl_platform.spec): wording options and rules across two keys."""
    with pytest.raises(ConstraintError, match=r"^s.p: expected a probability in \[0, 1\], got 1.5$"):
        C.InRange("p", 0.0, 1.0, kind="a probability").check({"p": 1.5}, "s.")
    with pytest.raises(ConstraintError, match=r"^n: expected an integer >= -1 \(-1: unlimited\), got -2$"):
        C.InRange("n", -1, integer=True, note="-1: unlimited").check({"n": -2})
    with pytest.raises(ConstraintError, match=r"^m: expected one of \['A'\] \(a mode\), got 'B'$"):
        C.OneOf("m", ("A",), note="a mode").check({"m": "B"})
    auto = C.NotBelow("d", "s", exempt=(0,), expected="0 (auto) or an integer >= {other} ({bound})")
    auto.check({"d": 0, "s": 32})
    with pytest.raises(ConstraintError, match=r"^x.d: expected 0 \(auto\) or an integer >= x.s \(32\), got 10$"):
        auto.check({"d": 10, "s": 32}, "x.")

    within = C.BoundedBy("w", "e", optional=True, note="or unset")
    within.check({"w": None, "e": 3})
    within.check({"w": 3.0, "e": 3})
    with pytest.raises(ConstraintError, match=r"^o.w: expected a number in \[0, o.e=3\] \(or unset\), got 4.0$"):
        within.check({"w": 4.0, "e": 3}, "o.")
    with pytest.raises(ConstraintError, match=r"expected a number in \[0, e=3\], got -1"):
        C.BoundedBy("w", "e").check({"w": -1, "e": 3})

    betas = C.ListOf("b", 2, C.InRange("beta", 0.0, 1.0, high_open=True), "[b1, b2] each in [0, 1)")
    betas.check({"b": [0.9, 0.95]})
    for bad in ([0.9], [0.9, 1.0], "ab", None, [0.9, True]):
        with pytest.raises(ConstraintError, match=r"^b: expected \[b1, b2\] each in \[0, 1\), got "):
            betas.check({"b": bad})

    for ok in ("/local", "rel/dir", "s3://bucket/p", None, ""):
        C.StorageUri("u").check({"u": ok})
    for bad in ("gs://bucket", "s3://", "http://x"):
        with pytest.raises(ConstraintError, match=r"^c.u: expected a local path or s3://bucket/prefix, got "):
            C.StorageUri("u").check({"u": bad}, "c.")
    for bad in ("", None):
        with pytest.raises(ConstraintError, match="a local path or s3://bucket/prefix"):
            C.StorageUri("u", required=True).check({"u": bad})

    root = C.RequiredWhen("root", "name", ("shards",), "a directory for {other}={value}")
    root.check({"root": None, "name": "digits"})
    root.check({"root": "/r", "name": "shards"})
    with pytest.raises(ConstraintError, match=r"^d.root: expected a directory for d.name=shards, got ''$"):
        root.check({"root": "", "name": "shards"}, "d.")
    val = C.UnsetUnless("val", "name", ("shards",))
    val.check({"val": None, "name": "digits"})
    val.check({"val": "/v", "name": "shards"})
    with pytest.raises(ConstraintError, match=r"^d.val: expected unset unless d.name is one of \['shards'\], got '/v'$"):
        val.check({"val": "/v", "name": "digits"}, "d.")


# ---- a method the platform has never heard of ------------------------------------------------------------
class _WarmStart(SSLMethod):
    """A test method with a declared range and an encoder-checkpoint argument (``init_from``)."""

    constraints = (C.InRange("blend", 0.0, 1.0), C.RequiresAny(("init_from",), "an encoder checkpoint to start from"))
    checkpoint_params = ("init_from",)

    def __init__(self, encoder_name: str = "vit_tiny_patch16_224", encoder_kwargs: dict | None = None,
                 blend: float = 0.5, init_from: str | None = None):
        super().__init__()

    @classmethod
    def check_checkpoint(cls, param, path, kwargs, label):
        check_encoder_config(load_encoder_file(path), kwargs["encoder_name"], kwargs["encoder_kwargs"], label)


@pytest.fixture
def warm_start_method():
    return "tests.test_constraints:_WarmStart"  # a plug-in path: methods/registry.py imports it


def _encoder_checkpoint(path: Path, embed_dim: int = TINY_VIT["embed_dim"]) -> Path:
    from methods.checkpoint_io import save_encoder

    mae = MAE(encoder_kwargs={**TINY_VIT, "embed_dim": embed_dim}, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    save_encoder(path, "mae", mae.encoder_config(), mae.encoder_state_dict())
    return path


def test_an_unknown_method_gets_checks_paths_and_preflight_from_its_declarations(tmp_path, warm_start_method):
    base = {"name": warm_start_method, "encoder_kwargs": dict(TINY_VIT)}
    with pytest.raises(SpecError, match=r"^spec error: method.blend: expected a number in \[0, 1\], got 3.0$"):
        spec_from_dict(_method_spec(tmp_path, {**base, "blend": 3.0, "init_from": "x"}))
    with pytest.raises(SpecError, match=r"^spec error: method.init_from: expected an encoder checkpoint to start from, got None$"):
        spec_from_dict(_method_spec(tmp_path, base))

    _encoder_checkpoint(tmp_path / "ck" / "good")
    _encoder_checkpoint(tmp_path / "ck" / "wide", embed_dim=48)
    spec = spec_from_dict(_method_spec(tmp_path, {**base, "init_from": "ck/good"}), base_dir=str(tmp_path))
    assert spec.method.init_from == str(tmp_path / "ck" / "good")  # made absolute for the Ray workers
    preflight_method_checkpoints(spec.method, spec.checkpoint)

    def preflight_for(path: str) -> None:
        s = spec_from_dict(_method_spec(tmp_path, {**base, "init_from": path}), base_dir=str(tmp_path))
        preflight_method_checkpoints(s.method, s.checkpoint)

    with pytest.raises(SpecError, match=r"method.init_from: expected an existing checkpoint directory"):
        preflight_for("ck/missing")
    with pytest.raises(CheckpointMismatchError, match=r"^method.init_from '.*wide'.*embed_dim: checkpoint 48 vs requested 32"):
        preflight_for("ck/wide")
    (tmp_path / "ck" / "good" / "manifest.json").unlink()
    with pytest.raises(IncompleteCheckpointError, match="no manifest.json"):
        preflight_for("ck/good")
