"""``make bench`` / ``python -m benchmarks.run``: measure, write ``benchmarks/results/<machine>.json``, a plot and
the generated tables of ``benchmarks/README.md``.

Sections (``--only a,b``): ``steps`` (train-step throughput of every method, FLOPs, MFU on CUDA, and SALT stage
2 against DINO and MAE), ``pipeline`` (views/s and masks/s; loader- or model-bound), ``augment`` (DINO multi-crop
views/s of the batched device-side augmentation against the per-sample path, and its resampling error), ``overhead``
(``TorchTrainer`` against a bare loop, Ray start-up), ``opt`` (AdamW / attention / autocast A/B), ``compile``
(``torch.compile`` A/B; default on CUDA only: minutes of compilation on a small CPU), ``shards`` (``prepare-data``
write images/s and Parquet vs WebDataset-tar read images/s on ~2,000 generated JPEGs), ``data`` (the streamed data
path on generated JPEG trees: CPU decode throughput against a ``DataLoader``, time to the first step and worker
peak RSS at two dataset sizes), ``peer`` (every method's step against stable-pretraining's, paired;
creates ``.peer-venv/`` on first use), ``memory`` (peak memory per worker, MAE ViT-B/16 at 224, batch 16, 2 CPU
workers: DDP vs FSDP, with and without activation checkpointing; ``benchmarks/memory.py``), ``tracking`` (epoch 2 to
8 of a digits run through the command line with a real MLflow server up, and killed for 45 s after epoch 2: the
stall; ``benchmarks/tracking_outage.py``), ``e2e`` (one epoch over ~2,000 generated JPEGs: ``ssl_platform run`` against
stable-pretraining's own trainer, DINO / iBOT / MAE / SALT, side by side; ``benchmarks/e2e.py``). ``salt`` is an alias of
``steps`` restricted to SALT, DINO and MAE. A run of some sections updates those sections of an existing
results file of the same machine and keeps the others.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import common
from benchmarks.common import METHODS, RESULTS_DIR

SECTIONS = ("steps", "pipeline", "augment", "opt", "compile", "overhead", "shards", "data", "peer", "memory", "tracking",
            "health", "e2e")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--quick", action="store_true", help="fewer warm-up steps, repeats, epochs and A/Bs (~2.5 min on 2 busy CPU cores with --threads 1)")
    ap.add_argument("--only", default="", help=f"comma-separated sections: {', '.join(SECTIONS)}, salt (default: all but compile on CPU)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement (default 5, quick 3)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps per model (default 2, quick 1)")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods for `steps`")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--batch-size", type=int, default=None, help="override the configuration's batch size")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's, the usable cores)")
    ap.add_argument("--tiny", action="store_true", help="a tiny model and batch (tests: checks the code, not the speed)")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory (default benchmarks/results)")
    ap.add_argument("--machine", default=None, help="machine label (default: from the CPU / GPU model)")
    ap.add_argument("--readme", type=Path, default=Path(__file__).resolve().parent / "README.md",
                    help="README whose generated part is rewritten")  # fmt: skip
    ap.add_argument("--peer-venv", type=Path, default=None, help="the peer's virtual environment (default .peer-venv, created if missing)")
    ap.add_argument("--peer-python", type=Path, default=None, help="an interpreter that imports stable_pretraining (instead of --peer-venv)")
    ap.add_argument("--peer-standin", action="store_true", help="peer section: the project in a subprocess plays the peer (tests; installs nothing)")
    ap.add_argument("--e2e-images", type=int, default=None, help="e2e: images in the generated folder (default 2000, quick 320)")
    ap.add_argument("--lock", type=Path, default=None, help="e2e: a lock file held around each side-by-side pair (a shared machine)")
    ap.add_argument("--report-only", action="store_true", help="measure nothing: redraw the plot and README from the results")
    ap.add_argument("--no-readme", action="store_true", help="do not rewrite the README")
    ap.add_argument("--no-plot", action="store_true", help="do not draw the throughput plot")
    return ap.parse_args(argv)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def select_sections(only: str, device: str) -> tuple[list[str], bool]:
    """``(sections, salt_only)``; ``salt`` alone means steps restricted to SALT, DINO and MAE."""
    if not only:
        return [s for s in SECTIONS if s != "compile" or device == "cuda"], False
    wanted = [s.strip() for s in only.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in (*SECTIONS, "salt")]
    if unknown:
        raise SystemExit(f"--only: unknown section(s) {unknown}; expected some of {[*SECTIONS, 'salt']}")
    salt_only = "salt" in wanted and "steps" not in wanted
    sections = [s for s in SECTIONS if s in wanted or (s == "steps" and "salt" in wanted)]
    return sections, salt_only


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    command = common.command_line(argv)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    cfg = common.bench_config(device, tiny=args.tiny, batch_size=args.batch_size)
    if args.threads:
        torch.set_num_threads(args.threads)
    sections, salt_only = select_sections(args.only, device)
    if args.report_only:
        sections = []
    quick = args.quick or args.tiny
    repeats = args.repeats or (3 if quick else 5)
    warmup = args.warmup if args.warmup is not None else (1 if quick else 2)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise SystemExit(f"--methods: unknown {bad}; expected some of {list(METHODS)}")
    if salt_only:
        methods = [m for m in ("mae", "dino", "salt") if m in methods] or ["mae", "dino", "salt"]

    machine = common.machine_info()
    label = args.machine or machine["label"] + ("-tiny" if args.tiny else "")
    machine["label"] = label
    out_path = args.out / f"{label}.json"
    data: dict[str, Any] = {}
    if out_path.exists():
        try:
            data = json.loads(out_path.read_text())
        except json.JSONDecodeError:
            data = {}
        if data.get("schema") != common.SCHEMA:
            data = {}
    if not args.report_only:
        data.update({"schema": common.SCHEMA, "machine": machine, "versions": common.versions(),
                     "command": command, "git_commit": common.git_commit(),
                     "updated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})  # fmt: skip
    elif not data:
        raise SystemExit(f"--report-only: no results at {out_path}")
    results = data.setdefault("sections", {})
    log(f"benchmarks on {label}: {cfg.describe()}; sections {sections}; repeats {repeats}, warm-up {warmup}")
    if device == "cpu":
        log("no CUDA device: the GPU configuration (ViT-S/16 at 224, bf16) and MFU are not measured")

    def record(name: str, fn) -> None:
        start = {"measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "loadavg_start": common.loadavg()}
        t0 = time.perf_counter()
        res = fn()
        res["_meta"] = {**start, "loadavg_end": common.loadavg(), "wall_s": round(time.perf_counter() - t0, 1),
                        "command": command, "git_commit": data["git_commit"], "versions": data["versions"],
                        "quick": quick}  # fmt: skip
        results[name] = res
        common.write_json(out_path, data)  # after every section: an interrupted run keeps what it measured

    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        work = Path(tmp)
        if "steps" in sections:
            from benchmarks.steps import run_steps

            record("steps", lambda: run_steps(cfg, methods, work, warmup, repeats, 1, log))
        if "pipeline" in sections:
            from benchmarks.pipeline import run_pipeline

            steps = results.get("steps", {}).get("methods", {})
            model_rates = {m: e["images_per_s"]["median"] for m, e in steps.items()}
            # loader batches are cheap and noisy: twice the repeats
            record("pipeline", lambda: run_pipeline(cfg, work, 2 * repeats, 16 if quick else 32, model_rates, log))
        if "augment" in sections:
            from benchmarks.augment import run_augment

            record("augment", lambda: run_augment(device, repeats, tiny=args.tiny, log=log))
        if "opt" in sections:
            from benchmarks import optimizations as O

            record("optimizations", lambda: {
                "adamw": O.adamw(cfg, work, repeats, log),
                "attention": O.attention(cfg, work, warmup, repeats, methods=("mae",) if quick else ("mae", "dino"), log=log),
                "autocast": O.autocast(cfg, work, warmup, repeats, log=log),
                "threads": None if quick else O.threads(cfg, work, warmup, repeats, log=log),
            })  # fmt: skip
        if "compile" in sections:
            from benchmarks import optimizations as O

            record("compile", lambda: O.compile_step(cfg, work, warmup, repeats, log=log))
        if "overhead" in sections:
            from benchmarks.overhead import run_overhead

            if args.tiny:
                ov = (2, 16, 0.9)
            elif device == "cuda":
                ov = (4, 128, 0.2)
            else:
                ov = (2, 32, 0.9) if quick else (4, 32, 0.8)
            record("overhead", lambda: run_overhead(*ov, device=device, threads=args.threads, log=log))
        if "shards" in sections:
            from benchmarks.shards import run_shards

            if args.tiny:
                sh = {"num_images": 24, "image_size": (64, 48), "shard_size": 8, "write_repeats": 1}
            else:
                sh = {"num_images": 500 if quick else 2000, "shard_size": 250, "write_repeats": 1 if quick else 2}
            record("shards", lambda: run_shards(work, repeats=repeats, log=log, **sh))

        if "data" in sections:
            from benchmarks.data import run_data

            if args.tiny:  # checks the code: a few small JPEGs, no Ray Train runs
                record("data", lambda: run_data(work, 2, (), 40, log, mean_size=(48, 64), with_scale=False))
            else:
                record("data", lambda: run_data(work, 2 if quick else 3, (1000, 8000), 2000, log,
                                                file_counts=(2000, 1_000_000)))
        if "tracking" in sections:  # issue 29: training time lost to a tracking-server outage (two CLI runs)
            from benchmarks.tracking_outage import run_tracking_outage

            record("tracking", lambda: run_tracking_outage(epochs=4 if args.tiny else 8,
                                                           outage_s=10.0 if args.tiny else 45.0, log=log))
        if "health" in sections:  # issue 30: the health metrics' share of the step
            from benchmarks.health import run_health

            record("health", lambda: run_health(2 if args.tiny else (3 if quick else 5), log,
                                                methods=("mae",) if args.tiny else ("mae", "dino"),
                                                batch_size=16 if args.tiny else 64))
        if "memory" in sections:
            from benchmarks.memory import run_memory

            record("memory", lambda: run_memory(batch=4 if args.tiny else 16, tiny=args.tiny, log=log))
        if "peer" in sections:
            from benchmarks import peer as P

            peer_cfg = P.peer_config(device, tiny=args.tiny)
            if args.batch_size:
                peer_cfg.batch_size = int(args.batch_size)
            venv = args.peer_venv or P.DEFAULT_PEER_VENV
            record("peer", lambda: P.run_peer(peer_cfg, methods, warmup, repeats, log, peer_python=args.peer_python,
                                              venv=venv, standin=args.peer_standin))  # fmt: skip

        if "e2e" in sections:  # issue 31: one epoch over a JPEG folder against the peer's own trainer
            record("e2e", lambda: run_e2e_section(args, methods, quick, work))

    if not args.no_plot:
        from benchmarks.report import plot_throughput

        if plot_throughput(data, args.out / f"{label}_throughput.png"):
            log(f"plot: {args.out / f'{label}_throughput.png'}")
    if not args.no_readme:
        from benchmarks.report import update_readme

        update_readme(args.readme, args.out)
        log(f"README: {args.readme}")
    log(f"results: {out_path}")
    return data


def run_e2e_section(args: argparse.Namespace, methods: list[str], quick: bool, work: Path) -> dict[str, Any]:
    """``e2e``: one epoch per method of ``--methods`` that it covers (DINO, iBOT, MAE, SALT), both libraries."""
    from benchmarks.e2e import METHODS as E2E_METHODS
    from benchmarks.e2e import E2EConfig, run_e2e

    cfg = E2EConfig(num_images=args.e2e_images or (320 if quick else 2000))
    return run_e2e(cfg, [m for m in methods if m in E2E_METHODS], work, log, peer_python=args.peer_python,
                   venv=args.peer_venv, lock=args.lock)


if __name__ == "__main__":
    main(sys.argv[1:])
