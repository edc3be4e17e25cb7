"""Multi-stage pipelines: ``python -m ssl_platform chain experiments/chains/salt_digits.yaml``.

A chain spec names the chain and lists its stages in order; each stage is an inline run spec, a path to
one (``spec: path.yaml`` plus optional ``overrides: [key=value, ...]``), or just the path. The chain's own
``checkpoint`` and ``tracking`` sections apply to every stage, so all stages share one store::

    name: salt-digits
    checkpoint: {uri: s3://bucket/chains}
    tracking: {uri: sqlite:///mlruns.db, experiment: ssl-chains}
    stages:
      stage1: {spec: ../mae_vit_tiny_digits.yaml, overrides: [method.mask_type=multiblock]}
      stage2: {name: salt, method: {name: salt, teacher: "${stages.stage1.encoder}"}}

``${stages.NAME.encoder}`` is replaced by that (earlier) stage's final checkpoint URI once it has run; SALT
loads its frozen teacher from there (workers download an ``s3://`` URI first). Every stage runs as
``<chain>-<stage>`` with ``resume=True``: rerunning the chain skips stages whose final checkpoint is complete
and continues an interrupted stage from its last checkpoint. ``<checkpoint.uri>/<chain>/chain_state.json``
records stage -> run name, MLflow run id, final checkpoint URI and status. MLflow: one parent run for the
chain, a child run per stage; a stage using another's encoder is tagged with its URI and run id.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ssl_platform.launch.run import run_experiment
from ssl_platform.spec import SpecError, method_checkpoint_params, read_yaml, spec_from_dict
from ssl_platform.storage.run_checkpoints import remote_manifest
from ssl_platform.storage.s3 import filesystem, is_s3
from ssl_platform.storage.training_checkpoints import CheckpointError
from ssl_platform.storage.uri_files import read_text, write_text
from ssl_platform.tracking import run_log
from ssl_platform.tracking.outbox import RunRef

REF = re.compile(r"\$\{stages\.([A-Za-z0-9_-]+)\.([A-Za-z_]+)\}")
REF_FIELDS = ("encoder",)
CHAIN_KEYS = ("name", "stages", "checkpoint", "tracking")
STATE_FILE = "chain_state.json"
CHAIN_TAG = "ssl.chain"


@dataclass
class Stage:
    name: str
    raw: dict[str, Any]  # the stage's run spec, references not yet substituted
    overrides: list[str]
    source: str
    refs: list[tuple[str, str, str]]  # (dotted key, stage, field)


@dataclass
class Chain:
    name: str
    stages: list[Stage]
    root_uri: str  # checkpoint.uri shared by the stages
    tracking_uri: str
    experiment: str
    source: str
    endpoint_url: str | None = None  # checkpoint.endpoint_url of the stages (S3-compatible endpoint)
    tracking: Any = None  # the stages' tracking section (the first stage's)
    checkpoint: Any = None  # the stages' checkpoint section (the first stage's)

    @property
    def state_uri(self) -> str:
        return f"{self.root_uri.rstrip('/')}/{self.name}/{STATE_FILE}"

    def run_name(self, stage: str) -> str:
        return f"{self.name}-{stage}"


def _find_refs(node: Any, prefix: str = "") -> list[tuple[str, str, str]]:
    out: list[tuple[str, str, str]] = []
    if isinstance(node, dict):
        for k, v in node.items():
            out += _find_refs(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _find_refs(v, f"{prefix}.{i}")
    elif isinstance(node, str):
        out += [(prefix, m.group(1), m.group(2)) for m in REF.finditer(node)]
    return out


def _substitute(node: Any, values: dict[tuple[str, str], str]) -> Any:
    if isinstance(node, dict):
        return {k: _substitute(v, values) for k, v in node.items()}
    if isinstance(node, list):
        return [_substitute(v, values) for v in node]
    if isinstance(node, str):
        return REF.sub(lambda m: values[(m.group(1), m.group(2))], node)
    return node


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _stage_raw(name: str, entry: Any, base: Path, source: str) -> tuple[dict[str, Any], list[str], str]:
    key = f"stages.{name}"
    if isinstance(entry, str):
        entry = {"spec": entry}
    if not isinstance(entry, dict):
        raise SpecError(key, "an inline run spec, a spec path, or {spec: path, overrides: [...]}", entry, source)
    if "spec" in entry:
        extra = set(entry) - {"spec", "overrides"}
        if extra:
            raise SpecError(key, "only 'spec' and 'overrides' next to a spec path", sorted(extra), source)
        path = Path(str(entry["spec"]))
        candidates = [path] if path.is_absolute() else [base / path, Path.cwd() / path]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise SpecError(f"{key}.spec", "an existing run spec YAML (relative to the chain file or the cwd)", str(path), source)
        raw = read_yaml(found)
        raw.pop("sweep", None)
        overrides = entry.get("overrides") or []
        if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
            raise SpecError(f"{key}.overrides", "a list of key=value strings", overrides, source)
        return raw, list(overrides), str(found)
    return dict(entry), [], f"{source} ({key})"


def load_chain(path: str | Path, overrides: list[str] | None = None) -> Chain:
    """Read and validate a chain spec (every stage, every reference) without starting anything.

    ``overrides`` (dotlist) apply to every stage, e.g. ``checkpoint.uri=s3://bucket/chains``.
    """
    source = str(path)
    raw = read_yaml(path)
    unknown = set(raw) - set(CHAIN_KEYS)
    if unknown:
        raise SpecError(sorted(unknown)[0], f"a known chain key ({', '.join(CHAIN_KEYS)})", sorted(unknown)[0], source)
    name = raw.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise SpecError("name", "a chain name of letters, digits, '-', '_' or '.'", name, source)
    stages_raw = raw.get("stages")
    if not isinstance(stages_raw, dict) or not stages_raw:
        raise SpecError("stages", "a non-empty mapping stage name -> run spec (in run order)", stages_raw, source)
    shared = {k: raw[k] for k in ("checkpoint", "tracking") if isinstance(raw.get(k), dict)}
    base = Path(path).resolve().parent
    stages: list[Stage] = []
    for sname, entry in stages_raw.items():
        if not re.fullmatch(r"[A-Za-z0-9_-]+", str(sname)):
            raise SpecError(f"stages.{sname}", "a stage name of letters, digits, '-' or '_'", sname, source)
        stage_spec, stage_overrides, stage_source = _stage_raw(str(sname), entry, base, source)
        stage_spec = _deep_merge(stage_spec, shared)
        earlier = [s.name for s in stages]
        refs = _find_refs(stage_spec)
        for key, ref_stage, ref_field in refs:
            where = f"stages.{sname}.{key}"
            if ref_stage not in earlier:
                raise SpecError(where, f"a reference to an earlier stage (one of {earlier}) as ${{stages.NAME.encoder}}",
                                f"${{stages.{ref_stage}.{ref_field}}}", source)
            if ref_field not in REF_FIELDS:
                raise SpecError(where, f"${{stages.{ref_stage}.<field>}} with field one of {list(REF_FIELDS)}", ref_field, source)
        stages.append(Stage(str(sname), stage_spec, stage_overrides + list(overrides or []), stage_source, refs))
    chain = Chain(name, stages, "", "", "", source)
    first = None
    for stage in stages:  # validate every stage now, with placeholders for not-yet-produced encoders
        placeholder = {(s.name, f): f"{chain.root_uri or 'pending'}/{chain.run_name(s.name)}/final" for s in stages for f in REF_FIELDS}
        spec = stage_spec_for(stage, placeholder)
        first = first or spec
        if spec.checkpoint.uri != first.checkpoint.uri or spec.tracking.uri != first.tracking.uri:
            raise SpecError(f"stages.{stage.name}.checkpoint.uri", f"the same checkpoint.uri and tracking.uri as the first stage "
                            f"({first.checkpoint.uri}, {first.tracking.uri}); set them once at the chain's top level",
                            f"{spec.checkpoint.uri}, {spec.tracking.uri}", source)
    chain.root_uri, chain.tracking_uri, chain.experiment = first.checkpoint.uri, first.tracking.uri, first.tracking.experiment
    chain.endpoint_url = first.checkpoint.get("endpoint_url")
    chain.tracking, chain.checkpoint = first.tracking, first.checkpoint
    return chain


def stage_spec_for(stage: Stage, values: dict[tuple[str, str], str]) -> DictConfig:
    """The validated run spec of a stage with its ``${stages.X.encoder}`` references replaced by ``values``."""
    return spec_from_dict(_substitute(stage.raw, values), stage.overrides or None, source=stage.source)


# ---- state ---------------------------------------------------------------------------------------------
def load_state(chain: Chain, fs=None) -> dict[str, Any]:
    text = read_text(chain.state_uri, fs)
    return json.loads(text) if text else {"chain": chain.name, "parent_run_id": None, "stages": {}}


def save_state(chain: Chain, state: dict[str, Any], fs=None) -> None:
    state["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    write_text(chain.state_uri, json.dumps(state, indent=2, sort_keys=True), fs)


def _complete(uri: str | None, fs) -> bool:
    if not uri:
        return False
    try:
        remote_manifest(uri, fs)
        return True
    except (CheckpointError, OSError):
        return False


def _parent_run(chain: Chain, state: dict[str, Any]) -> run_log.TrackedRun:
    """The chain's MLflow parent run: the recorded one (or the newest ``chain:<name>``) reopened, else a new one.
    Queued: a tracking server that is down gets it when it answers."""
    return run_log.open_run(chain.tracking, f"chain:{chain.name}", None, resume=True, display_name=chain.name,
                            run_id_hint=state.get("parent_run_id"), journal=run_log.journal_for(chain.checkpoint, chain.name),
                            extra_tags={CHAIN_TAG: chain.name, "chain_state": chain.state_uri})


def _run_id(chain: Chain, spec: DictConfig, run_name: str) -> str | None:
    """The run id of a stage's run if the store answers within a few seconds (best effort: the state file is
    still written)."""
    return run_log.find_run_id(run_log.TrackedRun(RunRef(chain.tracking_uri, spec.tracking.experiment, run_name)))


@dataclass
class ChainResult:
    name: str
    parent_run_id: str
    stages: dict[str, dict[str, Any]]  # stage -> run_name, run_id, final_checkpoint, status, skipped
    state_uri: str


def run_chain(chain: Chain, *, require_state: bool = False, step_hooks: dict[str, list] | None = None) -> ChainResult:
    """Run the stages in order, skipping complete ones; returns the final chain state. ``step_hooks``: per stage
    name, :class:`ssl_platform.training.hooks.StepHook` objects for its workers (tests inject faults).

    Steps: :func:`_open_chain_run` -> per stage, :func:`_skip_stage` (complete before) or :func:`_run_stage`
    (-> :func:`_stage_tags`), then :func:`_record_outputs` -> :func:`_finish_chain`.
    """
    run_log.check_server(chain.tracking)  # tracking.require_server_at_start
    run = _open_chain_run(chain, require_state)
    try:
        for stage in chain.stages:
            entry = run.state["stages"].get(stage.name, {})
            if entry.get("status") == "FINISHED" and _complete(entry.get("final_checkpoint"), run.fs):
                _skip_stage(run, stage, entry)
            else:
                entry = _run_stage(run, stage, entry, (step_hooks or {}).get(stage.name))
            _record_outputs(run, stage, entry)
    except BaseException:
        run.parent.end("FAILED")
        run.parent.close()
        raise
    return _finish_chain(run)


@dataclass
class _ChainRun:
    """A chain being run: its state (``chain_state.json``, on ``fs``), its MLflow parent run and what its stages
    produced so far."""

    chain: Chain
    state: dict[str, Any]  # the state file's content: parent_run_id, stage -> entry
    fs: Any  # pyarrow filesystem of an s3:// checkpoint.uri, else None
    parent: run_log.TrackedRun  # the MLflow parent run
    values: dict[tuple[str, str], str] = field(default_factory=dict)  # (stage, field) -> its ${stages.X.field} value
    stage_runs: dict[str, str] = field(default_factory=dict)  # stage -> MLflow run id ("" when unknown)
    skipped: set[str] = field(default_factory=set)  # stages complete before this run

    def save(self) -> None:
        save_state(self.chain, self.state, self.fs)


def _open_chain_run(chain: Chain, require_state: bool) -> _ChainRun:
    """Load the chain state (``require_state``: refuse when there is none), open or reopen the MLflow parent run
    and record it in the state file."""
    fs = filesystem(chain.endpoint_url) if is_s3(chain.root_uri) else None
    state = load_state(chain, fs)
    if require_state and not state["stages"]:
        raise SpecError("--resume", f"an existing chain state at {chain.state_uri}", "none found")
    parent = _parent_run(chain, state)
    state["parent_run_id"] = parent.run_id or state.get("parent_run_id")
    save_state(chain, state, fs)
    return _ChainRun(chain, state, fs, parent)


def _skip_stage(run: _ChainRun, stage: Stage, entry: dict[str, Any]) -> None:
    """A stage whose final checkpoint an earlier run completed: not run again."""
    print(f"[chain {run.chain.name}] stage {stage.name}: complete ({entry['final_checkpoint']}), skipped", flush=True)
    run.skipped.add(stage.name)


def _stage_tags(run: _ChainRun, stage: Stage, spec: DictConfig) -> dict[str, str]:
    """MLflow tags of a stage's run: the chain and stage, and for each reference the URI and run id of the earlier
    stage it uses (also as ``<param>_uri`` / ``<param>_run_id`` for a method checkpoint parameter)."""
    tags = {CHAIN_TAG: run.chain.name, "ssl.chain_stage": stage.name}
    checkpoint_params = method_checkpoint_params(spec.method)
    for key, ref_stage, ref_field in stage.refs:
        tags[f"lineage.{key}"] = run.values[(ref_stage, ref_field)]
        tags[f"lineage.{ref_stage}_run_id"] = run.stage_runs[ref_stage]
        param = key.removeprefix("method.")
        if key.startswith("method.") and param in checkpoint_params:  # e.g. teacher_uri, teacher_run_id
            tags[f"{param}_uri"] = run.values[(ref_stage, ref_field)]
            tags[f"{param}_run_id"] = run.stage_runs[ref_stage]
    return tags


def _run_stage(run: _ChainRun, stage: Stage, previous: dict[str, Any], step_hooks: list | None) -> dict[str, Any]:
    """Run (or resume) one stage as ``<chain>-<stage>``; its state entry is saved RUNNING before, FAILED when the run
    fails or ends without a checkpoint, and FINISHED with its final checkpoint. Returns the entry."""
    chain = run.chain
    spec = stage_spec_for(stage, run.values)
    tags = _stage_tags(run, stage, spec)
    run_name = chain.run_name(stage.name)
    entry = {"run_name": run_name, "status": "RUNNING", "run_id": previous.get("run_id"), "final_checkpoint": None}
    run.state["stages"][stage.name] = entry
    run.save()
    print(f"[chain {chain.name}] stage {stage.name}: run {run_name} (method {spec.method.name})", flush=True)
    try:
        res = run_experiment(spec, run_name=run_name, resume=True, parent=run.parent, extra_tags=tags,
                             step_hooks=step_hooks)
    except BaseException:
        entry["status"] = "FAILED"
        entry["run_id"] = entry["run_id"] or _run_id(chain, spec, run_name)
        run.save()
        raise
    if not res.checkpoint_path:
        entry["status"] = "FAILED"
        run.save()
        raise RuntimeError(f"chain {chain.name}: stage {stage.name} finished without a checkpoint")
    entry.update(run_id=res.mlflow_run_id or None, final_checkpoint=res.checkpoint_path, status="FINISHED")
    run.save()
    return entry


def _record_outputs(run: _ChainRun, stage: Stage, entry: dict[str, Any]) -> None:
    """What later stages' ``${stages.NAME.encoder}`` references and lineage tags take from this stage."""
    for ref_field in REF_FIELDS:
        run.values[(stage.name, ref_field)] = entry["final_checkpoint"]
    run.stage_runs[stage.name] = entry["run_id"] or ""


def _finish_chain(run: _ChainRun) -> ChainResult:
    """Tag the parent run with every stage's final checkpoint and close it FINISHED."""
    chain, state, parent = run.chain, run.state, run.parent
    parent.set_tags({f"stage.{s}.final_checkpoint": e["final_checkpoint"] for s, e in state["stages"].items()})
    parent.end("FINISHED")
    run_log.close_and_report(parent)
    if parent.run_id and state.get("parent_run_id") != parent.run_id:
        state["parent_run_id"] = parent.run_id
        run.save()
    stages = {s: {**e, "skipped": s in run.skipped} for s, e in state["stages"].items()}
    return ChainResult(chain.name, parent.run_id or "", stages, chain.state_uri)


def chain_table(res: ChainResult) -> str:
    rows = [("stage", "status", "run", "MLflow run id", "final checkpoint")]
    for s, e in res.stages.items():
        status = "skipped (complete)" if e.get("skipped") else e.get("status", "")
        rows.append((s, status, e.get("run_name", ""), e.get("run_id") or "", e.get("final_checkpoint") or ""))
    widths = [max(len(str(r[i])) for r in rows) for i in range(5)]
    lines = [" | ".join(str(v).ljust(w) for v, w in zip(r, widths)) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join([*lines, f"chain state: {res.state_uri}", f"MLflow parent run: {res.parent_run_id}"])


def _cmd_chain(args: argparse.Namespace) -> int:
    chain = load_chain(args.spec, args.overrides)
    print(f"[ssl_platform] chain {args.spec} is valid: {chain.name}, stages {[s.name for s in chain.stages]}, "
          f"state {chain.state_uri}", flush=True)
    res = run_chain(chain, require_state=args.resume)
    print(chain_table(res), flush=True)
    return 0


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("chain", help="run a multi-stage chain (e.g. SALT: MAE stage 1 -> frozen teacher of stage 2)")
    p.add_argument("spec", help="chain spec YAML (experiments/chains/)")
    p.add_argument("overrides", nargs="*", help="dotlist overrides applied to every stage, e.g. checkpoint.uri=s3://b/p")
    p.add_argument("--resume", action="store_true",
                   help="require an existing chain state (rerunning without it resumes too: complete stages are skipped)")
    p.set_defaults(func=_cmd_chain)


__all__ = ["Chain", "ChainResult", "Stage", "load_chain", "run_chain", "stage_spec_for", "chain_table"]
