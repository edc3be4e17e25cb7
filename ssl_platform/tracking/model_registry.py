"""MLflow model registry: ``promote`` a run's (or a sweep's best trial's) encoder, list ``models``.

``promote`` downloads the run's ``encoder`` artifact (``methods.checkpoint_io`` format, logged by train.py
at the end of every run), rebuilds the encoder module, logs it with ``mlflow.pytorch.log_model`` in a new
"registration" run (the source run is left untouched), registers it as a new model version, and moves the
alias (MLflow 3 aliases, not stages) only when the new version beats the alias holder on the metric.
The registered model maps images ``[B, C, H, W]`` to embeddings ``[B, D]``.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from methods.base import SSLMethod
from methods.checkpoint_io import CheckpointError, load_encoder_file
from methods.registry import available_methods, get_method_class, is_plugin_path
from ssl_platform.tracking import mlflow_runs as tracking

DEFAULT_TRACKING_URI = "sqlite:///mlruns.db"
METRIC_TAG_PREFIX = "metric."
COPIED_RUN_TAGS = ("method", "spec_hash", "checkpoint_uri", "final_checkpoint", "teacher_uri", "git_commit", "ray_job_id")


class PromotionError(ValueError):
    """A run or sweep that cannot be promoted (missing metric, artifact or children)."""


@dataclass
class PromotionResult:
    model: str
    version: str
    run_id: str
    metric: str
    value: float
    alias: str
    alias_moved: bool
    reason: str
    previous_version: str | None = None
    previous_value: float | None = None


def _client(tracking_uri: str):
    import mlflow

    tracking.client(tracking_uri)  # a new sqlite store is created once, under a lock
    mlflow.set_registry_uri(tracking_uri)
    return mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def rebuild_encoder(payload: dict[str, Any]) -> tuple[nn.Module, torch.Tensor]:
    """The encoder module of a ``checkpoint_io`` payload with its weights loaded (images -> embeddings, as the
    method that wrote it rebuilds it: ``SSLMethod.embedding_encoder``), and an input example."""

    method = payload.get("method")
    cls = get_method_class(method) if method in available_methods() or is_plugin_path(method) else SSLMethod
    config = {"encoder_name": payload["encoder_name"], "encoder_kwargs": payload["encoder_kwargs"]}
    model, (chans, height, width) = cls.embedding_encoder(config, payload["state_dict"])
    model.eval()
    example = torch.randn(2, chans, height, width, generator=torch.Generator().manual_seed(0))
    return model, example


def best_child(c, parent_run_id: str, metric: str, mode: str = "max") -> Any:
    """The FINISHED child run of ``parent_run_id`` with the best ``metric``."""
    parent = c.get_run(parent_run_id)
    runs = c.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'", max_results=10000
    )
    scored = [r for r in runs if r.info.status == "FINISHED" and _finite(r.data.metrics.get(metric))]
    if not scored:
        raise PromotionError(
            f"--sweep {parent_run_id}: expected FINISHED child runs with metric {metric!r}, "
            f"got {len(runs)} child run(s) ({sum(r.info.status == 'FINISHED' for r in runs)} finished, none with {metric!r})"
        )
    return (max if mode == "max" else min)(scored, key=lambda r: r.data.metrics[metric])


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def beats(new: float, old: float | None, mode: str) -> bool:
    if old is None:
        return True
    return new > old if mode == "max" else new < old


def _holder(c, model: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return c.get_model_version_by_alias(model, alias)
    except MlflowException:
        return None


@dataclass(frozen=True)
class AliasDecision:
    """Whether the alias moves to the new version, why, and the version that held it (with its metric value)."""

    moved: bool
    reason: str
    previous_version: str | None = None
    previous_value: float | None = None


def promote(
    run_id: str | None = None,
    *,
    model: str,
    metric: str = "knn_top1",
    mode: str = "max",
    alias: str = "champion",
    force: bool = False,
    sweep: str | None = None,
    tracking_uri: str | None = None,
) -> PromotionResult:
    """Register the encoder of ``run_id`` (or of the best child of sweep ``sweep``) as a version of ``model``."""
    _check_promote_args(run_id, sweep, mode)
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    c = _client(uri)
    src, value = _source_run(c, run_id, sweep, metric, mode)
    payload = _download_encoder(src, uri)
    mv = _register_encoder(c, src, payload, model=model, metric=metric, value=value, sweep=sweep)
    decision = _decide_alias(c, model, alias, metric=metric, value=value, mode=mode, force=force)
    if decision.moved:
        c.set_registered_model_alias(model, alias, mv.version)
    return PromotionResult(model, str(mv.version), src.info.run_id, metric, float(value), alias, decision.moved,
                           decision.reason, decision.previous_version, decision.previous_value)


def _check_promote_args(run_id: str | None, sweep: str | None, mode: str) -> None:
    if mode not in ("max", "min"):
        raise PromotionError(f"--mode: expected 'max' or 'min', got {mode!r}")
    if (run_id is None) == (sweep is None):
        raise PromotionError(f"promote: expected exactly one of RUN_ID or --sweep PARENT_RUN_ID, got run_id={run_id!r} sweep={sweep!r}")


def _source_run(c, run_id: str | None, sweep: str | None, metric: str, mode: str) -> tuple[Any, float]:
    """The run to promote (``run_id``, or the best child of ``sweep``) and its finite ``metric`` value."""
    src = best_child(c, sweep, metric, mode) if sweep else c.get_run(run_id)
    value = src.data.metrics.get(metric)
    if not _finite(value):
        raise PromotionError(
            f"run {src.info.run_id}: expected a finite metric {metric!r}, got {value!r} (metrics: {sorted(src.data.metrics)})"
        )
    return src, value


def _download_encoder(src, uri: str) -> dict[str, Any]:
    """The ``checkpoint_io`` payload of the run's ``encoder`` artifact (downloaded to a temporary directory)."""
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(run_id=src.info.run_id, artifact_path="encoder", dst_path=tmp, tracking_uri=uri)
        except Exception as err:  # noqa: BLE001 - MLflow raises several types for a missing artifact
            raise PromotionError(
                f"run {src.info.run_id}: expected an 'encoder' artifact (encoder/encoder.pt + manifest.json), "
                f"could not download it ({type(err).__name__}: {str(err)[:200]})"
            ) from None
        try:
            return load_encoder_file(local)
        except CheckpointError as err:
            raise PromotionError(f"run {src.info.run_id}: unusable 'encoder' artifact: {err}") from None


def _version_tags(src, payload: dict[str, Any], metric: str, value: float, sweep: str | None) -> dict[str, str]:
    """Tags of the new model version: the source run's copied tags, the metric, the encoder and where it came from."""
    run_tags = {k: src.data.tags[k] for k in COPIED_RUN_TAGS if k in src.data.tags}
    run_tags.setdefault("method", str(payload.get("method", "")))
    version_tags = {
        **run_tags, "source_run_id": src.info.run_id, "metric_name": metric, f"{METRIC_TAG_PREFIX}{metric}": repr(float(value)),
        "encoder_name": str(payload["encoder_name"]), "checkpoint_artifact": f"runs:/{src.info.run_id}/encoder",
    }
    if sweep:
        version_tags["sweep_parent_run_id"] = sweep
    return version_tags


def _register_encoder(c, src, payload: dict[str, Any], *, model: str, metric: str, value: float, sweep: str | None) -> Any:
    """Log the rebuilt encoder in a new registration run and register it as a new version of ``model``; the
    registration run is marked FAILED when either fails."""
    import mlflow
    from mlflow.models import infer_signature

    net, example = rebuild_encoder(payload)
    with torch.no_grad():
        out = net(example)
    signature = infer_signature(example.numpy(), out.numpy())
    version_tags = _version_tags(src, payload, metric, value, sweep)
    src_name = src.data.tags.get("mlflow.runName", src.info.run_id)
    reg_run = c.create_run(
        src.info.experiment_id, run_name=f"register-{src_name}", tags={"ssl.kind": "registration", "source_run_id": src.info.run_id}
    )
    try:
        with mlflow.start_run(run_id=reg_run.info.run_id):
            info = mlflow.pytorch.log_model(
                net, name="encoder", signature=signature, input_example=example.numpy(), serialization_format="pickle",
                code_paths=_code_paths() if _defined_here(net) else None, pip_requirements=_requirements(),
            )
            mlflow.log_metric(metric, float(value))
        mv = mlflow.register_model(info.model_uri, model, tags=version_tags)
    except BaseException:
        c.set_terminated(reg_run.info.run_id, "FAILED")
        raise
    c.set_model_version_tag(model, mv.version, "registration_run_id", reg_run.info.run_id)
    return mv


def _decide_alias(c, model: str, alias: str, *, metric: str, value: float, mode: str, force: bool) -> AliasDecision:
    """Whether the new version (``metric`` = ``value``) takes ``alias`` from its holder: it wins, or ``force``."""
    holder = _holder(c, model, alias)
    old_value = _version_metric(c, holder, metric) if holder is not None else None
    prev = str(holder.version) if holder is not None else None
    if holder is None:
        moved, reason = True, f"no version held alias {alias!r}"
    elif old_value is None and not force:
        moved, reason = False, f"the holder v{prev} has no {metric!r} value to compare with (use --force)"
    elif beats(float(value), old_value, mode):
        moved, reason = True, f"{metric} {value:.6g} beats v{prev}'s {old_value:.6g} (mode {mode})"
    elif force:
        moved, reason = True, f"--force: {metric} {value:.6g} does not beat v{prev}'s {_fmt(old_value)} (mode {mode})"
    else:
        moved, reason = False, f"{metric} {value:.6g} does not beat v{prev}'s {old_value:.6g} (mode {mode})"
    return AliasDecision(moved, reason, prev, old_value)


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.6g}"


def _requirements() -> list[str]:
    """Pinned requirements of the logged model (skips MLflow's slow requirement inference)."""
    import timm

    return [f"torch=={torch.__version__.split('+')[0]}", f"timm=={timm.__version__}"]


def _defined_here(net: nn.Module) -> bool:
    """The model's class comes from this repository (not timm): its pickle needs our code next to it."""
    return type(net).__module__.split(".")[0] in ("methods", "ssl_platform")


def _code_paths() -> list[str]:
    root = Path(__file__).resolve().parents[2]
    return [str(root / "methods"), str(root / "ssl_platform")]


def _version_metric(c, mv, metric: str) -> float | None:
    tag = (mv.tags or {}).get(f"{METRIC_TAG_PREFIX}{metric}")
    if tag is not None:
        return float(tag)
    src = (mv.tags or {}).get("source_run_id") or mv.run_id
    if src:
        v = c.get_run(src).data.metrics.get(metric)
        if _finite(v):
            return float(v)
    return None


def models_table(model: str, tracking_uri: str | None = None) -> str:
    """Versions of ``model`` with their metric, method, source run and aliases, newest first."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    c = _client(uri)
    registered = c.get_registered_model(model)
    aliases: dict[str, list[str]] = {}
    for a, v in (registered.aliases or {}).items():
        aliases.setdefault(str(v), []).append(a)
    versions = sorted(c.search_model_versions(f"name = '{model}'"), key=lambda mv: int(mv.version), reverse=True)
    rows = [("version", "aliases", "metric", "value", "method", "source run", "created")]
    for mv in versions:
        tags = mv.tags or {}
        name = tags.get("metric_name", "")
        value = tags.get(f"{METRIC_TAG_PREFIX}{name}", "")
        created = _iso(mv.creation_timestamp)
        rows.append((str(mv.version), ",".join(sorted(aliases.get(str(mv.version), []))) or "-", name or "-",
                     f"{float(value):.4f}" if value else "-", tags.get("method", "-"), tags.get("source_run_id", mv.run_id or "-"), created))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(cell.ljust(w) for cell, w in zip(r, widths)) for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return f"model {model} ({len(versions)} version(s), tracking {uri})\n" + "\n".join(lines)


def _iso(ms: int | None) -> str:
    import datetime as dt

    if not ms:
        return "-"
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


# ---- CLI ----------------------------------------------------------------------------------------------
def _cmd_promote(args: argparse.Namespace) -> int:
    res = promote(
        args.run_id, model=args.model, metric=args.metric, mode=args.mode, alias=args.alias, force=args.force,
        sweep=args.sweep, tracking_uri=args.tracking_uri,
    )
    print(f"[ssl_platform] registered {res.model} v{res.version} from run {res.run_id} ({res.metric}={res.value:.6g})")
    if res.alias_moved:
        print(f"[ssl_platform] alias {res.alias!r} -> v{res.version}: {res.reason}")
    else:
        print(f"[ssl_platform] alias {res.alias!r} stays on v{res.previous_version}: {res.reason}")
    print(f"[ssl_platform] load: mlflow.pytorch.load_model('models:/{res.model}@{res.alias}')")
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    print(models_table(args.model, args.tracking_uri))
    return 0


def register_cli(sub) -> None:
    track = f"MLflow tracking/registry URI (default: MLFLOW_TRACKING_URI or {DEFAULT_TRACKING_URI})"
    p = sub.add_parser("promote", help="register a run's (or a sweep's best trial's) encoder and move an alias if it wins")
    p.add_argument("run_id", nargs="?", help="MLflow run id of a training run")
    p.add_argument("--sweep", metavar="PARENT_RUN_ID", help="promote the best child run of this sweep parent run")
    p.add_argument("--model", required=True, help="registered model name")
    p.add_argument("--metric", default="knn_top1", help="metric that decides (default knn_top1)")
    p.add_argument("--mode", choices=("max", "min"), default="max")
    p.add_argument("--alias", default="champion")
    p.add_argument("--force", action="store_true", help="move the alias even if the new version does not win")
    p.add_argument("--tracking-uri", help=track)
    p.set_defaults(func=_cmd_promote)

    p = sub.add_parser("models", help="versions, metrics and aliases of a registered model")
    p.add_argument("model")
    p.add_argument("--tracking-uri", help=track)
    p.set_defaults(func=_cmd_models)
