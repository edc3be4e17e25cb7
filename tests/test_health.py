"""Health metrics (methods/health.py) against independent computations on known inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from methods.health import HEALTH_METRICS, HealthInputs, health_metrics, normalized_std, rank_fraction


def _rankme_numpy(z: np.ndarray, eps: float = 1e-7) -> float:
    # RankMe, Garrido et al. 2023, Eq. 1: p_k = s_k / ||s||_1 + eps; exp(-sum p_k log p_k)
    s = np.linalg.svd(z, compute_uv=False)
    p = s / s.sum() + eps
    return float(np.exp(-(p * np.log(p)).sum()))


def test_identity_like_embeddings_have_full_rank():
    z = torch.eye(32, 64) * 3.0  # 32 orthogonal embeddings of equal norm: every singular value equal
    assert rank_fraction(z).item() == pytest.approx(1.0, abs=1e-4)


def test_constant_embeddings_have_rank_one_and_zero_std():
    z = torch.randn(1, 48).repeat(40, 1)
    assert rank_fraction(z).item() * 40 == pytest.approx(1.0, abs=1e-3)
    assert normalized_std(z).item() == pytest.approx(0.0, abs=1e-6)


def test_rank_matches_numpy_rankme_on_random_low_rank_batch():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(64, 5, generator=g) @ torch.randn(5, 96, generator=g)  # rank 5
    expected = _rankme_numpy(z.double().numpy()) / 64
    assert rank_fraction(z).item() == pytest.approx(expected, rel=1e-4)
    assert 1.0 / 64 < rank_fraction(z).item() <= 5.0 / 64 + 1e-6


def test_normalized_std_of_isotropic_gaussian_is_about_one():
    z = torch.randn(4096, 128, generator=torch.Generator().manual_seed(1))
    zn = z / z.norm(dim=1, keepdim=True)
    assert normalized_std(z).item() == pytest.approx(float(zn.std(dim=0).mean()) * math.sqrt(128), rel=1e-5)
    assert normalized_std(z).item() == pytest.approx(1.0, abs=0.02)


def test_teacher_entropy_and_kl_in_both_collapses():
    k = 64
    uniform = HealthInputs(teacher_logits=torch.zeros(8, k), student_logits=torch.zeros(8, k),
                           teacher_temperature=0.04, student_temperature=0.1)
    m = health_metrics(uniform, HEALTH_METRICS)
    assert m["teacher_entropy"].item() == pytest.approx(1.0, abs=1e-6)
    assert m["student_teacher_kl"].item() == pytest.approx(0.0, abs=1e-6)
    one_hot = torch.full((8, k), -50.0)
    one_hot[:, 3] = 50.0
    peaked = HealthInputs(teacher_logits=one_hot, student_logits=one_hot, teacher_temperature=0.04,
                          student_temperature=0.1)
    m = health_metrics(peaked, HEALTH_METRICS)
    assert m["teacher_entropy"].item() == pytest.approx(0.0, abs=1e-6)
    assert m["student_teacher_kl"].item() == pytest.approx(0.0, abs=1e-4)


def test_kl_equals_dino_cross_entropy_minus_entropy():
    # dino main_dino.py DINOLoss.forward: q = softmax((teacher - center) / temp); sum(-q * log_softmax(student / ts))
    g = torch.Generator().manual_seed(2)
    t, s, c = torch.randn(16, 32, generator=g), torch.randn(16, 32, generator=g), torch.randn(1, 32, generator=g)
    q = torch.softmax((t - c) / 0.04, dim=-1)
    ce = torch.sum(-q * torch.log_softmax(s / 0.1, dim=-1), dim=-1).mean()
    h = -(q * torch.log(q.clamp_min(1e-30))).sum(-1).mean()
    m = health_metrics(HealthInputs(teacher_logits=t, student_logits=s, teacher_center=c, teacher_temperature=0.04,
                                    student_temperature=0.1), HEALTH_METRICS)
    assert m["student_teacher_kl"].item() == pytest.approx((ce - h).item(), rel=1e-4, abs=1e-5)
    assert m["teacher_entropy"].item() == pytest.approx((h / math.log(32)).item(), rel=1e-4, abs=1e-6)


def test_scales_are_root_mean_square_and_only_declared_metrics_are_given():
    x = torch.tensor([[3.0, -4.0], [0.0, 0.0]])
    m = health_metrics(HealthInputs(targets=x, predictions=2 * x, embeddings=torch.randn(4, 8)),
                       ("target_scale", "prediction_scale"))
    assert set(m) == {"target_scale", "prediction_scale"}
    assert m["target_scale"].item() == pytest.approx(math.sqrt(25 / 4))
    assert m["prediction_scale"].item() == pytest.approx(2 * math.sqrt(25 / 4))
    tokens = torch.zeros(1, 3, 2)
    tokens[0, 1] = torch.tensor([6.0, 8.0])
    masked = health_metrics(HealthInputs(targets=tokens, token_mask=torch.tensor([[False, True, False]])),
                            ("target_scale",))
    assert masked["target_scale"].item() == pytest.approx(math.sqrt(50))
    with pytest.raises(ValueError, match="unknown health metrics"):
        health_metrics(HealthInputs(), ("rankme",))


def test_collapse_monitor_fires_once_after_a_sustained_window_and_restarts_on_recovery():
    from ssl_platform.training.collapse import CollapseMonitor, collapse_rules

    rules = collapse_rules({"rank_fraction_below": 0.05, "teacher_entropy_above": None})
    assert [r.metric for r in rules] == ["rank_fraction"]
    monitor = CollapseMonitor(rules, window_steps=20)
    assert monitor.observe(0, {"rank_fraction": 0.01}) == []
    assert monitor.observe(10, {"rank_fraction": 0.3}) == []  # recovered: the window restarts
    assert monitor.observe(15, {"rank_fraction": 0.02}) == []
    assert monitor.observe(30, {"rank_fraction": 0.02}) == []  # 15 steps < 20
    (event,) = monitor.observe(35, {"rank_fraction": 0.012})
    assert (event.since_step, event.step) == (15, 35)
    assert event.message(192) == ("collapse warning: rank_fraction 1.2% of 192 (below 0.05: the embeddings span few "
                                  "directions) for 20 steps (since step 15)")
    assert monitor.observe(60, {"rank_fraction": 0.01}) == []  # once per run


def test_cls_attention_maps_equal_timm_attention_weights():
    import timm

    from methods.visualize import cls_attention_maps

    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, patch_size=4, depth=2).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    maps = cls_attention_maps(vit, x)
    # timm's unfused path (vision_transformer.py Attention.forward: attn = (q * scale) @ k^T; softmax; attn_drop):
    # the weights entering attn_drop, row 0 (CLS) over the patch columns, as DINO's visualize_attention.py
    attn = vit.blocks[-1].attn
    attn.fused_attn = False
    seen = {}
    attn.attn_drop.register_forward_hook(lambda mod, inp, out: seen.setdefault("w", out))
    with torch.no_grad():
        vit(x)
    ref = seen["w"][:, :, 0, 1:].reshape(2, attn.num_heads, 8, 8)
    assert maps.shape == (2, attn.num_heads, 8, 8)
    torch.testing.assert_close(maps, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(maps.sum(dim=(-2, -1)), 1.0 - seen["w"][:, :, 0, 0], atol=1e-6, rtol=1e-5)


def test_reconstruction_panels_paste_visible_patches_and_undo_patch_normalisation():
    from methods import vit as V
    from methods.visualize import reconstruction_panels

    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    target = V.patchify(images, 4)
    normed = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    mask = torch.zeros(2, 16)
    mask[:, ::3] = 1
    panels = reconstruction_panels(images, normed, mask, 4, norm_pix=True)  # a perfect prediction
    assert [p.name for p in panels] == ["input", "masked", "reconstruction"]
    torch.testing.assert_close(panels[2].images, images, atol=1e-5, rtol=1e-4)
    hidden = V.patchify(panels[1].images, 4)[mask.bool()]
    assert hidden.abs().max() == 0


def test_pictures_are_written_as_png(tmp_path):
    from methods.visualize import Panel
    from ssl_platform.training.pictures import principal_components, write_embedding_plot, write_panels

    panels = [Panel("input", torch.rand(3, 3, 16, 16)), Panel("attention", torch.rand(3, 2, 4, 4), "heatmap")]
    out = write_panels(panels, (0.5,) * 3, (0.5,) * 3, tmp_path / "p.png", "epoch 1")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    feats = torch.randn(200, 2) @ torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    xy, share = principal_components(torch.cat([feats, torch.zeros(200, 3)], 1))
    assert share[0] > 0.8 and xy.shape == (200, 2)
    assert write_embedding_plot(feats, torch.arange(200) % 10, tmp_path / "e.png", "pca").stat().st_size > 1000


def test_online_probe_learns_and_leaves_the_encoder_gradients_alone():
    from ssl_platform.training.online_probe import OnlineProbe

    g = torch.Generator().manual_seed(0)
    encoder = torch.nn.Linear(8, 16)
    x, y = torch.randn(256, 8, generator=g), torch.randint(0, 3, (256,), generator=g)
    x[:, 0] += 3.0 * y  # separable along one input direction
    emb = encoder(x)
    emb.pow(2).mean().backward()
    reference = encoder.weight.grad.clone()
    probe = OnlineProbe(16, 3, "cpu", lr=1e-2)
    for _ in range(60):
        probe.step(emb, y)
    torch.testing.assert_close(encoder.weight.grad, reference, atol=0, rtol=0)
    assert probe.read_train_accuracy() > 0.6
    assert probe.accuracy(emb.detach(), y) > 0.85
    labels = y.clone()
    labels[:100] = -1  # unlabelled rows are left out
    probe.step(emb, labels)
    assert float(probe.seen) == 156


@pytest.mark.parametrize("method", ["mae", "dino"])
def test_online_probe_trains_on_clean_eval_features_and_leaves_the_run_alone(method, tmp_path):
    """With ``eval.online_probe`` a probe step is one AdamW step on ``method.embed`` of the batch's evaluation input
    (MAE: not the visible patches' embedding; DINO: not the teacher's augmented crop), and the method's weights and
    gradients after two training steps equal those of the same run without the probe (bit for bit)."""
    import copy
    from pathlib import Path

    from ssl_platform.spec import load_spec
    from ssl_platform.training.hooks import StepInfo
    from ssl_platform.training.online_probe import OnlineProbe
    from ssl_platform.training.trainer import local_worker, train_step

    recipe = Path(__file__).resolve().parents[1] / "experiments" / DIGITS_RECIPES[method][0]
    runs = {}
    for on in (False, True):
        spec = load_spec(recipe, [f"checkpoint.uri={tmp_path}", "data.batch_size=16", f"eval.online_probe={on}"])
        worker, data, training = local_worker(spec)
        training.model.train()  # as train_one_epoch (DINO's teacher head: BatchNorm on batch statistics)
        batches, generator = iter(data.train(0)), torch.Generator().manual_seed(0)
        for step in range(2):
            batch = next(batches)
            before = copy.deepcopy(training.watch.probe.state_dict()) if on and step == 1 else None
            train_step(worker, data, training, batch, generator, StepInfo("t", 0, 0, step, 2, step), step / 2)
            training.global_step += 1
        runs[on] = training
    off, on = runs[False], runs[True]
    assert off.watch.probe is None and float(on.watch.probe.seen) == 32
    for (name, a), b in zip(off.method.named_parameters(), on.method.parameters()):
        torch.testing.assert_close(b, a, atol=0, rtol=0, msg=name)
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, atol=0, rtol=0, msg=name)
    features = on.method.embed(data.eval_input(batch))  # the encoder after the step, on the clean view
    assert (features - on.last_output.embedding).abs().max() > 1e-2  # the step's own embedding is another input
    reference = OnlineProbe(features.shape[1], data.num_classes, "cpu", lr=spec.eval.online_probe_lr)
    reference.load_state_dict(before)
    reference.step(features, batch.labels)
    for (name, a), b in zip(reference.head.state_dict().items(), on.watch.probe.head.state_dict().values()):
        torch.testing.assert_close(b, a, msg=name)


def test_online_probe_every_k_steps(tmp_path):
    """``eval.online_probe_every: 2``: probe steps at global steps 0 and 2 of 3 (16 labelled images each)."""
    from pathlib import Path

    from ssl_platform.spec import load_spec
    from ssl_platform.training.hooks import StepInfo
    from ssl_platform.training.trainer import local_worker, train_step

    recipe = Path(__file__).resolve().parents[1] / "experiments" / DIGITS_RECIPES["mae"][0]
    spec = load_spec(recipe, [f"checkpoint.uri={tmp_path}", "data.batch_size=16", "eval.online_probe=true",
                              "eval.online_probe_every=2"])
    worker, data, training = local_worker(spec)
    seen = []
    for step, batch in zip(range(3), data.train(0)):
        train_step(worker, data, training, batch, torch.Generator(), StepInfo("t", 0, 0, step, 3, step), step / 3)
        training.global_step += 1
        seen.append(0 if training.watch.probe is None else int(training.watch.probe.seen))
    assert seen == [16, 16, 32]


DIGITS_RECIPES = {
    "mae": ("mae_vit_tiny_digits.yaml", {"target_scale", "prediction_scale"}, ["input", "masked", "reconstruction"]),
    "dino": ("dino_vit_tiny_digits.yaml", {"teacher_entropy", "student_teacher_kl"}, ["input", "head"]),
    "ibot": ("ibot_vit_tiny_digits.yaml", {"teacher_entropy", "student_teacher_kl"}, ["input", "head"]),
    "data2vec": ("data2vec_vit_tiny_digits.yaml", {"target_scale", "prediction_scale"}, []),
    "apl": ("apl_digits.yaml", set(), []),
}


@pytest.mark.parametrize("method", sorted(DIGITS_RECIPES))
def test_each_method_declares_its_health_metrics_and_pictures(method, tmp_path):
    """One training forward of each digits recipe gives every declared health metric (finite) from what the step
    already holds, and ``pictures`` gives the method's panels on evaluation images."""
    from pathlib import Path

    from methods.visualize import Panel
    from ssl_platform.spec import load_spec
    from ssl_platform.training.trainer import local_worker

    recipe, extra, panels = DIGITS_RECIPES[method]
    root = Path(__file__).resolve().parents[1]
    spec = load_spec(root / "experiments" / recipe, [f"checkpoint.uri={tmp_path}", "data.batch_size=16"])
    worker, data, training = local_worker(spec)
    batch = next(iter(data.train(0)))
    out = training.method(**data.views(batch, torch.Generator().manual_seed(0)))
    declared = set(type(training.method).health_metrics)
    assert declared == {"rank_fraction", "normalized_std"} | extra
    inputs = HealthInputs(**vars(out.health)) if out.health is not None else HealthInputs()
    inputs.embeddings = out.embedding if inputs.embeddings is None else inputs.embeddings
    values = health_metrics(inputs, tuple(declared))
    assert set(values) == declared and all(torch.isfinite(v) for v in values.values())
    assert 0 < values["rank_fraction"] <= 1
    shown = training.method.pictures(data.eval_input(batch)[:3])
    assert [p.name for p in shown] == panels and all(isinstance(p, Panel) and p.images.shape[0] == 3 for p in shown)
