"""Results JSON -> markdown tables (the generated part of benchmarks/README.md) and a throughput plot."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

BEGIN = "<!-- BEGIN GENERATED: python -m benchmarks.run rewrites this part from benchmarks/results/*.json -->"
END = "<!-- END GENERATED -->"


def _num(x: Any, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, int) and not isinstance(x, bool):
        return str(x)
    x = float(x)
    if abs(x) >= 100:
        return f"{x:.0f}"
    return f"{x:.{digits}g}"


def _stat(s: dict | None, digits: int = 3) -> str:
    """``median (IQR x)`` of a summary."""
    if not s or s.get("median") is None:
        return "n/a"
    return f"{_num(s['median'], digits)} (IQR {_num(s['iqr'], 2)})"


def _ratio(s: dict | None) -> str:
    """``median [q1, q3]`` of a paired-ratio summary."""
    if not s or s.get("median") is None:
        return "n/a"
    return f"{s['median']:.2f}x [{s['q1']:.2f}, {s['q3']:.2f}]"


def _header(cols: list[str]) -> list[str]:
    return ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]


def _row(cells: list[Any]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def render_machine(data: dict[str, Any], plot_name: str | None = None) -> str:
    m, v = data["machine"], data["versions"]
    sec = data.get("sections", {})
    gpu = ", ".join(f"{g['name']} ({g['memory_gib']} GiB)" for g in m.get("gpus", [])) or "none"
    out = [
        f"### `{m['label']}`",
        "",
        f"- machine: {m['cpu_model']}, {m['usable_cores']} usable cores ({m['logical_cores']} logical), "
        f"{m.get('memory_gib')} GiB RAM; GPU: {gpu}",
        f"- versions: python {v.get('python')}, torch {v.get('torch')}, torchvision {v.get('torchvision')}, "
        f"timm {v.get('timm')}, ray {v.get('ray')}, CUDA {v.get('cuda') or 'n/a'}",
        f"- last command: `{data.get('command')}` at {data.get('updated_at')} (git {data.get('git_commit')})",
    ]
    for name, s in sec.items():
        meta = s.get("_meta", {})
        out.append(f"- `{name}`: measured {meta.get('measured_at')} with `{meta.get('command')}`, "
                   f"{meta.get('wall_s')} s, load average {meta.get('loadavg_start')} -> {meta.get('loadavg_end')}")  # fmt: skip
    out.append("")

    steps = sec.get("steps")
    if steps:
        c = steps["config"]
        out += [
            "#### Train-step throughput (forward + backward + clip + AdamW + schedule + EMA, one fixed batch)",
            "",
            f"{c['description']}; {steps['warmup_steps']} warm-up steps, {steps['repeats']} repeats of "
            f"{steps['steps_per_repeat']} step(s), {steps['order']}. Ratios: median [q1, q3] of per-round ratios.",
            "",
        ]
        out += _header(["method", "images/s median (IQR)", "vs MAE (images/s)", "step s", "GFLOP/step",
                        "GFLOP/image", "achieved GFLOP/s", "MFU", "trainable M params", "views/image"])  # fmt: skip
        for name, e in steps["methods"].items():
            vs = "1.00x" if name == "mae" else _ratio(e.get("throughput_vs_mae"))
            mfu = f"{100 * e['mfu']:.1f}%" if e.get("mfu") is not None else "n/a"
            out.append(_row([name, _stat(e["images_per_s"]), vs, _num(e["step_s"]["median"]),
                             _num(e["flops_per_step"] / 1e9), _num(e["gflops_per_image"]),
                             _num(e["achieved_gflops_per_s"]), mfu, _num(e["params_trainable_m"]), e["views_per_image"]]))  # fmt: skip
        if plot_name:
            out += ["", f"![throughput per method](results/{plot_name})"]
        if any(e.get("note") for e in steps["methods"].values()):
            out += [""] + [f"- {n}: {e['note']}" for n, e in steps["methods"].items() if e.get("note")]
        out.append("")
        salt = steps.get("salt")
        if salt:
            out += ["#### SALT stage 2 against DINO and MAE (same backbone and batch)", ""]
            out += _header(["ratio", "step time (paired, median [q1, q3])", "FLOPs per step"])
            for ref in ("dino", "mae"):
                if f"step_time_vs_{ref}" in salt:
                    out.append(_row([f"SALT / {ref.upper()}", _ratio(salt[f"step_time_vs_{ref}"]), f"{salt[f'flops_vs_{ref}']:.2f}x"]))
            out += ["", f"The frozen teacher's forward (no gradient, {salt['teacher_trainable_params']} trainable "
                        f"parameters) is {100 * salt['teacher_share_of_step_flops']:.0f}% of SALT's FLOPs per step.", ""]  # fmt: skip

    peer = sec.get("peer")
    if peer:
        out += _render_peer(peer)
    e2e = sec.get("e2e")
    if e2e:
        out += _render_e2e(e2e)

    ov = sec.get("overhead")
    if ov:
        out += [
            "#### Platform overhead: `TorchTrainer` (1 worker) against a bare PyTorch loop",
            "",
            f"`{ov['spec']}` with {ov['overrides']}: {ov['steps_per_epoch']} steps / {ov['images_per_epoch']} "
            f"images per epoch on {ov['device']}, first {ov['warmup_epochs_dropped']} epoch(s) dropped.",
            "",
        ]
        out += _header(["", "bare loop", "TorchTrainer", "ratio", "target"])
        out.append(_row(["epoch s, median (IQR)", _stat(ov["bare_epoch_s"]), _stat(ov["platform_epoch_s"]),
                         f"{_num(ov['epoch_ratio'])}x", f"<= {ov['epoch_ratio_target']:.2f}x"]))  # fmt: skip
        out.append(_row(["whole run wall s (set-up + epochs)", _num(ov["bare_wall_s"]), _num(ov["platform_fit_wall_s"]),
                         f"{_num(ov['run_ratio'])}x", ""]))  # fmt: skip
        out.append(_row(["fixed cost s (wall - epochs)", _num(ov["bare_fixed_cost_s"]), _num(ov["platform_fixed_cost_s"]), "", ""]))
        out += ["", f"Ray start-up (`init_ray`, local instance with dashboard): {_num(ov['ray_startup_s'])} s; "
                    f"shutdown {_num(ov['ray_shutdown_s'])} s (not in the ratios).", ""]  # fmt: skip

    pipe = sec.get("pipeline")
    if pipe:
        out += ["#### Data pipeline (per-sample views + collation through a `DataLoader`, `num_workers=0`)", ""]
        cores = pipe.get("usable_cores", "N")
        out += ["`ViewDataset` as the platform builds it (augmentation with the process's "
                f"{cores} torch threads) and with `transform_threads=1`, in a Python thread (as `train_loop_per_worker` "
                "runs in a Ray Train worker) and in the main thread (a plain script); batches of the variants "
                "interleaved, ratios paired.", ""]  # fmt: skip
        out += _header(["view kind (method)", "views/image", f"images/s: platform ({cores} threads, Python thread)",
                        "views/s", "1 thread, Python thread", "1 vs N, Python thread", f"{cores} threads, main thread",
                        "1 thread, main thread", "1 vs N, main thread"])  # fmt: skip
        for kind, e in pipe["views"].items():
            out.append(_row([f"{kind} ({e['method']})", e["views_per_image"], _stat(e["platform"]["images_per_s"]),
                             _num(e["platform"]["views_per_s"]["median"]), _stat(e["platform_1_thread"]["images_per_s"]),
                             _ratio(e["one_thread_speedup_python_thread"]), _stat(e["main_n_threads"]["images_per_s"]),
                             _stat(e["main_1_thread"]["images_per_s"]), _ratio(e["one_thread_speedup_main_thread"])]))  # fmt: skip
        out += ["", "Mask generation (inside the methods' forward, on the device, vectorised over the batch):", ""]
        out += _header(["generator", "grid", "images/s median (IQR)"])
        for name, e in pipe["masks"].items():
            out.append(_row([name, "x".join(map(str, e["grid"])), _stat(e["images_per_s"])]))
        if pipe.get("bound"):
            out += ["", "Loader or model? (loader and model run one after the other with `num_workers=0`)", ""]
            out += _header(["method", "loader images/s", "model images/s", "loader share of a step", "bound by"])
            for name, e in pipe["bound"].items():
                out.append(_row([name, _num(e["loader_images_per_s"]), _num(e["model_images_per_s"]),
                                 f"{100 * e['loader_share_of_serial_step']:.0f}%", e["bound_by"]]))  # fmt: skip
        out.append("")

    sh = sec.get("shards")
    if sh:
        t = sh["tree"]
        out += ["#### Sharded datasets (`prepare-data`): write, read, and the format choice", "",
                f"{t['num_images']} generated JPEGs around {t['size_around'][0]}x{t['size_around'][1]} (mixed sizes, "
                f"{t['mean_kb']} KB each, {t['total_mb']} MB), {t['num_classes']} classes, {sh['num_shards']} shards of "
                f"{sh['shard_size']}; one process, warm page cache; the two readers alternate per round, ratio paired.", ""]  # fmt: skip
        out += _header(["measurement", "images/s median (IQR)", "MB/s median", "bytes on disk"])
        out.append(_row([f"write: `prepare-data` end to end ({sh['workers']} threads: read + PIL check + Parquet + SHA-256)",
                         _stat(sh["write_images_per_s"]), "", ""]))  # fmt: skip
        for name, label in (("parquet", "read: Parquet, pyarrow `iter_batches(columns=[image, label])`"),
                            ("tar", "read: WebDataset-style tar, stdlib `tarfile` stream")):  # fmt: skip
            e = sh["read"][name]
            out.append(_row([label, _stat(e["images_per_s"]), _num(e["mb_per_s"]["median"]), e["bytes_on_disk"]]))
        out.append(_row(["read: Parquet / tar (paired)", _ratio(sh["parquet_vs_tar_read"]), "", ""]))
        out.append(_row(["for scale: PIL decode to RGB, 1 thread", _stat(sh["decode_pil_1_thread_images_per_s"]), "", ""]))
        out += ["", f"Chosen format: {sh['chosen_format']}.", ""]
    aug = sec.get("augment")
    if aug:
        out += ["#### Batched augmentation on the device vs per-sample transforms (DINO multi-crop)", ""]
        out += [f"`ssl_platform.data.augment.BatchViews` on a uint8 canvas batch against `MultiCropTransform` per image + "
                f"`multicrop_collate` on the CPU, same decoded images; {aug['order']}; {aug['torch_threads']} torch "
                "thread(s).", ""]  # fmt: skip
        out += _header(["setting", "views (global + local, px)", "batched device", "batched views/s",
                        "per-sample views/s (CPU)", "speed-up (paired)"])  # fmt: skip
        for name, e in aug["settings"].items():
            out.append(_row([f"{name} ({e['source']}, canvas {e['canvas']}, batch {e['batch']})",
                             f"{e['n_global']} x {e['global_size']} + {e['n_local']} x {e['local_size']}",
                             e["batched_device"], _stat(e["batched"]["views_per_s"]), _stat(e["per_sample"]["views_per_s"]),
                             _ratio(e["speedup"])]))  # fmt: skip
        diffs = [(name, e["resample_difference"]) for name, e in aug["settings"].items() if e.get("resample_difference")]
        if diffs:
            out += ["", "Resampling of the batched path on the CPU (PyTorch's uint8 antialiased kernel per crop, the "
                        "per-sample path's own) against torchvision's float resize of the same crop boxes with the same "
                        "filter, PSNR in dB (median, IQR; higher = closer; what is left is uint8 rounding):", ""]  # fmt: skip
            out += _header(["setting", "crop", "crop side / output side", "bicubic + antialias (DINO, iBOT)",
                            "bilinear + antialias (single view)"])  # fmt: skip
            for name, d in diffs:
                for kind in ("global", "local"):
                    out.append(_row([name, kind, _stat(d[f"{kind}_crop_to_output_side"]),
                                     _stat(d[f"{kind}_vs_bicubic_aa_psnr_db"]), _stat(d[f"{kind}_vs_bilinear_aa_psnr_db"])]))  # fmt: skip
        out.append("")

    dat = sec.get("data")
    if dat:
        th = dat["throughput"]
        out += ["#### Streamed data path: CPU decoding, time to first step and worker memory", "",
                f"{th['images']} generated JPEGs ({th.get('tree', '')}); {th['cores']} cores; variants alternate per round. The "
                f"platform's CPU side decodes into {th['canvas']} px canvases (augmentation runs on the device); the "
                "DataLoader baselines use torchvision's ImageFolder with num_workers = cores.", ""]  # fmt: skip
        out += _header(["CPU pipeline", "images/s per core, median (IQR)"])
        for name, e in th["images_per_s_per_core"].items():
            out.append(_row([name, _stat(e)]))
        out.append(_row(["platform / DataLoader + per-sample multi-crop (paired)", _ratio(th["platform_vs_multicrop_dataloader"])]))
        out.append(_row(["platform / DataLoader + decode-resize only (paired)", _ratio(th["platform_vs_decode_dataloader"])]))
    sc = dat.get("scale") if dat else None
    if sc:
        sizes = sorted(int(k) for k in sc if k.isdigit())
        out += ["", "Through `run_experiment` (1 Train worker, `image_folder`, evaluation off): wall time from the call to the "
                "first step, and the worker process's peak RSS after 8 steps.", ""]  # fmt: skip
        out += _header(["images", "time to first step, s", "worker peak RSS, MB"])
        for n in sizes:
            out.append(_row([n, _stat(sc[str(n)]["time_to_first_step_s"]), _stat(sc[str(n)]["worker_max_rss_mb"])]))
        out.append(_row([f"ratio {sizes[-1]} / {sizes[0]}", sc[f"time_to_first_step_s_ratio_{sizes[-1]}_vs_{sizes[0]}"],
                         sc[f"worker_max_rss_mb_ratio_{sizes[-1]}_vs_{sizes[0]}"]]))  # fmt: skip
        out.append("")

    opt = sec.get("optimizations")
    comp = sec.get("compile")
    if opt or comp:
        out += ["#### Optimisations, A/B (paired per round; > 1 means the first option is faster)", ""]
        out += _header(["change", "measured", "A", "B"])
        if opt and "adamw" in opt:
            a = opt["adamw"]
            base = a["default_without_fused"]
            cells = ", ".join(f"{k.removesuffix('_ms')} {_stat(a[k])}" for k in a if k.endswith("_ms"))
            ratio = _ratio(a.get("fused_vs_default_time"))
            out.append(_row([f"AdamW fused vs {base} (time ratio, < 1 = fused faster)", ratio, f"ms per step: {cells}", a["platform_uses"]]))
        if opt and "attention" in opt:
            for m, e in opt["attention"].items():
                out.append(_row([f"SDPA vs explicit attention, {m} step", _ratio(e["sdpa_speedup"]),
                                 f"SDPA {_stat(e['sdpa_images_per_s'])} img/s", f"explicit {_stat(e['explicit_images_per_s'])} img/s"]))  # fmt: skip
        if opt and "autocast" in opt:
            e = opt["autocast"]
            out.append(_row([f"bf16 autocast vs fp32, {e['method']} step", _ratio(e["bf16_speedup"]),
                             f"bf16 {_stat(e['bf16_images_per_s'])} img/s", f"fp32 {_stat(e['fp32_images_per_s'])} img/s"]))  # fmt: skip
        if opt and opt.get("threads"):
            e = opt["threads"]
            out.append(_row([f"{e['threads']} torch threads vs 1, {e['method']} step, main thread", _ratio(e["n_threads_speedup"]),
                             f"{e['threads']} threads {_stat(e['n_threads_images_per_s'])} img/s",
                             f"1 thread {_stat(e['one_thread_images_per_s'])} img/s"]))  # fmt: skip
            out.append(_row([f"{e['threads']} torch threads vs 1, {e['method']} step, in a Python thread (as in a Ray Train worker)",
                             _ratio(e["n_threads_python_thread_speedup"]),
                             f"{e['threads']} threads {_stat(e['n_threads_python_thread_images_per_s'])} img/s",
                             f"1 thread {_stat(e['one_thread_images_per_s'])} img/s"]))  # fmt: skip
        if comp:
            out.append(_row([f"torch.compile vs eager, {comp['method']} step", _ratio(comp["compile_speedup"]),
                             f"compiled {_stat(comp['compiled_images_per_s'])} img/s, first step {comp['first_step_s']} s, "
                             f"inductor cache: {comp.get('inductor_cache', 'unknown')}",
                             f"eager {_stat(comp['eager_images_per_s'])} img/s"]))  # fmt: skip
        if pipe:
            for kind, e in pipe["views"].items():
                out.append(_row([f"1 torch thread during augmentation vs {pipe.get('usable_cores')}, {kind} views "
                                 "(in a Python thread, as in a Ray Train worker)", _ratio(e["one_thread_speedup_python_thread"]),
                                 f"in the main thread: {_ratio(e['one_thread_speedup_main_thread'])}", "see the pipeline table"]))  # fmt: skip
        out.append("")
    return "\n".join(out)


def _render_peer(peer: dict[str, Any]) -> list[str]:
    p = peer["peer"]
    who = "the project standing in for the peer (a test of the code, not a comparison)" if p.get("standin") else (
        f"`{p.get('requirement')}` (its own venv: torch {p.get('torch')}, python {p.get('python')})")
    target = peer.get("target_speedup")
    out = [
        "#### Against the peer library: stable-pretraining's train step at the same seed defaults",
        "",
        f"{peer['config']['description']}; {peer['threads']} torch threads both sides; peer: {who}; project torch "
        f"{peer.get('project_torch')}. {peer['warmup_steps']} warm-up step(s), {peer['repeats']} paired rounds "
        f"({peer['order']}). Step = forward + backward + fused AdamW + EMA teacher update. Losses: each library's "
        "first step on the same fixed batch (own random weights and masks: same scale expected, not equal values).",
        "",
    ]
    out += _header(["method", "project images/s (IQR)", "peer images/s (IQR)", "project / peer (paired, median [q1, q3])",
                    f">= {target}x" if target else "target", "GFLOP/step project / peer", "first-step loss project / peer"])  # fmt: skip
    for name, e in peer["methods"].items():
        ours, theirs = e["project"], e["peer"]
        ok = "n/a" if not target else ("yes" if e["speedup"]["median"] >= target else "**no**")
        out.append(_row([name, _stat(ours["images_per_s"]), _stat(theirs["images_per_s"]), _ratio(e["speedup"]), ok,
                         f"{_num(ours['flops_per_step'] / 1e9)} / {_num(theirs['flops_per_step'] / 1e9)}",
                         f"{_num(ours['first_step_loss'], 4)} / {_num(theirs['first_step_loss'], 4)}"]))  # fmt: skip
    out.append("")
    return out


def _render_e2e(e2e: dict[str, Any]) -> list[str]:
    """One epoch over a JPEG folder: the project's command line against the peer's training entry point."""
    c = e2e["config"]
    first = next(iter(e2e["methods"].values()), {}).get("peer", {})
    out = [
        "#### End to end: one epoch over a JPEG folder, `ssl_platform run` against stable-pretraining's trainer",
        "",
        f"{c['description']}; {e2e.get('cores')} cores. Project: `python -m ssl_platform run` (image_folder spec, 1 "
        f"Train worker reserving {e2e.get('project_cpus_per_worker')} CPU(s), the rest for Ray Data's decode; it steps "
        "on its share of the node's CPUs). Peer: "
        f"stable-pretraining {first.get('version')} (`spt.Manager` + Lightning, torchvision `ImageFolder`, its "
        f"transforms, {first.get('loader_workers')} DataLoader worker(s), {first.get('threads')} torch threads). "
        f"Timed {e2e['timing']}; {e2e['order']}.",
        "",
    ]
    out += _header(["method", "project images/s (s, images)", "peer images/s (s, images)", "project / peer", "target",
                    "met", "project wait for the first batch s", "wall s project / peer"])  # fmt: skip
    for name, e in e2e["methods"].items():
        ours, theirs = e["project"], e["peer"]
        out.append(_row([name, f"{_num(ours['images_per_s'])} ({_num(ours['seconds'])}, {ours['images']})",
                         f"{_num(theirs['images_per_s'])} ({_num(theirs['seconds'])}, {theirs['images']})",
                         f"{_num(e['ratio'])}x", f">= {e['target']}x", "yes" if e["met"] else "**no**",
                         _num(ours.get("first_batch_wait_s")),
                         f"{_num(ours.get('wall_s'))} / {_num(theirs.get('wall_s_outside'))}"]))  # fmt: skip
    out.append("")
    return out


def render_all(results_dir: Path) -> str:
    parts = []
    for path in sorted(results_dir.glob("*.json")):
        data = json.loads(path.read_text())
        plot = f"{path.stem}_throughput.png"
        parts.append(render_machine(data, plot if (results_dir / plot).exists() else None))
    return "\n".join(parts) if parts else "_No results yet: run `make bench`._\n"


def update_readme(readme: Path, results_dir: Path) -> None:
    text = readme.read_text() if readme.exists() else f"# Benchmarks\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        text = text.rstrip() + f"\n\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{BEGIN}\n\n{render_all(results_dir)}\n{END}{tail}")


def plot_throughput(data: dict[str, Any], path: Path) -> bool:
    """Bar chart of images/s per method (median, q1-q3 error bars); False when matplotlib is missing."""
    steps = data.get("sections", {}).get("steps")
    if not steps:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = list(steps["methods"])
    med = [steps["methods"][n]["images_per_s"]["median"] for n in names]
    lo = [m - steps["methods"][n]["images_per_s"]["q1"] for n, m in zip(names, med)]
    hi = [steps["methods"][n]["images_per_s"]["q3"] - m for n, m in zip(names, med)]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(names, med, yerr=[lo, hi], capsize=4, color="#4c72b0")
    ax.set_ylabel("images / s (median, q1-q3)")
    title = f"{data['machine']['label']}: train-step throughput\n" + "\n".join(textwrap.wrap(steps["config"]["description"], 90))
    ax.set_title(title, fontsize=8)
    top = max(m + h for m, h in zip(med, hi))
    for i, (m, h) in enumerate(zip(med, hi)):
        ax.text(i, m + h + 0.02 * top, f"{m:.0f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylim(0, 1.12 * top)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
