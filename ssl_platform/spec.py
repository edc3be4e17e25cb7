"""Experiment spec: a structured OmegaConf schema, loading with dotlist overrides, and validation.

Everything is checked here, before Ray starts: unknown keys, wrong types, out-of-range values, unknown
methods and unknown timm models. Each schema section declares the rules on its values (``constraints``, in the
vocabulary of :mod:`methods.constraints`), as a method does on its arguments; ``method.*`` is checked against the
method class: names and types against its constructor's signature, values against the constraints it declares
(``SSLMethod.constraints``). Errors are :class:`SpecError` naming the key, the expected form and the value seen.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional

import yaml
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from methods import constraints as C
from methods.constraints import Constraint, ConstraintError
from methods.registry import MethodNotFound, available_methods, get_method_class, is_plugin_path
from methods.views import ViewGroup


class SpecError(ValueError):
    """A spec value is wrong: ``key``, what was ``expected`` and the value ``seen``."""

    def __init__(self, key: str, expected: str, seen: Any, source: str | None = None):
        self.key, self.expected, self.seen = key, expected, seen
        where = f" in {source}" if source else ""
        super().__init__(f"spec error{where}: {key}: expected {expected}, got {seen!r}")


# ---- schema --------------------------------------------------------------------------------------------
DATASETS = ("digits", "synthetic", "image_folder", "shards", "cifar10")
LABEL_MODES = ("folders", "none")
STREAMED_DATASETS = ("image_folder", "shards")
PRECISIONS = ("bf16", "fp32")
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_SPREAD")
OPTIMIZERS = ("adamw",)
CLIP_MODES = ("global", "per_param")
LR_SCALINGS = ("none", "linear")
WEIGHT_DECAY_EXCLUDES = ("bias_norm", "bias_norm_tokens", "none")
LR_SCHEDULES = ("warmup_cosine", "linear_cosine_epochs")
STRATEGIES = ("ddp", "fsdp")
# keys of the ``method`` section that the platform reads itself (not constructor arguments of the method)
PLATFORM_METHOD_KEYS = ("encoder_init",)
SECRET_MARKERS = ("secret", "token", "password", "key_id", "access_key")


def _count(param: str, low: int = 0, note: str = "") -> C.InRange:
    """An integer >= ``low`` (a count, a size)."""
    return C.InRange(param, low, integer=True, note=note)


# Each section's ``constraints`` are checked in order by :func:`validate` (the first failing one is reported).
@dataclass(frozen=True)
class _OddKernel(C.InRange):
    """0 (automatic) or an odd integer >= 3 (a blur kernel side)."""

    def accepts(self, value: Any) -> bool:
        return super().accepts(value) and (value == 0 or (value >= 3 and value % 2 == 1))


@dataclass
class AugmentSpec:
    constraints: ClassVar[tuple[Constraint, ...]] = (
        C.RangePair("crop_scale", 0.01, 1.0),
        C.InRange("grayscale_p", 0.0, 1.0, kind="a probability"),
        C.InRange("blur_p", 0.0, 1.0, kind="a probability"),
        C.RangePair("blur_sigma", 0.01, 100.0),
        _OddKernel("blur_kernel", 0, integer=True, note="0: about 10% of the view; else odd, >= 3"),
    )

    crop_scale: list[float] = field(default_factory=lambda: [0.6, 1.0])
    hflip: bool = False
    # single-view methods: RandomGrayscale(p) and RandomApply([GaussianBlur(blur_kernel, blur_sigma)], blur_p) after
    # the crop (APL's reference: p 0.2, kernel 9, sigma 0.1-0.5, p 0.5); 0: none
    grayscale_p: float = 0.0
    blur_p: float = 0.0
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])
    blur_kernel: int = 0


@dataclass
class MultiCropSpec:
    constraints: ClassVar[tuple[Constraint, ...]] = (
        C.positive_int("n_global"),
        _count("n_local"),
        _count("local_size", 8),
        C.RangePair("global_scale", 0.01, 1.0),
        C.RangePair("local_scale", 0.01, 1.0),
        *(C.InRange(p, 0.0, 1.0, kind="a probability") for p in ("hflip_p", "color_jitter_p", "solarize_p")),
    )

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
    constraints: ClassVar[tuple[Constraint, ...]] = (
        C.OneOf("name", DATASETS),
        C.OneOf("labels", LABEL_MODES),
        _count("image_size", 8),
        C.positive_int("batch_size"),
        _count("num_workers"),
        C.open_unit_interval("test_fraction"),
        _count("num_samples", 2),
        _count("num_classes", 2),
        C.RequiredWhen("root", "name", STREAMED_DATASETS, "a local directory or s3://bucket/prefix for {other}={value}"),
        C.StorageUri("root"),
        C.StorageUri("val_root"),
        C.UnsetUnless("val_root", "name", STREAMED_DATASETS),
        C.NotBelow("decode_size", "image_size", exempt=(0,), expected="0 (auto) or an integer >= {other} ({bound})"),
        _count("prefetch_batches"),
        _count("shuffle_buffer", note="0: no local shuffle"),
        C.unit_interval("max_bad_fraction"),
    )

    name: str = "digits"  # digits | synthetic | image_folder | shards | cifar10
    labels: str = "folders"  # folders (image_folder: root/class_name/image) | none (no labels: any layout, no kNN)
    root: Optional[str] = None  # image_folder / shards: the training images, a local directory or s3://bucket/prefix
    val_root: Optional[str] = None  # the validation split in the same format (e.g. ImageNet's val/); else test_fraction
    image_size: int = 32
    batch_size: int = 128
    num_workers: int = 0  # streamed sources: concurrent Ray Data decode tasks (0: Ray Data decides)
    test_fraction: float = 0.2
    # streamed sources: the CPU fits each image into a decode_size^2 canvas, aspect kept, never enlarged (scale
    # min(1, decode_size / long side)): an image whose long side is <= decode_size is cropped at full resolution.
    # 0: 4/3 image_size. Memory per batch grows with its square (uint8: 3 * decode_size^2 bytes per image, 4x that as
    # float on a GPU: 0.75 / 3 MiB per image at 512, 0.19 / 0.75 MiB at 256)
    decode_size: int = 0
    # JPEGs decoded at a reduced DCT scale (PIL draft: 1/2, 1/4, 1/8, still >= the canvas fit) when the canvas is
    # smaller than the image: a speed option (benchmarks/README.md), off by default (full decode, antialiased resize)
    decode_draft: bool = False
    prefetch_batches: int = 2  # streamed sources: batches decoded ahead of the step, per worker
    shuffle_buffer: int = 1000  # shards only: rows in each worker's local shuffle buffer (files shuffle every epoch)
    max_bad_fraction: float = 0.01  # undecodable files are skipped and counted; above this share the run stops
    num_samples: int = 512  # synthetic only
    num_classes: int = 10  # synthetic only
    augment: AugmentSpec = field(default_factory=AugmentSpec)
    multicrop: MultiCropSpec = field(default_factory=MultiCropSpec)


@dataclass
class OptimSpec:
    constraints: ClassVar[tuple[Constraint, ...]] = (
        C.OneOf("name", OPTIMIZERS),
        C.positive("lr"),
        C.InRange("weight_decay", 0.0),
        C.positive_int("epochs"),
        C.BoundedBy("warmup_epochs", "epochs"),
        C.unit_interval("min_lr_ratio"),
        C.InRange("clip_grad", 0.0, note="0 disables clipping"),
        _count("max_nonfinite_skips"),
        C.OneOf("clip_mode", CLIP_MODES),
        C.OneOf("lr_scaling", LR_SCALINGS),
        C.OneOf("weight_decay_exclude", WEIGHT_DECAY_EXCLUDES),
        C.OneOf("schedule", LR_SCHEDULES),
        C.InRange("warmup_start_factor", 0.0, 1.0, low_open=True),
        C.InRange("weight_decay_end", 0.0, optional=True, note="or unset: constant weight decay"),
        C.BoundedBy("min_lr", "lr", optional=True, note="or unset: min_lr_ratio * lr"),
        C.ListOf("betas", 2, C.InRange("beta", 0.0, 1.0, high_open=True), "[beta1, beta2] each in [0, 1)"),
        C.positive_int("accumulation_steps"),
    )

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
    # bias_norm: no decay on biases and 1-D parameters (DINO's get_params_groups; MAE, iBOT, I-JEPA alike) |
    # bias_norm_tokens: also pos_embed and *token* parameters | none: decay everything (fairseq data2vec)
    weight_decay_exclude: str = "bias_norm"
    # warmup_cosine: per-step linear warm-up then cosine (DINO, MAE) | linear_cosine_epochs: APL's per-epoch
    # ChainedScheduler(LinearLR(warmup_start_factor, warmup_epochs), CosineAnnealingLR(epochs, min lr))
    schedule: str = "warmup_cosine"
    warmup_start_factor: float = 0.5  # linear_cosine_epochs only: LinearLR's start_factor
    # micro-batches per optimizer step (gradients accumulated; data.batch_size is the batch of one optimizer step)
    accumulation_steps: int = 1


@dataclass
class ScalingSpec:
    constraints: ClassVar[tuple[Constraint, ...]] = (
        C.positive_int("num_workers"),
        C.positive("cpus_per_worker"),
        C.OneOf("precision", PRECISIONS),
        _count("max_failures", -1, note="-1: unlimited"),
        C.OneOf("placement_strategy", PLACEMENT_STRATEGIES, note="Ray placement group strategy"),
        C.OneOf("strategy", STRATEGIES, note="ddp: full replicas; fsdp: FSDP2 shards"),
    )

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
    strategy: str = "ddp"  # ddp (every worker holds the whole model) | fsdp (FSDP2: blocks, heads, model sharded)
    activation_checkpointing: bool = False  # student blocks recompute their activations in backward


@dataclass
class CheckpointSpec:
    constraints: ClassVar[tuple[Constraint, ...]] = (
        C.StorageUri("uri", required=True),
        C.positive_int("every_epochs"),
        C.positive_int("keep"),
        C.positive_int("upload_attempts"),
        C.InRange("upload_backoff_s", 0.0, kind="a number of seconds"),
    )

    uri: str = "./checkpoints"
    every_epochs: int = 1
    keep: int = 2
    endpoint_url: Optional[str] = None  # S3-compatible endpoint (never secrets in a spec)
    upload_attempts: int = 5  # tries per checkpoint file before the run stops (storage unreachable / errors)
    upload_backoff_s: float = 1.0  # wait before the 2nd try, doubled after each failed try (at most 30 s)


@dataclass
class TrackingSpec:
    constraints: ClassVar[tuple[Constraint, ...]] = (
        C.InRange("flush_timeout_s", 0.0, kind="a number of seconds"),
    )

    uri: str = "sqlite:///mlruns.db"
    experiment: str = "ssl"
    run_name: Optional[str] = None
    token: Optional[str] = None  # never logged
    # MLflow writes are queued and sent in the background; at the run's end, wait at most this long for them, then
    # keep what is left in <checkpoint.uri>/<run>/tracking/pending-*.jsonl (replay: `sync-tracking RUN`)
    flush_timeout_s: float = 60.0
    # a tracking server down at start: false trains now and creates the MLflow run when it answers; true refuses
    # the run before Ray starts
    require_server_at_start: bool = False


@dataclass
class KnnSpec:
    constraints: ClassVar[tuple[Constraint, ...]] = (
        C.positive_int("k"),
        C.positive("temperature"),
        _count("every_epochs"),
        _count("max_train_samples", note="0: no cap"),
    )

    enabled: bool = True
    k: int = 20
    temperature: float = 0.07
    every_epochs: int = 0  # 0: only at the end
    max_train_samples: int = 100000  # cap on the kNN / linear-probe train bank of large streamed sets (0: no cap)


@dataclass
class LinearSpec:
    constraints: ClassVar[tuple[Constraint, ...]] = (C.positive_int("epochs"),)

    enabled: bool = False
    epochs: int = 50
    lr: float = 1.0e-2


def _threshold(param: str, high: float) -> C.InRange:
    return C.InRange(param, 0.0, high, optional=True, note="or null: no warning on this metric")


@dataclass
class HealthSpec:
    """Label-free health metrics (methods/health.py) every log interval, and when they mean collapse."""

    constraints: ClassVar[tuple[Constraint, ...]] = (
        C.positive_int("window_steps"),
        _threshold("rank_fraction_below", 1.0),
        _threshold("normalized_std_below", 1.0),
        _threshold("teacher_entropy_above", 1.0),
        _threshold("student_teacher_kl_below", math.inf),
        _threshold("target_scale_below", math.inf),
    )

    enabled: bool = True
    # a metric past its bound at every reading for this many steps is a collapse (warned once, tagged in MLflow)
    window_steps: int = 50
    # RankMe over min(batch, embedding dim): complete collapse is 1 / min(batch, dim), so a bound depends on the batch
    # (the shipped DINO digits recipe, healthy, sits at 0.032 of 64); off by default
    rank_fraction_below: Optional[float] = None
    normalized_std_below: Optional[float] = 0.01  # sqrt(D) * std of L2-normalised embeddings (collapse: 0)
    # DINO / iBOT teacher entropy over ln K (uniform collapse ~1; the shipped digits recipe stays <= 0.75, without its
    # BN head it passes 0.95 by step 20 of 440)
    teacher_entropy_above: Optional[float] = 0.95
    student_teacher_kl_below: Optional[float] = 0.05  # DINO / iBOT KL(P_t || P_s) in nats (collapse ~0; shipped >= 0.35)
    target_scale_below: Optional[float] = None  # RMS of masked-prediction targets


@dataclass
class EvalSpec:
    constraints: ClassVar[tuple[Constraint, ...]] = (C.InRange("crop_fraction", 0.0, 1.0, low_open=True),
                                                     C.positive("online_probe_lr"), C.positive_int("online_probe_every"))

    knn: KnnSpec = field(default_factory=KnnSpec)
    linear: LinearSpec = field(default_factory=LinearSpec)
    health: HealthSpec = field(default_factory=HealthSpec)
    stop_on_collapse: bool = False  # a collapse warning ends the run with an error (the last checkpoint is kept)
    # a linear head trained while the run trains (labelled training data only), on the evaluated encoder's features of
    # the training batch's evaluation input (eval mode, no gradients: one extra forward per probe step)
    online_probe: bool = False
    online_probe_lr: float = 1.0e-2  # its own AdamW
    online_probe_every: int = 1  # a probe step at every k-th training step
    pictures: bool = True  # images/ in MLflow at each kNN evaluation: the method's panels and a PCA embedding plot
    random_init_baseline: bool = True
    # evaluation input: the centred square of crop_fraction of the short side, resized bicubic to data.image_size
    # (DINO / iBOT / MAE linear probe and kNN: Resize(256) + CenterCrop(224), 0.875); 1: the whole short side
    crop_fraction: float = 0.875
    # the labelled data kNN and the linear probe use (a data section: digits, cifar10, image_folder, shards, with its
    # own image_size); unset: the training data when it has labels, else no kNN / probe
    data: Optional[DataSpec] = None


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
    raw.pop("sweep", None)  # a sweep spec is a run spec plus `sweep:` (see ssl_platform.sweeps.sweep_spec)
    return spec_from_dict(raw, overrides, source=str(path), base_dir=base_dir)


def spec_from_dict(
    raw: dict[str, Any] | DictConfig, overrides: list[str] | None = None, *, source: str | None = None, base_dir: str | None = None
) -> DictConfig:
    merged = OmegaConf.merge(OmegaConf.create(raw), parse_overrides(overrides)) if overrides else raw
    spec = _merge_schema(merged, source)
    validate(spec, source)
    fill_method_defaults(spec.method)
    resolve_paths(spec, base_dir)
    return spec


def fill_method_defaults(method: DictConfig) -> None:
    """Write the method constructor's defaults into the spec's ``method`` section so the resolved spec is complete."""

    params = inspect.signature(get_method_class(method.name).__init__).parameters
    for key, p in params.items():
        if key == "self" or key in method or p.default is inspect.Parameter.empty:
            continue
        value = list(p.default) if isinstance(p.default, tuple) else p.default
        if value is None or isinstance(value, (bool, int, float, str, list)):
            method[key] = value


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
    for section in (spec.data, spec.eval.data):
        for key in ("root", "val_root"):
            if section is not None and section[key] and "://" not in section[key]:
                section[key] = str((base / section[key]).resolve())
    # the method's checkpoint arguments (e.g. a stage-1 teacher): Ray workers do not run in the submitting directory
    for key in [*method_checkpoint_params(spec.method), *(k for k in PLATFORM_METHOD_KEYS if spec.method.get(k))]:
        value = spec.method[key]
        if isinstance(value, str) and value and "://" not in value:
            spec.method[key] = str((base / value).resolve())


def eval_data_section(data: DictConfig, evaluation: DictConfig) -> DictConfig | None:
    """The labelled data kNN and the linear probe use (from the spec's ``data`` and ``eval`` sections): ``eval.data``,
    else the training data unless it is declared unlabelled (``data.labels: none``); None: no evaluation. A training
    set of shards prepared with ``--labels none`` is found unlabelled only from its manifest
    (:func:`ssl_platform.data.streaming.plan_data`)."""
    if evaluation.data is not None:
        return evaluation.data
    return None if data.labels == "none" else data


def method_checkpoint_params(method: DictConfig) -> list[str]:
    """The keys of the spec's ``method`` section that its method declares as checkpoint paths
    (``checkpoint_params``) and that the spec sets to a value (not an interpolation still to be resolved)."""

    declared = get_method_class(method.name).checkpoint_params
    return [k for k in declared if k in method and not OmegaConf.is_interpolation(method, k) and method[k]]


# ---- validation ----------------------------------------------------------------------------------------
def _check(cond: bool, key: str, expected: str, seen: Any, source: str | None) -> None:
    if not cond:
        raise SpecError(key, expected, seen, source)


# the sections checked against their ``constraints``, in order (``eval.data``: :func:`_check_eval_data`)
CHECKED_SECTIONS: tuple[tuple[str, type], ...] = (
    ("data", DataSpec),
    ("data.augment", AugmentSpec),
    ("data.multicrop", MultiCropSpec),
    ("optim", OptimSpec),
    ("scaling", ScalingSpec),
    ("checkpoint", CheckpointSpec),
    ("tracking", TrackingSpec),
    ("eval", EvalSpec),
    ("eval.knn", KnnSpec),
    ("eval.linear", LinearSpec),
    ("eval.health", HealthSpec),
)


class _SectionValues(Mapping[str, Any]):
    """A spec section as plain Python values, each read (interpolations resolved) only when a rule asks for it."""

    def __init__(self, node: DictConfig):
        self._node = node

    def __getitem__(self, key: str) -> Any:
        value = self._node[key]
        return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value

    def __iter__(self) -> Iterator[str]:
        return iter(self._node)

    def __len__(self) -> int:
        return len(self._node)


def _apply(constraints: tuple[Constraint, ...], values: Mapping[str, Any], prefix: str, source: str | None) -> None:
    """Check ``values`` against ``constraints`` in order; the first broken one becomes a :class:`SpecError`."""
    try:
        for constraint in constraints:
            constraint.check(values, prefix)
    except ConstraintError as err:
        raise SpecError(err.key, err.expected, err.seen, source) from None


def _check_name(spec: DictConfig, source: str | None) -> None:
    if OmegaConf.is_missing(spec, "name"):
        raise SpecError("name", "a non-empty string (the experiment's name)", None, source)
    _check(isinstance(spec.name, str) and spec.name.strip() != "", "name", "a non-empty string", spec.name, source)


def validate(spec: DictConfig, source: str | None = None) -> None:
    """Check the name, each section of :data:`CHECKED_SECTIONS` against its ``constraints``, and the method
    section; raises :class:`SpecError`."""
    _check_name(spec, source)
    for path, schema in CHECKED_SECTIONS:
        _apply(schema.constraints, _SectionValues(OmegaConf.select(spec, path)), path + ".", source)
    _check_eval_data(spec.eval.data, source)
    _check(not (spec.eval.online_probe and spec.data.labels == "none"), "eval.online_probe",
           "false for training data without labels (data.labels: none): the online probe trains on the training "
           "batches' labels", spec.eval.online_probe, source)
    _check(not (spec.eval.online_probe and spec.eval.data is not None), "eval.online_probe",
           "false with a separate eval.data (the probe learns the training data's classes and is scored on the "
           "evaluation features: one label set)", spec.eval.online_probe, source)
    validate_method(spec.method, source)
    _check_training_views(spec, source)


def _check_training_views(spec: DictConfig, source: str | None) -> None:
    """The method's declared views (:meth:`methods.base.SSLMethod.training_views`) from this ``data`` section."""
    cls = get_method_class(spec.method.name)
    try:
        views = cls.training_views(spec.data)
    except (ValueError, KeyError, TypeError) as err:
        raise SpecError("data", f"settings from which {cls.__name__} declares its training views", str(err),
                        source) from None
    _check(isinstance(views, dict) and views and all(isinstance(g, ViewGroup) for g in views.values()),
           f"method {spec.method.name}", "training_views() returning {argument: methods.views.ViewGroup}", views, source)


def _check_eval_data(data: DictConfig | None, source: str | None) -> None:
    """``eval.data``, when set: a data section under the same rules, and labelled (kNN and the probe need labels)."""
    if data is None:
        return
    _apply(DataSpec.constraints, _SectionValues(data), "eval.data.", source)
    _check(data.labels != "none", "eval.data.labels", "a labelled source for kNN and the linear probe (folders; "
           "unset eval.data to skip them)", data.labels, source)


def validate_method(method: DictConfig, source: str | None = None) -> None:
    """Check ``method.*`` against the registered method: constructor names and types, the method's declared
    constraints (ranges, choices, required settings), and the timm model."""

    name = method.get("name") if isinstance(method, DictConfig) else None
    expected = f"one of {available_methods()} or a plug-in path 'package.module:ClassName'"
    _check(isinstance(name, str) and (name in available_methods() or is_plugin_path(name)), "method.name", expected,
           name, source)
    try:
        cls = get_method_class(name)
    except MethodNotFound as err:
        raise SpecError("method.name", f"an importable SSLMethod ({err})", name, source) from None
    params = inspect.signature(cls.__init__).parameters
    allowed = {p for p in params if p != "self"}
    hints = typing.get_type_hints(cls.__init__)
    kwargs: dict[str, Any] = {}
    for key, value in method.items():
        if key == "name" or key in PLATFORM_METHOD_KEYS:
            _check(key == "name" or value is None or isinstance(value, str), f"method.{key}",
                   "a path or s3:// URI of released weights (or unset)", value, source)
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
def method_kwargs(method: DictConfig) -> dict[str, Any]:
    """The method's constructor arguments: the spec's ``method`` section, resolved, without ``name``."""
    kwargs = OmegaConf.to_container(method, resolve=True)
    kwargs.pop("name")
    for key in PLATFORM_METHOD_KEYS:
        kwargs.pop(key, None)
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
