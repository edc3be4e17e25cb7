"""The benchmark code runs end to end on a tiny configuration and writes the documented results schema.

No timing is asserted here: performance is measured by ``make bench``, not by tests. No Ray (the ``overhead``
section is exercised by ``make bench`` itself).
"""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import report
from benchmarks.common import METHODS, SCHEMA, summarize
from benchmarks.pipeline import METHOD_VIEW_KIND
from benchmarks.run import main, select_sections

STAT_KEYS = {"median", "q1", "q3", "iqr", "n", "values"}


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()
    try:
        data = main(["--tiny", "--repeats", "1", "--warmup", "1", "--threads", "1", "--only", "steps,pipeline",
                     "--out", str(out), "--machine", "test-machine", "--no-readme"])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    return out, data


def _is_stat(s) -> bool:
    return isinstance(s, dict) and STAT_KEYS <= set(s) and s["n"] >= 1 and s["median"] > 0


def test_results_json_schema(tiny_results):
    out, data = tiny_results
    on_disk = json.loads((out / "test-machine.json").read_text())
    assert on_disk == json.loads(json.dumps(data))
    assert on_disk["schema"] == SCHEMA
    m = on_disk["machine"]
    assert m["label"] == "test-machine" and m["cpu_model"] and m["logical_cores"] >= 1 and isinstance(m["gpus"], list)
    assert {"python", "torch", "timm", "ray", "torchvision"} <= set(on_disk["versions"])
    assert on_disk["command"].endswith("--no-readme")
    assert set(on_disk["sections"]) == {"steps", "pipeline"}
    for section in on_disk["sections"].values():
        assert {"measured_at", "command", "wall_s", "loadavg_start", "loadavg_end"} <= set(section["_meta"])


def test_every_method_is_measured(tiny_results):
    steps = tiny_results[1]["sections"]["steps"]
    assert list(steps["methods"]) == list(METHODS)
    for name, e in steps["methods"].items():
        assert _is_stat(e["images_per_s"]) and _is_stat(e["step_s"]), name
        assert e["flops_per_step"] > 0 and e["params_trainable_m"] > 0, name
        assert e["mfu"] is None  # CPU: no peak to divide by
        if name != "mae":
            assert _is_stat(e["throughput_vs_mae"]), name
    assert steps["methods"]["dino"]["views_per_image"] == 4 and steps["methods"]["ibot"]["views_per_image"] == 2
    salt = steps["salt"]
    assert _is_stat(salt["step_time_vs_dino"]) and _is_stat(salt["step_time_vs_mae"])
    assert salt["flops_vs_dino"] > 0 and 0 < salt["teacher_share_of_step_flops"] < 1
    assert salt["teacher_trainable_params"] == 0


def test_pipeline_section(tiny_results):
    pipe = tiny_results[1]["sections"]["pipeline"]
    assert set(pipe["views"]) == {"multicrop", "global_views", "images"}
    for e in pipe["views"].values():
        for variant in ("platform", "platform_1_thread", "main_1_thread", "main_n_threads"):
            assert _is_stat(e[variant]["images_per_s"]) and _is_stat(e[variant]["views_per_s"]), variant
        assert _is_stat(e["one_thread_speedup_python_thread"]) and _is_stat(e["one_thread_speedup_main_thread"])
    assert any(k.startswith("multiblock") for k in pipe["masks"])
    # the loader bound is computed for the methods whose view layout the section measures (DINO, iBOT, MAE's kinds)
    assert set(pipe["bound"]) == set(METHOD_VIEW_KIND) & set(METHODS)
    assert all(e["bound_by"] in ("loader", "model") for e in pipe["bound"].values())


def test_markdown_and_plot(tiny_results, tmp_path):
    out, data = tiny_results
    text = report.render_machine(data)
    for name in METHODS:
        assert f"| {name} |" in text
    assert "SALT / DINO" in text and "Data pipeline" in text
    readme = tmp_path / "README.md"
    readme.write_text(f"# hand-written\n\n{report.BEGIN}\nold\n{report.END}\n\nhand-written tail\n")
    report.update_readme(readme, out)
    new = readme.read_text()
    assert new.startswith("# hand-written") and new.rstrip().endswith("hand-written tail") and "old" not in new
    assert "test-machine" in new


def test_shards_section(tmp_path):
    """``prepare-data`` write rate, Parquet and tar read rates on a tiny generated tree, and its table."""
    data = main(["--tiny", "--repeats", "2", "--only", "shards", "--out", str(tmp_path), "--machine", "test-machine",
                 "--no-readme", "--no-plot"])  # fmt: skip
    sh = data["sections"]["shards"]
    assert sh["tree"]["num_images"] == 24 and sh["num_shards"] == 3 and sh["chosen_format"] == "parquet"
    assert _is_stat(sh["write_images_per_s"]) and _is_stat(sh["decode_pil_1_thread_images_per_s"])
    for name in ("parquet", "tar"):
        assert _is_stat(sh["read"][name]["images_per_s"]) and sh["read"][name]["bytes_on_disk"] > 0
    assert _is_stat(sh["parquet_vs_tar_read"])
    assert "Sharded datasets" in report.render_machine(data) and "Parquet / tar" in report.render_machine(data)


def test_sections_and_stats():
    assert select_sections("", "cpu") == (["steps", "pipeline", "augment", "opt", "overhead", "shards", "data", "peer",
                                          "memory", "tracking", "health", "e2e"], False)
    assert "compile" in select_sections("", "cuda")[0]
    assert select_sections("salt", "cpu") == (["steps"], True)
    with pytest.raises(SystemExit):
        select_sections("nope", "cpu")
    s = summarize([1.0, 2.0, 3.0, 4.0, 100.0])
    assert s["median"] == 3.0 and s["q1"] == 2.0 and s["q3"] == 4.0 and s["iqr"] == 2.0 and s["n"] == 5


def test_view_dataset_batched_fetch_matches_per_sample():
    """``ViewDataset.__getitems__`` with 1 thread while augmenting gives the per-sample views and restores threads."""
    from torch.utils.data import default_collate

    from benchmarks.per_sample_views import MultiCropTransform, ViewDataset
    from ssl_platform.data.small_sets import make_synthetic_split

    split = make_synthetic_split(num_samples=12, image_size=16).train
    ds = ViewDataset(split, MultiCropTransform(16, 8, n_global=2, n_local=2), transform_threads=1)
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    batched = default_collate(ds.__getitems__([0, 1, 2]))
    assert torch.get_num_threads() == threads
    torch.manual_seed(0)
    single = default_collate([ds[i] for i in (0, 1, 2)])
    for key in ("global_views", "local_views"):
        for a, b in zip(batched[key], single[key]):
            torch.testing.assert_close(a, b)


def test_augment_section(tmp_path):
    """The ``augment`` section: batched vs per-sample DINO multi-crop views/s, paired, and the resampling PSNR."""
    threads = torch.get_num_threads()
    try:
        data = main(["--tiny", "--repeats", "1", "--threads", "1", "--only", "augment", "--out", str(tmp_path),
                     "--machine", "test-machine", "--no-readme", "--no-plot"])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    aug = data["sections"]["augment"]
    (e,) = aug["settings"].values()
    assert e["views_per_image"] == e["n_global"] + e["n_local"] == 4 and e["batched_device"] == "cpu"
    for path in ("batched", "per_sample"):
        assert _is_stat(e[path]["images_per_s"]) and _is_stat(e[path]["views_per_s"]), path
    assert _is_stat(e["speedup"])
    psnr = e["resample_difference"]
    assert all(_is_stat(psnr[f"{k}_vs_{m}_psnr_db"]) for k in ("global", "local") for m in ("bicubic_aa", "bilinear_aa"))
    text = report.render_machine(data)
    assert "Batched augmentation on the device" in text and "| tiny (natural photographs" in text


def test_data_section(tmp_path, monkeypatch, ray_session):
    """The streamed CPU side (Ray Data decode) against the DataLoader baselines on a tiny JPEG tree, and its table."""
    monkeypatch.setenv("SSL_PLATFORM_BENCH_CACHE", str(tmp_path / "cache"))
    import importlib

    import benchmarks.data

    importlib.reload(benchmarks.data)
    data = main(["--tiny", "--only", "data", "--out", str(tmp_path), "--machine", "test-machine", "--no-readme", "--no-plot"])
    th = data["sections"]["data"]["throughput"]
    assert th["images"] == 40 and th["cores"] >= 1
    for name in ("platform_ray_data_decode", "dataloader_multicrop_per_sample", "dataloader_decode_resize"):
        assert _is_stat(th["images_per_s_per_core"][name])
    assert _is_stat(th["platform_vs_multicrop_dataloader"]) and _is_stat(th["platform_vs_decode_dataloader"])
    assert "Streamed data path" in report.render_machine(data)


def test_peer_section_with_the_project_standing_in(tmp_path):
    """The ``peer`` section's driver, worker protocol (a persistent subprocess over stdin/stdout), pairing and
    report, with the project itself playing the peer in the subprocess (``--peer-standin``): nothing is installed.
    Creating the peer's own venv is exercised by ``make bench`` only."""
    from benchmarks.peer_worker import METHODS as PEER_METHODS

    threads = torch.get_num_threads()
    try:
        data = main(["--tiny", "--only", "peer", "--peer-standin", "--repeats", "2", "--warmup", "1", "--threads", "1",
                     "--out", str(tmp_path), "--machine", "peer-test", "--no-readme", "--no-plot"])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    peer = json.loads((tmp_path / "peer-test.json").read_text())["sections"]["peer"]
    assert peer == json.loads(json.dumps(data["sections"]["peer"]))
    assert peer["peer"]["standin"] and peer["peer"]["library"] == "project" and peer["threads"] == 1
    compared = ["mae", "dino", "ibot", "data2vec", "salt", "simclr", "byol", "mocov3", "vicreg", "barlow_twins", "ijepa",
                "dinov2"]
    assert list(peer["methods"]) == [m for m in METHODS if m in PEER_METHODS] == compared
    for name, e in peer["methods"].items():
        for side in ("project", "peer"):
            assert _is_stat(e[side]["step_s"]) and _is_stat(e[side]["images_per_s"]), (name, side)
            assert e[side]["step_s"]["n"] == 2 and e[side]["flops_per_step"] > 0, (name, side)
        assert _is_stat(e["speedup"]) and e["speedup"]["n"] == 2, name
        # the same code builds both sides: the same FLOPs, and the same first loss (same seed, weights, inputs)
        assert e["project"]["flops_per_step"] == e["peer"]["flops_per_step"], name
        assert e["project"]["params_trainable_m"] == e["peer"]["params_trainable_m"], name
        assert e["project"]["first_step_loss"] == pytest.approx(e["peer"]["first_step_loss"], rel=1e-4), name
    text = report.render_machine(json.loads((tmp_path / "peer-test.json").read_text()))
    assert "Against the peer library" in text and "standing in for the peer" in text
    for name in peer["methods"]:
        assert f"| {name} |" in text


def test_peer_tiny_configuration_needs_the_standin():
    from benchmarks.peer import peer_config, run_peer

    with pytest.raises(ValueError, match="stand-in"):
        run_peer(peer_config("cpu", tiny=True), ["mae"], 1, 1, log=lambda _: None)
    with pytest.raises(ValueError, match="no method"):
        run_peer(peer_config("cpu", tiny=True), ["apl"], 1, 1, log=lambda _: None, standin=True)


def test_e2e_times_the_epoch_from_its_first_step_and_reports_the_ratio(tiny_spec, tmp_path):
    """The ``e2e`` section's parts that need neither Ray nor the peer: the run id from the table ``ssl_platform run``
    prints, the epoch's time from its first step (``epoch_time_s - first_batch_wait_s``, which the training loop now
    reports), the specs it writes for every method, and the report's ratios against the targets."""
    from benchmarks.e2e import METHODS as E2E_METHODS
    from benchmarks.e2e import E2EConfig, compare, epoch_timing, project_spec, run_id_from_output
    from ssl_platform.launch.run import RunResult, result_table
    from ssl_platform.spec import spec_from_dict
    from ssl_platform.training.trainer import local_worker, train_one_epoch

    run_id = "0123456789abcdef" * 2
    table = result_table(RunResult("r", run_id, {"epoch": 1, "loss": 0.5}, None, "/x", "sqlite:///m.db"))
    assert run_id_from_output("[r] epoch 1/1 done\n" + table + "\n") == run_id
    with pytest.raises(RuntimeError, match="MLflow run id"):
        run_id_from_output(result_table(RunResult("r", "", {}, None, "/x", "sqlite:///m.db")))

    worker, data, training = local_worker(tiny_spec())
    metrics = train_one_epoch(worker, data, training, 0)
    assert 0.0 < metrics["first_batch_wait_s"] < metrics["epoch_time_s"]
    timing = epoch_timing({**metrics, "global_step": training.global_step}, data.batch_size)
    assert timing["seconds"] == pytest.approx(metrics["epoch_time_s"] - metrics["first_batch_wait_s"], abs=1e-3)
    assert timing["images"] == data.steps_per_epoch * data.batch_size == 64
    with pytest.raises(RuntimeError, match="first_batch_wait_s"):
        epoch_timing({"epoch_time_s": 1.0, "global_step": 2}, 32)

    cfg = E2EConfig(num_images=40)
    for method in E2E_METHODS:  # every spec the section writes is a valid spec: one Train worker, a CPU left over
        spec = spec_from_dict(project_spec(method, cfg, tmp_path, tmp_path, teacher=str(tmp_path / "teacher")))
        assert spec.data.name == "image_folder" and spec.optim.epochs == 1 and spec.scaling.num_workers == 1
        assert spec.data.multicrop.n_local == (6 if method == "dino" else 0)
    slow, fast = {"images_per_s": 2.0}, {"images_per_s": 3.0}
    assert compare(fast, slow, 1.3) == {"project": fast, "peer": slow, "ratio": 1.5, "target": 1.3, "met": True}
    assert compare(slow, fast, 1.0)["met"] is False
    section = {"config": {"description": "d"}, "timing": "t", "order": "o", "methods": {
        "dino": compare({**fast, "seconds": 10.0, "images": 30}, {**slow, "seconds": 15.0, "images": 30}, 1.3),
        "mae": compare({**slow, "seconds": 15.0, "images": 30}, {**fast, "seconds": 10.0, "images": 30}, 1.0)}}
    text = "\n".join(report._render_e2e(section))
    assert "| dino | 3 (10, 30) | 2 (15, 30) | 1.5x | >= 1.3x | yes |" in text
    assert "| mae | 2 (15, 30) | 3 (10, 30) | 0.667x | >= 1.0x | **no** |" in text


def test_a_streamed_cpu_run_computes_on_the_cpus_it_leaves_for_decoding():
    """Issue 31's cause: the Train worker of a CPU run that streams its data stepped on its ``cpus_per_worker``
    threads while the CPUs left to Ray Data's decode tasks idled. It now takes its share of the node's CPUs."""
    from ssl_platform.training.ray_runtime import train_worker_threads

    assert train_worker_threads(1, 2.0, 1) == 2  # this machine: 1 worker of 1 CPU on 2 cores
    assert train_worker_threads(1, 16.0, 2) == 8  # two workers share the node
    assert train_worker_threads(4, 2.0, 1) == 4  # never fewer than Ray assigned
    assert train_worker_threads(1, 2.0, 4) == 1
    assert train_worker_threads(0, 2.0, 1) == 0  # no OMP_NUM_THREADS: torch's default stays
