"""SALT stage 2 (methods.salt) and the encoder checkpoint format (methods.checkpoint_io)."""

from __future__ import annotations

import json

import pytest
import torch

from methods.checkpoint_io import (
    ENCODER_FORMAT,
    CheckpointMismatchError,
    IncompleteCheckpointError,
    load_encoder_file,
    save_encoder,
    write_manifest,
)
from methods.mae import MAE
from methods.masks import MultiBlockMaskGenerator
from methods.registry import build_method
from methods.salt import SALT
from methods.vit import encode_visible, sincos_pos_embed_2d
from tests.conftest import layer_norm_reference, randomize_layer_norm_

ENC = {"img_size": 32, "patch_size": 4, "embed_dim": 64, "depth": 2, "num_heads": 2}
PRED = {"predictor_embed_dim": 32, "predictor_depth": 1, "predictor_num_heads": 2}


def _salt(**kw) -> SALT:
    return SALT(encoder_kwargs=kw.pop("encoder_kwargs", ENC), **PRED, **kw)


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_registered_and_seed_defaults():
    import inspect

    sig = inspect.signature(SALT.__init__)
    expected = {
        "encoder_name": "vit_tiny_patch16_224",
        "predictor_embed_dim": 384,
        "predictor_depth": 12,
        "predictor_num_heads": 16,
        "num_targets": 4,
        "context_scale": (0.85, 1.0),
        "target_scale": (0.15, 0.2),
        "context_aspect_ratio": (1.0, 1.0),
        "target_aspect_ratio": (0.75, 1.5),
        "teacher_state_dict": None,
        "pretrained": False,
    }
    names = list(sig.parameters)[1:]
    assert names[: len(expected)] == list(expected)
    assert {k: sig.parameters[k].default for k in expected} == expected
    extensions = {"encoder_kwargs": None, "teacher": None, "target_layout": "union", "target_layer_norm": True,
                  "mask_style": "ijepa", "min_keep": 10, "predictor_fix_init": True}
    assert {k: sig.parameters[k].default for k in names[len(expected) :]} == extensions
    model = build_method("salt", encoder_kwargs=ENC, **PRED)
    assert isinstance(model, SALT) and list(SALT.training_views({"image_size": 32})) == ["images"]


def test_teacher_frozen_in_eval_and_unchanged_by_training():
    torch.manual_seed(0)
    model = _salt()
    before = _state(model.teacher)
    student_before = _state(model.student)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    model.train()
    assert not model.teacher.training and model.student.training
    assert all(not p.requires_grad for p in model.teacher.parameters())
    for _ in range(3):
        out = model(torch.randn(4, 3, 32, 32))
        opt.zero_grad()
        out.loss.backward()
        assert all(p.grad is None for p in model.teacher.parameters())
        opt.step()
    after = _state(model.teacher)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(not torch.equal(student_before[k], v) for k, v in _state(model.student).items())
    model.train(True)
    assert not model.teacher.training


def test_student_is_fresh_not_a_copy_of_teacher():
    torch.manual_seed(0)
    model = _salt()
    t, s = model.teacher.state_dict(), model.student.state_dict()
    assert not torch.equal(t["blocks.0.attn.qkv.weight"], s["blocks.0.attn.qkv.weight"])


def test_student_sees_only_context_tokens():
    torch.manual_seed(0)
    model = _salt().train()
    seen: list[int] = []
    handle = model.student.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    masks = MultiBlockMaskGenerator((8, 8))(2, generator=torch.Generator().manual_seed(0))
    try:
        model(torch.randn(2, 3, 32, 32), masks=masks)
    finally:
        handle.remove()
    assert seen == [1 + masks.context_idx.shape[1]]  # CLS + context patches, never the full 64
    assert masks.context_idx.shape[1] < 64


@pytest.mark.parametrize("layout", ["union", "blocks"])
def test_loss_is_l1_at_target_positions_only(layout):
    torch.manual_seed(0)
    model = _salt(target_layout=layout).train()
    images = torch.randn(2, 3, 32, 32)
    masks = MultiBlockMaskGenerator((8, 8))(2, generator=torch.Generator().manual_seed(1))
    z = model.teacher_latents(images)

    def run(latents: torch.Tensor):
        model.teacher_latents = lambda imgs: latents
        torch.manual_seed(5)
        return model(images, masks=masks)

    base = run(z)
    # the formula: mean over predicted tokens and channels of |prediction - teacher latent at that position|
    if layout == "blocks":
        gathered = torch.stack([z[i, masks.target_idx[i]] for i in range(2)])  # [B, T, Kt, D]
        expected = (base.predictions - gathered).abs().mean()
    else:
        per_token = [(base.predictions[i][base.target_valid[i]] - z[i, masks.target_mask[i]]).abs().mean(-1) for i in range(2)]
        expected = torch.cat(per_token).mean()
        assert [int(v.sum()) for v in base.target_valid] == [int(m.sum()) for m in masks.target_mask]
    assert torch.allclose(base.loss, expected, atol=1e-6)
    outside = z.clone()
    outside[~masks.target_mask] += 100.0 * torch.randn_like(outside[~masks.target_mask])
    assert torch.equal(run(outside).loss, base.loss)
    inside = z.clone()
    inside[masks.target_mask] += 1.0
    assert not torch.allclose(run(inside).loss, base.loss)


@pytest.mark.parametrize("global_pool", ["token", "avg"])
def test_teacher_targets_are_layer_normed_per_token(global_pool):
    """Targets are the teacher's final-LayerNorm patch tokens, also for global_pool='avg', where timm applies
    that norm (fc_norm) only after pooling and the raw blocks output would otherwise be the target."""
    torch.manual_seed(0)
    model = _salt(encoder_kwargs={**ENC, "global_pool": global_pool}, target_layer_norm=False)
    teacher = model.teacher
    final_norm = teacher.fc_norm if global_pool == "avg" else teacher.norm
    assert isinstance(final_norm, torch.nn.LayerNorm)
    randomize_layer_norm_(final_norm)
    images = torch.randn(2, 3, 32, 32)
    # independently: patch embed + positions -> blocks -> LayerNorm(x) = (x - mean) / sqrt(var + eps) * w + b
    x = teacher._pos_embed(teacher.patch_embed(images))
    for block in teacher.blocks:
        x = block(x)
    expected = layer_norm_reference(x[:, teacher.num_prefix_tokens :], final_norm)
    assert torch.allclose(model.teacher_latents(images), expected, atol=1e-5)


def test_eval_returns_student_pooled_embedding_and_zero_loss():
    torch.manual_seed(0)
    model = _salt().eval()
    x = torch.randn(3, 3, 32, 32)
    out = model(x)
    assert out.loss.item() == 0.0 and out.embedding.shape == (3, 64)
    with torch.no_grad():
        ref = model.student.forward_head(model.student.forward_features(x), pre_logits=True)
    assert torch.allclose(out.embedding, ref, atol=1e-5)
    assert model.export_encoder() is model.student
    assert model.encoder_config() == {"encoder_name": "vit_tiny_patch16_224", "encoder_kwargs": ENC}


def _stage1_checkpoint(tmp_path, encoder_kwargs=ENC, name="vit_tiny_patch16_224"):
    torch.manual_seed(1)
    mae = MAE(encoder_name=name, mask_type="multiblock", encoder_kwargs=encoder_kwargs, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
    d = tmp_path / "stage1" / "ckpt_000010"
    save_encoder(d, "mae", mae.encoder_config(), mae.encoder_state_dict())
    return mae, d


def test_checkpoint_format_and_from_checkpoint_round_trip(tmp_path):
    mae, d = _stage1_checkpoint(tmp_path)
    payload = load_encoder_file(d)
    assert payload["format"] == ENCODER_FORMAT and payload["method"] == "mae"
    assert payload["encoder_name"] == "vit_tiny_patch16_224" and payload["encoder_kwargs"] == ENC
    manifest = json.loads((d / "manifest.json").read_text())
    assert "encoder.pt" in manifest["files"]
    for source in (d, d / "encoder.pt", str(d)):
        model = SALT.from_checkpoint(source, **PRED)  # encoder_kwargs taken from the checkpoint
        teacher = model.teacher.state_dict()
        for k, v in mae.encoder.state_dict().items():
            assert torch.equal(teacher[k], v), k
        assert model.encoder_kwargs == ENC
    # explicit matching kwargs, the `teacher=` constructor path and teacher_state_dict= agree
    m2 = SALT(teacher=d, encoder_kwargs=dict(ENC), **PRED)
    m3 = SALT(teacher_state_dict=mae.encoder.state_dict(), encoder_kwargs=ENC, **PRED)
    for k, v in mae.encoder.state_dict().items():
        assert torch.equal(m2.teacher.state_dict()[k], v) and torch.equal(m3.teacher.state_dict()[k], v)
    # the teacher is usable: finite loss
    out = m2.train()(torch.randn(2, 3, 32, 32))
    assert torch.isfinite(out.loss)


def test_incomplete_checkpoint_refused(tmp_path):
    _, d = _stage1_checkpoint(tmp_path)
    (d / "manifest.json").unlink()
    with pytest.raises(IncompleteCheckpointError, match="incomplete checkpoint"):
        SALT.from_checkpoint(d, **PRED)
    write_manifest(d)
    assert SALT.from_checkpoint(d, **PRED).teacher_source == str(d)


def test_mismatched_architecture_errors_name_the_mismatch(tmp_path):
    _, d = _stage1_checkpoint(tmp_path, encoder_kwargs={**ENC, "depth": 3})
    with pytest.raises(CheckpointMismatchError, match=r"depth: checkpoint 3 vs requested 2"):
        SALT.from_checkpoint(d, encoder_kwargs=ENC, **PRED)
    with pytest.raises(CheckpointMismatchError, match=r"'vit_tiny_patch16_224' != requested encoder_name 'vit_small_patch16_224'"):
        SALT.from_checkpoint(d, encoder_name="vit_small_patch16_224", **PRED)
    payload = load_encoder_file(d)
    # state dict of a deeper model: unexpected keys of block 2 are named
    with pytest.raises(CheckpointMismatchError, match=r"unexpected keys \[blocks\.2\."):
        SALT(teacher_state_dict=payload["state_dict"], encoder_kwargs=ENC, **PRED)
    # other embed_dim: shapes named
    _, d2 = _stage1_checkpoint(tmp_path / "b", encoder_kwargs={**ENC, "embed_dim": 32})
    sd = load_encoder_file(d2)["state_dict"]
    with pytest.raises(CheckpointMismatchError, match=r"shape mismatch \[.*checkpoint \(1, 1, 32\) vs model \(1, 1, 64\)"):
        SALT(teacher_state_dict=sd, encoder_kwargs=ENC, **PRED)
    # missing keys named
    good = load_encoder_file(_stage1_checkpoint(tmp_path / "c")[1])["state_dict"]
    good.pop("norm.weight")
    with pytest.raises(CheckpointMismatchError, match=r"missing keys \[norm\.weight\]"):
        SALT(teacher_state_dict=good, encoder_kwargs=ENC, **PRED)
    # a file of another format
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(Exception, match="expected format"):
        SALT.from_checkpoint(tmp_path / "other.pt", **PRED)


@pytest.mark.parametrize("extra", [{"class_token": False, "global_pool": "avg"}, {"reg_tokens": 2}])
def test_vits_without_cls_or_with_register_tokens(extra):
    torch.manual_seed(0)
    model = _salt(encoder_kwargs={**ENC, **extra}).train()
    masks = MultiBlockMaskGenerator((8, 8))(2, generator=torch.Generator().manual_seed(3))
    out = model(torch.randn(2, 3, 32, 32), masks=masks)
    out.loss.backward()
    u = int(masks.target_mask.sum(dim=1).max())
    assert torch.isfinite(out.loss) and out.target.shape == out.predictions.shape == (2, u, 64)
    assert model.eval()(torch.randn(2, 3, 32, 32)).embedding.shape == (2, 64)


@pytest.mark.parametrize("which", ["salt", "vpixel"])
def test_variable_length_encoders_run_without_cudnn_attention(which):
    """SALT's student/predictor and V-Pixel's encoder see a new sequence length every step; cuDNN attention
    would build an execution plan for each (3.9x SALT's step time on an H100), so it is off inside them and
    back on afterwards."""
    torch.manual_seed(0)
    if which == "salt":
        model = _salt().train()
        watched = [model.student.blocks[0], model.predictor.blocks[0].mlp]
    else:
        model = MAE(encoder_kwargs=ENC, mask_type="multiblock", decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2).train()
        watched = [model.encoder.blocks[0]]
    seen = []
    hooks = [m.register_forward_pre_hook(lambda *_: seen.append(torch.backends.cuda.cudnn_sdp_enabled())) for m in watched]
    before = torch.backends.cuda.cudnn_sdp_enabled()
    model(torch.randn(2, 3, 32, 32)).loss.backward()
    for h in hooks:
        h.remove()
    assert seen and not any(seen)
    assert torch.backends.cuda.cudnn_sdp_enabled() == before


def _unpadded_union_predictions(model: SALT, images: torch.Tensor, masks) -> list[torch.Tensor]:
    """Per sample, directly: the sequence [W cls; W ctx + pos(C); m + pos(U_b)] of that sample alone (its own
    union in raster order, no padding, no attention mask) through the predictor -> outputs at U_b, [|U_b|, D]."""
    pred = model.predictor
    latent = encode_visible(model.student, images, masks.context_idx)  # [B, 1 + Kc, D] (CLS + context)
    pos = sincos_pos_embed_2d(pred.predictor_embed_dim, (8, 8))
    out = []
    for i in range(images.shape[0]):
        x = pred.embed(latent[i])
        union = masks.target_mask[i].nonzero()[:, 0]  # this sample's target patches, each once
        seq = torch.cat([x[:1], x[1:] + pos[masks.context_idx[i]], pred.mask_token[0] + pos[union]])[None]
        for block in pred.blocks:
            seq = block(seq)
        out.append(pred.proj(pred.norm(seq[0, -len(union) :])))
    return out


def test_union_layout_equals_one_unpadded_sequence_per_sample():
    """The default layout: one predictor sequence per sample with the context and the UNION of its target blocks
    (overlapping blocks counted once). The padded batch gives every sample's predictions and the loss of a
    direct per-sample computation without padding."""
    torch.manual_seed(0)
    model = SALT(encoder_kwargs=ENC, predictor_embed_dim=32, predictor_depth=2, predictor_num_heads=2).train()
    images = torch.randn(3, 3, 32, 32)
    masks = MultiBlockMaskGenerator((8, 8))(3, generator=torch.Generator().manual_seed(4))
    sizes = masks.target_mask.sum(dim=1)
    assert len(set(sizes.tolist())) > 1, "the test needs unions of different sizes (padding)"
    assert (sizes < 4 * masks.target_idx.shape[-1]).any(), "the test needs overlapping target blocks"
    out = model(images, masks=masks)
    z = model.teacher_latents(images)
    direct = _unpadded_union_predictions(model, images, masks)
    for i, p in enumerate(direct):
        assert torch.allclose(out.predictions[i][out.target_valid[i]], p, atol=1e-5)
    errs = torch.cat([(p - z[i, masks.target_mask[i]]).abs().mean(-1) for i, p in enumerate(direct)])
    assert torch.allclose(out.loss, errs.mean(), atol=1e-6)
    out.loss.backward()
    assert model.predictor.mask_token.grad is not None and torch.isfinite(model.predictor.mask_token.grad).all()


def test_union_layout_has_fewer_predictor_tokens_than_blocks():
    """Tokens the predictor's per-token layers (here its first MLP) process: blocks layout ``B T (1 + Kc + Kt)``;
    union layout ``B (1 + Kc) + sum_b |U_b|``: each union once, and no row for the padding of smaller unions."""
    torch.manual_seed(0)
    seen: dict[str, int] = {}
    masks = MultiBlockMaskGenerator((8, 8))(2, generator=torch.Generator().manual_seed(0))
    assert len(set(masks.target_mask.sum(dim=1).tolist())) > 1, "the test needs unions of different sizes"
    for layout in ("union", "blocks"):
        model = _salt(target_layout=layout).train()
        mlp = model.predictor.blocks[0].mlp
        h = mlp.register_forward_pre_hook(lambda m, a, k=layout: seen.update({k: a[0].shape[:-1].numel()}))
        model(torch.randn(2, 3, 32, 32), masks=masks)
        h.remove()
    kc, kt = masks.context_idx.shape[1], masks.target_idx.shape[-1]
    assert seen["blocks"] == 2 * 4 * (1 + kc + kt)
    assert seen["union"] == 2 * (1 + kc) + int(masks.target_mask.sum())
    with pytest.raises(ValueError, match="target_layout"):
        _salt(target_layout="tubes")


def test_targets_are_renormalised_as_ijepa_and_vjepa():
    """facebookresearch/ijepa src/train.py:298 and jepa app/vjepa/train.py:426, ``forward_target``:
    ``h = target_encoder(imgs); h = F.layer_norm(h, (h.size(-1),))`` (the target encoder ends with its own norm)."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = _salt()
    teacher = model.teacher
    randomize_layer_norm_(teacher.norm)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        h = teacher.forward_features(images)[:, teacher.num_prefix_tokens :]  # target_encoder(imgs), patch tokens
        h = F.layer_norm(h, (h.size(-1),))  # normalize over feature-dim
    torch.testing.assert_close(model.teacher_latents(images), h, atol=1e-5, rtol=1e-5)
    model.target_layer_norm = False  # stable-pretraining's SALT: the final-norm tokens as they are
    raw = teacher.forward_features(images)[:, teacher.num_prefix_tokens :]
    torch.testing.assert_close(model.teacher_latents(images), raw)
    assert (raw - h).abs().max() > 0.1


def test_predictor_fix_init_weight_is_ijepas():
    """facebookresearch/ijepa src/models/vision_transformer.py:264-270 ``fix_init_weight``, ported and applied to a
    predictor built with the same seed but without it."""
    import math

    from methods.salt import SALTPredictor

    def fix_init_weight(self):
        def rescale(param, layer_id):
            param.div_(math.sqrt(2.0 * layer_id))

        for layer_id, layer in enumerate(self.predictor_blocks):
            rescale(layer.attn.proj.weight.data, layer_id + 1)
            rescale(layer.mlp.fc2.weight.data, layer_id + 1)

    torch.manual_seed(3)
    ours = SALTPredictor(64, 32, 3, 2, 64)
    torch.manual_seed(3)
    plain = SALTPredictor(64, 32, 3, 2, 64, fix_init=False)
    plain.predictor_blocks = plain.blocks
    fix_init_weight(plain)
    for a, b in zip(ours.state_dict().values(), plain.state_dict().values()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert ours.blocks[2].mlp.fc2.weight.std() < ours.blocks[0].mlp.fc2.weight.std()


def test_vjepa_mask_style_averages_two_mask_sets():
    """mask_style='vjepa': V-JEPA's two sets (8 x 0.15, 2 x 0.7; contexts = complements), loss = their mean."""
    torch.manual_seed(0)
    model = _salt(mask_style="vjepa").train()
    gens = model.mask_generators((8, 8))
    assert [(g.num_targets, g.target_scale, g.style) for g in gens] == [(8, (0.15, 0.15), "vjepa"), (2, (0.7, 0.7), "vjepa")]
    images = torch.randn(3, 3, 32, 32)
    masks = [g(3, step=0) for g in gens]
    out = model(images, masks=masks)
    single = [model(images, masks=m).loss for m in masks]
    torch.testing.assert_close(out.loss, (single[0] + single[1]) / 2)
    for m in masks:
        assert not (m.context_mask & m.target_mask).any()
    model.on_train_step(7, 10, 0.7)
    assert torch.isfinite(model(images).loss) and gens[0].calls == 8  # sizes seeded by the step


def test_bad_mask_style_is_refused():
    with pytest.raises(ValueError, match="mask_style"):
        _salt(mask_style="random")
    with pytest.raises(Exception, match="method.mask_style"):
        SALT.check_kwargs({"mask_style": "random", "pretrained": True}, prefix="method.")


def test_packed_predictor_equals_the_direct_computation_values_and_gradients():
    """The union layout runs the predictor's per-token layers on the real rows only (no padding rows,
    methods.vit.packed_block): its loss and the gradients of student and predictor equal those of the direct
    per-sample computation without padding (float64), and its padded prediction rows are zero."""
    torch.manual_seed(0)
    model = SALT(encoder_kwargs=ENC, predictor_embed_dim=32, predictor_depth=2, predictor_num_heads=2).double().train()
    images = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    masks = MultiBlockMaskGenerator((8, 8))(3, generator=torch.Generator().manual_seed(4))
    assert len(set(masks.target_mask.sum(dim=1).tolist())) > 1, "the test needs padding"
    params = [p for p in model.parameters() if p.requires_grad]
    out = model(images, masks=masks)
    assert torch.equal(out.predictions[~out.target_valid], torch.zeros_like(out.predictions[~out.target_valid]))
    z = model.teacher_latents(images)
    direct = _unpadded_union_predictions(model, images, masks)
    loss = torch.cat([(p - z[i, masks.target_mask[i]]).abs().mean(-1) for i, p in enumerate(direct)]).mean()
    torch.testing.assert_close(out.loss.double(), loss, atol=1e-6, rtol=1e-6)  # the loss is taken in float32
    got = torch.autograd.grad(out.loss, params, allow_unused=True)
    want = torch.autograd.grad(loss, params, allow_unused=True)
    assert sum(g is not None for g in got) == sum(g is not None for g in want) > 0
    for g, w in zip(got, want):
        if w is not None:
            torch.testing.assert_close(g, w, atol=1e-9, rtol=1e-6)  # through the float32 loss
