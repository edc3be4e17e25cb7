"""Command line: ``python -m ssl_platform run SPEC [key=value ...]`` and friends.

Overrides use OmegaConf dotlist syntax (``method.mask_ratio=0.5 optim.epochs=2``). Specs are validated
before Ray starts; errors name the key, the expected form and the value seen.
"""

from __future__ import annotations

import argparse
import sys

from ssl_platform.data.shards import register_cli as register_shards_cli
from ssl_platform.launch.chain import register_cli as register_chain_cli
from ssl_platform.launch.jobs import register_cli as register_jobs_cli
from ssl_platform.launch.run import result_table, run_experiment
from ssl_platform.spec import SpecError, dump_yaml, load_spec
from ssl_platform.sweeps.driver import register_cli as register_sweep_cli
from ssl_platform.tracking.model_registry import register_cli as register_registry_cli
from ssl_platform.tracking.sync import register_cli as register_sync_cli
from ssl_platform.training.watch import CollapseStop


def _cmd_run(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec, args.overrides)
    print(f"[ssl_platform] spec {args.spec} is valid: method={spec.method.name} data={spec.data.name} "
          f"epochs={spec.optim.epochs} workers={spec.scaling.num_workers}", flush=True)
    res = run_experiment(spec, run_name=args.name, resume=args.resume, resume_from=args.from_checkpoint)
    print(result_table(res), flush=True)
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec, args.overrides)
    print(dump_yaml(spec))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ssl_platform", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="train a run spec on Ray (local instance, or the cluster of RAY_ADDRESS)")
    p.add_argument("spec", help="experiment spec YAML")
    p.add_argument("overrides", nargs="*", help="OmegaConf dotlist overrides, e.g. method.mask_ratio=0.5")
    p.add_argument("--name", help="run name (default: <spec name>-<timestamp>); reuse it with --resume")
    p.add_argument("--resume", action="store_true", help="continue run --name from its latest checkpoint and MLflow run")
    p.add_argument("--from-checkpoint", help="start a new run from this training checkpoint directory")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("validate", help="validate a spec and print it resolved")
    p.add_argument("spec")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=_cmd_validate)
    for register in (register_sweep_cli, register_chain_cli, register_jobs_cli, register_registry_cli,
                     register_shards_cli, register_sync_cli):
        register(sub)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Like ``parse_args``, but ``key=value`` overrides may also come after flags (``submit SPEC --sweep a.b=1``).

    argparse fills a ``nargs="*"`` positional only from the words before the first flag; the words it leaves over
    are the command's overrides when every one of them is a dotlist item, else the usual error.
    """
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(item.startswith("-") or "=" not in item for item in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides or []) + extra
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_args(parser, argv)
    try:
        return int(args.func(args) or 0)
    except SpecError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except CollapseStop as err:  # eval.stop_on_collapse
        print(f"error: {err}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as err:
        ours = type(err).__module__.startswith(("ssl_platform", "methods"))
        if ours or (type(err).__module__ == "builtins" and isinstance(err, (ValueError, FileNotFoundError))):
            print(f"error: {err}", file=sys.stderr)
            return 2
        raise
