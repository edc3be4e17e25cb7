"""Experiment spec: a structured OmegaConf schema, loading with dotlist overrides, and validation.

Everything is checked here, before Ray starts: unknown keys, wrong types, out-of-range values, unknown
methods and unknown timm models. ``method.*`` is checked against the method class: names and types against its
constructor's signature, values against the constraints it declares (``SSLMethod.constraints``,
:mod:`methods.constraints`). Errors are :class:`SpecError` naming the key, the expected form and the value seen.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class SpecError(ValueError):
    """A spec value is wrong: ``key``, what was ``expected`` and the value ``seen``."""

    def __init__(self, key: str, expected: str, seen: Any, source: str | None = None):
        self.key, self.expected, self.seen = key, expected, seen
        where = f" in {source}" if source else ""
        super().__init__(f"spec error{where}: {key}: expected {expected}, got {seen!r}")


# ---- schema --------------------------------------------------------------------------------------------
@dataclass
class AugmentSpec:
    crop_scale: list[float] = field(default_factory=lambda: [0.6, 1.0])
    hflip: bool = False


@dataclass
class MultiCropSpec:
    n_global: int = 2
    n_local: int = 4
    global_scale: list[float] = field(default_factory=lambda: [0.4, 1.0])
    local_scale: list[float] = field(default_factory=lambda: [0.1, 0.4])
    local_size: int = 16
    hflip_p: float = 0.5  # DINO's flip / colour-jitter / solarisation probabilities
    color_jitter_p: float = 0.8
    solarize_p: float = 0.2


@dataclass
class DataSpec:
    name: str = "digits"  # digits | synthetic | image_folder | shards | cifar10
    root: Optional[str] = None  # image_folder / shards: the training images, a local directory or s3://bucket/prefix
    val_root: Optional[str] = None  # the validation split in the same format (e.g. ImageNet's val/); else test_fraction
    image_size: int = 32
    batch_size: int = 128
    num_workers: int = 0  # streamed sources: concurrent Ray Data decode tasks (0: Ray Data decides)
    test_fraction: float = 0.2
    decode_size: int = 0  # streamed sources: the CPU fits each image into a decode_size^2 canvas (0: 4/3 image_size)
    prefetch_batches: int = 2  # streamed sources: batches decoded ahead of the step, per worker
    shuffle_buffer: int = 1000  # shards only: rows in each worker's local shuffle buffer (files shuffle every epoch)
    max_bad_fraction: float = 0.01  # undecodable files are skipped and counted; above this share the run stops
    num_samples: int = 512  # synthetic only
    num_classes: int = 10  # synthetic only
    augment: AugmentSpec = field(default_factory=AugmentSpec)
    multicrop: MultiCropSpec = field(default_factory=MultiCropSpec)


@dataclass
class OptimSpec:
    name: str = "adamw"
    lr: float = 1.0e-3
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup_epochs: float = 1.0
    epochs: int = 10
    min_lr_ratio: float = 0.01
    clip_grad: float = 3.0
    max_nonfinite_skips: int = 0  # steps with non-finite gradients skipped (checked every log interval) before the run stops
    clip_mode: str = "global"  # global (one norm over all gradients) | per_param (DINO/iBOT: each parameter's norm)
    weight_decay_end: Optional[float] = None  # cosine weight decay from weight_decay to this (DINO/iBOT 0.04 -> 0.4)
    lr_scaling: str = "none"  # none | linear (lr = optim.lr * global batch / 256, as DINO, iBOT, MAE)
    min_lr: Optional[float] = None  # absolute final lr of the cosine (DINO 1e-6); unset: min_lr_ratio * lr


@dataclass
class ScalingSpec:
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    precision: str = "bf16"  # bf16 (autocast on CUDA only) | fp32
    max_failures: int = 0
    compile: bool = False
    # Ray placement of the workers: PACK (fill a node first), SPREAD (over nodes when possible),
    # STRICT_SPREAD (one worker per node, or wait for enough nodes)
    placement_strategy: str = "PACK"


@dataclass
class CheckpointSpec:
    uri: str = "./checkpoints"
    every_epochs: int = 1
    keep: int = 2
    endpoint_url: Optional[str] = None  # S3-compatible endpoint (never secrets in a spec)
    upload_attempts: int = 5  # tries per checkpoint file before the run stops (storage unreachable / errors)
    upload_backoff_s: float = 1.0  # wait before the 2nd try, doubled after each failed try (at most 30 s)


@dataclass
class TrackingSpec:
    uri: str = "sqlite:///mlruns.db"
    experiment: str = "ssl"
    run_name: Optional[str] = None
    token: Optional[str] = None  # never logged


@dataclass
class KnnSpec:
    enabled: bool = True
    k: int = 20
    temperature: float = 0.07
    every_epochs: int = 0  # 0: only at the end
    max_train_samples: int = 100000  # cap on the kNN / linear-probe train bank of large streamed sets (0: no cap)


@dataclass
class LinearSpec:
    enabled: bool = False
    epochs: int = 50
    lr: float = 1.0e-2


@dataclass
class EvalSpec:
    knn: KnnSpec = field(default_factory=KnnSpec)
    linear: LinearSpec = field(default_factory=LinearSpec)
    random_init_baseline: bool = True


@dataclass
class RunSpec:
    name: str = MISSING
    seed: int = 0
    method: dict[str, Any] = field(default_factory=dict)
    data: DataSpec = field(default_factory=DataSpec)
    optim: OptimSpec = field(default_factory=OptimSpec)
    scaling: ScalingSpec = field(default_factory=ScalingSpec)
    checkpoint: CheckpointSpec = field(default_factory=CheckpointSpec)
    tracking: TrackingSpec = field(default_factory=TrackingSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)


DATASETS = ("digits", "synthetic", "image_folder", "shards", "cifar10")
STREAMED_DATASETS = ("image_folder", "shards")
PRECISIONS = ("bf16", "fp32")
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_SPREAD")
OPTIMIZERS = ("adamw",)
CLIP_MODES = ("global", "per_param")
LR_SCALINGS = ("none", "linear")
SECRET_MARKERS = ("secret", "token", "password", "key_id", "access_key")


# ---- loading -------------------------------------------------------------------------------------------
def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise SpecError("spec", "an existing YAML file", str(path))
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        raise SpecError("spec", f"valid YAML ({where}: {getattr(err, 'problem', err)})", str(path)) from None
    if not isinstance(data, dict):
        raise SpecError("spec", "a YAML mapping at the top level", type(data).__name__, str(path))
    return data


def parse_overrides(overrides: list[str] | None) -> DictConfig:
    overrides = list(overrides or [])
    for item in overrides:
        if "=" not in item:
            raise SpecError("override", "key=value (OmegaConf dotlist)", item)
    try:
        return OmegaConf.from_dotlist(overrides)
    except OmegaConfBaseException as err:
        raise SpecError("override", "key=value (OmegaConf dotlist)", " ".join(overrides)) from err


def _merge_schema(raw: dict[str, Any] | DictConfig, source: str | None) -> DictConfig:
    schema = OmegaConf.structured(RunSpec)
    try:
        return OmegaConf.merge(schema, raw)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "spec"
        msg = str(err).splitlines()[0]
        if "not in struct" in msg or "Key '" in msg and "not in" in msg:
            expected = "a known key (" + _known_keys(key) + ")"
        elif "could not be converted to" in msg:
            expected = "a value of type " + msg.rsplit("could not be converted to", 1)[1].strip()
        else:
            expected = msg
        seen = _lookup(raw, key)
        raise SpecError(key, expected, seen, source) from None


def _lookup(raw: Any, dotted: str) -> Any:
    node = raw
    for part in dotted.split("."):
        if isinstance(node, (dict, DictConfig)) and part in node:
            node = node[part]
        else:
            return dotted.split(".")[-1] if node is raw else node
    if isinstance(node, DictConfig):
        return OmegaConf.to_container(node)
    return node


def _known_keys(dotted: str) -> str:
    parent = dotted.rsplit(".", 1)[0] if "." in dotted else ""
    node: Any = OmegaConf.structured(RunSpec)
    for part in [p for p in parent.split(".") if p]:
        node = node.get(part) if isinstance(node, DictConfig) else None
    if isinstance(node, DictConfig):
        return ", ".join(sorted(node.keys()))
    return "see ssl_platform/spec.py"


def load_spec(path: str | os.PathLike, overrides: list[str] | None = None, *, base_dir: str | None = None) -> DictConfig:
    """Read a YAML run spec, apply dotlist overrides, validate, and resolve relative paths.

    Relative local paths (checkpoint URI, sqlite tracking URI, data root) are resolved against ``base_dir``
    (default: the current directory), so that Ray workers, whose working directory differs, see the same files.
    """
    raw = read_yaml(path)
    raw.pop("sweep", None)  # a sweep spec is a run spec plus `sweep:` (see ssl_platform.sweep_spec)
    return spec_from_dict(raw, overrides, source=str(path), base_dir=base_dir)


def spec_from_dict(
    raw: dict[str, Any] | DictConfig, overrides: list[str] | None = None, *, source: str | None = None, base_dir: str | None = None
) -> DictConfig:
    merged = OmegaConf.merge(OmegaConf.create(raw), parse_overrides(overrides)) if overrides else raw
    spec = _merge_schema(merged, source)
    validate(spec, source)
    fill_method_defaults(spec)
    resolve_paths(spec, base_dir)
    return spec


def fill_method_defaults(spec: DictConfig) -> None:
    """Write the method constructor's defaults into ``spec.method`` so the resolved spec is complete."""
    from methods.registry import get_method_class

    params = inspect.signature(get_method_class(spec.method.name).__init__).parameters
    for key, p in params.items():
        if key == "self" or key in spec.method or p.default is inspect.Parameter.empty:
            continue
        value = list(p.default) if isinstance(p.default, tuple) else p.default
        if value is None or isinstance(value, (bool, int, float, str, list)):
            spec.method[key] = value


def resolve_paths(spec: DictConfig, base_dir: str | None = None) -> None:
    base = Path(base_dir or os.getcwd())
    uri = spec.checkpoint.uri
    if "://" not in uri:
        spec.checkpoint.uri = str((base / uri).resolve())
    turi = spec.tracking.uri
    if turi.startswith("sqlite:///") and not turi.startswith("sqlite:////"):
        spec.tracking.uri = "sqlite:///" + str((base / turi[len("sqlite:///"):]).resolve())
    elif "://" not in turi:
        spec.tracking.uri = str((base / turi).resolve())
    for key in ("root", "val_root"):
        if spec.data[key] and "://" not in spec.data[key]:
            spec.data[key] = str((base / spec.data[key]).resolve())
    # the method's checkpoint arguments (e.g. a stage-1 teacher): Ray workers do not run in the submitting directory
    for key in method_checkpoint_params(spec):
        value = spec.method[key]
        if isinstance(value, str) and value and "://" not in value:
            spec.method[key] = str((base / value).resolve())


def method_checkpoint_params(spec: DictConfig) -> list[str]:
    """The keys of ``spec.method`` that its method declares as checkpoint paths (``checkpoint_params``) and that
    the spec sets to a value (not an interpolation still to be resolved)."""
    from methods.registry import get_method_class

    declared = get_method_class(spec.method.name).checkpoint_params
    return [k for k in declared if k in spec.method and not OmegaConf.is_interpolation(spec.method, k) and spec.method[k]]


# ---- validation ----------------------------------------------------------------------------------------
def _check(cond: bool, key: str, expected: str, seen: Any, source: str | None) -> None:
    if not cond:
        raise SpecError(key, expected, seen, source)


def _check_range_pair(value: Any, key: str, lo: float, hi: float, source: str | None) -> None:
    from methods.constraints import ConstraintError, RangePair

    try:
        RangePair(key, lo, hi).check({key: value})
    except ConstraintError as err:
        raise SpecError(err.key, err.expected, err.seen, source) from None


def validate(spec: DictConfig, source: str | None = None) -> None:
    """Check ranges and the method section; raises :class:`SpecError`."""
    s = spec
    if OmegaConf.is_missing(s, "name"):
        raise SpecError("name", "a non-empty string (the experiment's name)", None, source)
    _check(isinstance(s.name, str) and s.name.strip() != "", "name", "a non-empty string", s.name, source)
    _check(s.data.name in DATASETS, "data.name", f"one of {list(DATASETS)}", s.data.name, source)
    _check(s.data.image_size >= 8, "data.image_size", "an integer >= 8", s.data.image_size, source)
    _check(s.data.batch_size >= 1, "data.batch_size", "an integer >= 1", s.data.batch_size, source)
    _check(s.data.num_workers >= 0, "data.num_workers", "an integer >= 0", s.data.num_workers, source)
    _check(0.0 < s.data.test_fraction < 1.0, "data.test_fraction", "a number in (0, 1)", s.data.test_fraction, source)
    _check(s.data.num_samples >= 2, "data.num_samples", "an integer >= 2", s.data.num_samples, source)
    _check(s.data.num_classes >= 2, "data.num_classes", "an integer >= 2", s.data.num_classes, source)
    if s.data.name in STREAMED_DATASETS:
        _check(bool(s.data.root), "data.root", f"a local directory or s3://bucket/prefix for data.name={s.data.name}",
               s.data.root, source)
    for key in ("root", "val_root"):
        value = s.data[key]
        if value and "://" in value:
            _check(value.startswith("s3://") and len(value) > 5, f"data.{key}", "a local path or s3://bucket/prefix", value, source)
    if s.data.val_root:
        _check(s.data.name in STREAMED_DATASETS, "data.val_root", f"unset unless data.name is one of {list(STREAMED_DATASETS)}",
               s.data.val_root, source)
    _check(s.data.decode_size == 0 or s.data.decode_size >= s.data.image_size, "data.decode_size",
           f"0 (auto) or an integer >= data.image_size ({s.data.image_size})", s.data.decode_size, source)
    _check(s.data.prefetch_batches >= 0, "data.prefetch_batches", "an integer >= 0", s.data.prefetch_batches, source)
    _check(s.data.shuffle_buffer >= 0, "data.shuffle_buffer", "an integer >= 0 (0: no local shuffle)", s.data.shuffle_buffer, source)
    _check(0.0 <= s.data.max_bad_fraction <= 1.0, "data.max_bad_fraction", "a number in [0, 1]", s.data.max_bad_fraction, source)
    _check_range_pair(list(s.data.augment.crop_scale), "data.augment.crop_scale", 0.01, 1.0, source)
    mc = s.data.multicrop
    _check(mc.n_global >= 1, "data.multicrop.n_global", "an integer >= 1", mc.n_global, source)
    _check(mc.n_local >= 0, "data.multicrop.n_local", "an integer >= 0", mc.n_local, source)
    _check(mc.local_size >= 8, "data.multicrop.local_size", "an integer >= 8", mc.local_size, source)
    _check_range_pair(list(mc.global_scale), "data.multicrop.global_scale", 0.01, 1.0, source)
    _check_range_pair(list(mc.local_scale), "data.multicrop.local_scale", 0.01, 1.0, source)
    for key in ("hflip_p", "color_jitter_p", "solarize_p"):
        _check(0.0 <= mc[key] <= 1.0, f"data.multicrop.{key}", "a probability in [0, 1]", mc[key], source)

    o = s.optim
    _check(o.name in OPTIMIZERS, "optim.name", f"one of {list(OPTIMIZERS)}", o.name, source)
    _check(o.lr > 0, "optim.lr", "a number > 0", o.lr, source)
    _check(o.weight_decay >= 0, "optim.weight_decay", "a number >= 0", o.weight_decay, source)
    _check(o.epochs >= 1, "optim.epochs", "an integer >= 1", o.epochs, source)
    _check(0 <= o.warmup_epochs <= o.epochs, "optim.warmup_epochs", f"a number in [0, optim.epochs={o.epochs}]", o.warmup_epochs, source)
    _check(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", "a number in [0, 1]", o.min_lr_ratio, source)
    _check(o.clip_grad >= 0, "optim.clip_grad", "a number >= 0 (0 disables clipping)", o.clip_grad, source)
    _check(o.max_nonfinite_skips >= 0, "optim.max_nonfinite_skips", "an integer >= 0", o.max_nonfinite_skips, source)
    _check(o.clip_mode in CLIP_MODES, "optim.clip_mode", f"one of {list(CLIP_MODES)}", o.clip_mode, source)
    _check(o.lr_scaling in LR_SCALINGS, "optim.lr_scaling", f"one of {list(LR_SCALINGS)}", o.lr_scaling, source)
    if o.weight_decay_end is not None:
        _check(o.weight_decay_end >= 0, "optim.weight_decay_end", "a number >= 0 (or unset: constant weight decay)",
               o.weight_decay_end, source)
    if o.min_lr is not None:
        _check(0 <= o.min_lr <= o.lr, "optim.min_lr", f"a number in [0, optim.lr={o.lr}] (or unset: min_lr_ratio * lr)",
               o.min_lr, source)
    betas = list(o.betas)
    _check(len(betas) == 2 and all(0 <= b < 1 for b in betas), "optim.betas", "[beta1, beta2] each in [0, 1)", betas, source)

    sc = s.scaling
    _check(sc.num_workers >= 1, "scaling.num_workers", "an integer >= 1", sc.num_workers, source)
    _check(sc.cpus_per_worker > 0, "scaling.cpus_per_worker", "a number > 0", sc.cpus_per_worker, source)
    _check(sc.precision in PRECISIONS, "scaling.precision", f"one of {list(PRECISIONS)}", sc.precision, source)
    _check(sc.max_failures >= -1, "scaling.max_failures", "an integer >= -1 (-1: unlimited)", sc.max_failures, source)
    _check(sc.placement_strategy in PLACEMENT_STRATEGIES, "scaling.placement_strategy",
           f"one of {list(PLACEMENT_STRATEGIES)} (Ray placement group strategy)", sc.placement_strategy, source)

    c = s.checkpoint
    _check(isinstance(c.uri, str) and c.uri != "", "checkpoint.uri", "a local path or s3://bucket/prefix", c.uri, source)
    if "://" in c.uri:
        _check(c.uri.startswith("s3://") and len(c.uri) > 5, "checkpoint.uri", "a local path or s3://bucket/prefix", c.uri, source)
    _check(c.every_epochs >= 1, "checkpoint.every_epochs", "an integer >= 1", c.every_epochs, source)
    _check(c.keep >= 1, "checkpoint.keep", "an integer >= 1", c.keep, source)
    _check(c.upload_attempts >= 1, "checkpoint.upload_attempts", "an integer >= 1", c.upload_attempts, source)
    _check(c.upload_backoff_s >= 0, "checkpoint.upload_backoff_s", "a number of seconds >= 0", c.upload_backoff_s, source)

    k = s.eval.knn
    _check(k.k >= 1, "eval.knn.k", "an integer >= 1", k.k, source)
    _check(k.temperature > 0, "eval.knn.temperature", "a number > 0", k.temperature, source)
    _check(k.every_epochs >= 0, "eval.knn.every_epochs", "an integer >= 0", k.every_epochs, source)
    _check(k.max_train_samples >= 0, "eval.knn.max_train_samples", "an integer >= 0 (0: no cap)", k.max_train_samples, source)
    _check(s.eval.linear.epochs >= 1, "eval.linear.epochs", "an integer >= 1", s.eval.linear.epochs, source)
    validate_method(s.method, source)


def validate_method(method: DictConfig, source: str | None = None) -> None:
    """Check ``method.*`` against the registered method: constructor names and types, the method's declared
    constraints (ranges, choices, required settings), and the timm model."""
    from methods.constraints import ConstraintError
    from methods.registry import available_methods, get_method_class

    name = method.get("name") if isinstance(method, DictConfig) else None
    names = available_methods()
    _check(name is not None, "method.name", f"one of {names}", name, source)
    _check(name in names, "method.name", f"one of {names}", name, source)
    cls = get_method_class(name)
    params = inspect.signature(cls.__init__).parameters
    allowed = {p for p in params if p != "self"}
    hints = typing.get_type_hints(cls.__init__)
    kwargs: dict[str, Any] = {}
    for key, value in method.items():
        if key == "name":
            continue
        full = f"method.{key}"
        _check(key in allowed, full, f"a constructor argument of {cls.__name__} ({', '.join(sorted(allowed))})", key, source)
        if isinstance(value, (DictConfig, ListConfig)):
            value = OmegaConf.to_container(value)
        _check_type(value, hints.get(key), params[key].default, full, source)
        kwargs[key] = value
    try:
        cls.check_kwargs(kwargs, prefix="method.")
    except ConstraintError as err:
        raise SpecError(err.key, err.expected, err.seen, source) from None
    enc = method.get("encoder_name", params.get("encoder_name").default if "encoder_name" in params else None)
    if isinstance(enc, str):
        import timm

        _check(enc in timm.list_models(), "method.encoder_name", "a timm model name (timm.list_models())", enc, source)


def _check_type(value: Any, hint: Any, default: Any, key: str, source: str | None) -> None:
    expected = _expected_types(hint, default)
    if expected is None or value is None:
        return
    if bool in expected and not isinstance(value, bool) and int not in expected and float not in expected:
        raise SpecError(key, "a boolean", value, source)
    if isinstance(value, bool) and bool not in expected:
        raise SpecError(key, " or ".join(t.__name__ for t in expected), value, source)
    if float in expected and isinstance(value, int):
        return
    if not isinstance(value, tuple(expected)):
        raise SpecError(key, " or ".join(t.__name__ for t in expected), value, source)


def _expected_types(hint: Any, default: Any) -> tuple[type, ...] | None:
    if hint is None:
        return (type(default),) if default not in (None, inspect.Parameter.empty) else None
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        out: list[type] = []
        for a in args:
            if a is type(None):
                continue
            sub = _expected_types(a, inspect.Parameter.empty)
            if sub is None:
                return None
            out.extend(sub)
        return tuple(out) or None
    if origin in (tuple, list, typing.Sequence):
        return (list, tuple)
    if origin is dict or hint is dict:
        return (dict,)
    if hint in (int, float, str, bool):
        return (hint,)
    if hint is typing.Any:
        return None
    if isinstance(hint, type):
        if hint.__module__.startswith("torch"):
            return (str,) if default is None or isinstance(default, str) else None
        return (hint,)
    return None


# ---- helpers -------------------------------------------------------------------------------------------
def method_kwargs(spec: DictConfig) -> dict[str, Any]:
    kwargs = OmegaConf.to_container(spec.method, resolve=True)
    kwargs.pop("name")
    return kwargs


def to_container(spec: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(spec, resolve=True)


def spec_hash(spec: DictConfig | dict) -> str:
    data = to_container(spec) if isinstance(spec, DictConfig) else spec
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def is_secret_key(key: str) -> bool:
    low = key.lower()
    return any(marker in low for marker in SECRET_MARKERS)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def public_params(spec: DictConfig) -> dict[str, Any]:
    """Flattened resolved spec without secret-like keys (for MLflow params)."""
    return {k: v for k, v in flatten(to_container(spec)).items() if not is_secret_key(k.rsplit(".", 1)[-1])}


def dump_yaml(spec: DictConfig, redact: bool = True) -> str:
    data = to_container(spec)
    if redact:
        data = _redact(data)
    return yaml.safe_dump(data, sort_keys=False)


def _redact(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: ("***" if is_secret_key(k) and v is not None else _redact(v)) for k, v in data.items()}
    if isinstance(data, list):
        return [_redact(v) for v in data]
    return data
