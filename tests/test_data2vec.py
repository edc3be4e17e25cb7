"""data2vec (methods.data2vec): targets, masked loss, EMA schedule/update, no hooks, ViTs without CLS."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn.functional as F

from methods import vit as V
from methods.data2vec import Data2Vec
from methods.registry import build_method
from tests.conftest import layer_norm_reference, randomize_layer_norm_

ENC = {"img_size": 32, "patch_size": 4, "embed_dim": 64, "depth": 3, "num_heads": 2}


def _model(**kw) -> Data2Vec:
    torch.manual_seed(0)
    enc = {**ENC, **kw.pop("enc", {})}
    return Data2Vec(image_size=32, top_k_blocks=kw.pop("top_k_blocks", 2), encoder_kwargs=enc, **kw)


def test_seed_signature_and_registry():
    sig = inspect.signature(Data2Vec.__init__)
    expected = {
        "encoder_name": "vit_small_patch16_224",
        "top_k_blocks": 6,
        "mask_ratio": 0.6,
        "ema_decay_start": 0.999,
        "ema_decay_end": 0.9999,
        "image_size": 224,
        "pretrained": False,
        "encoder_kwargs": None,
    }
    names = list(sig.parameters)[1:]
    assert names[: len(expected)] == list(expected)
    assert {k: sig.parameters[k].default for k in expected} == expected
    extensions = {"loss_scale": None, "layer_scale_init": 1e-4, "shared_rel_pos_bias": False}
    assert {k: sig.parameters[k].default for k in names[len(expected) :]} == extensions
    assert isinstance(build_method("data2vec", image_size=32, top_k_blocks=2, encoder_kwargs=ENC), Data2Vec)


def _perturb_teacher(model: Data2Vec) -> None:
    # make teacher differ from student so that a target computed with the wrong network would be caught
    with torch.no_grad():
        for p in model.teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))


@pytest.mark.parametrize("enc", [{}, {"class_token": False, "global_pool": "avg"}, {"reg_tokens": 2}])
def test_target_is_layernorm_of_mean_of_top_k_teacher_blocks(enc):
    model = _model(enc=enc)
    _perturb_teacher(model)
    x = torch.randn(2, 3, 32, 32)
    t = model.teacher
    with torch.no_grad():
        # by hand: patch embedding + prefix tokens + positions, then every block in turn
        h = t.patch_embed(x)
        prefix = []
        if t.cls_token is not None:
            prefix.append(t.cls_token.expand(2, -1, -1))
        if t.reg_token is not None:
            prefix.append(t.reg_token.expand(2, -1, -1))
        n_prefix = sum(p.shape[1] for p in prefix)
        if t.no_embed_class:
            h = torch.cat([*prefix, h + t.pos_embed], dim=1)
        else:
            h = torch.cat(prefix + [h], dim=1) + t.pos_embed
        outs = []
        for blk in t.blocks:
            h = blk(h)
            outs.append(h[:, n_prefix:])
        expected = F.layer_norm(torch.stack(outs[-2:]).mean(0), (64,))
        # timm's own intermediates agree (independent path)
        inter = t.forward_intermediates(x, indices=2, norm=False, output_fmt="NLC", intermediates_only=True)
        expected2 = F.layer_norm(torch.stack(inter).mean(0), (64,))
    got = model.teacher_targets(x)
    assert got.shape == (2, 64, 64)
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.allclose(got, expected2, atol=1e-5)
    # per-token normalisation: zero mean, unit variance over channels
    assert torch.allclose(got.mean(-1), torch.zeros(2, 64), atol=1e-5)
    model.train()
    out = model(x)
    assert torch.isfinite(out.loss) and out.embedding.shape == (2, 64)
    model.eval()
    ev = model(x)
    assert ev.loss.item() == 0.0 and ev.embedding.shape == (2, 64)


def test_loss_only_on_masked_positions_and_formula():
    model = _model().train()
    x = torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, 64, dtype=torch.bool)
    mask[:, ::3] = True
    y = model.teacher_targets(x)

    def run(targets):
        model.teacher_targets = lambda imgs: targets
        return model(x, mask=mask)

    base = run(y)
    d = base.predictions - y
    per = torch.where(d.abs() < 2.0, 0.5 * d**2 / 2.0, d.abs() - 1.0).sum(-1)  # smooth-L1, beta = 2, summed
    assert torch.allclose(base.loss, per[mask].mean() / d.shape[-1] ** 0.5, atol=1e-6)
    outside = y.clone()
    outside[~mask] += 10.0 * torch.randn_like(outside[~mask])
    assert torch.equal(run(outside).loss, base.loss)
    inside = y.clone()
    inside[mask] += 1.0
    assert not torch.allclose(run(inside).loss, base.loss)


def test_regression_head_gets_final_layernorm_tokens_with_avg_pooling():
    """The student's output is layer-normed before the regression head; with global_pool='avg' timm applies
    that LayerNorm (fc_norm) only after pooling, so data2vec applies it to every token."""
    model = _model(enc={"global_pool": "avg", "class_token": False}).train()
    student = model.student
    assert isinstance(student.norm, torch.nn.Identity)
    randomize_layer_norm_(student.fc_norm)
    seen = []
    handle = model.regressor.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    x = torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, 64, dtype=torch.bool)
    mask[:, ::2] = True
    model(x, mask=mask)
    handle.remove()
    tokens = student.patch_embed(x)
    tokens = torch.where(mask.unsqueeze(-1), model.mask_token.expand_as(tokens), tokens)
    tokens = student._pos_embed(tokens)
    for block in student.blocks:
        tokens = block(tokens)
    assert torch.allclose(seen[0], layer_norm_reference(tokens, student.fc_norm), atol=1e-5)


def test_student_input_masks_tokens_with_mask_token():
    model = _model().train()
    x = torch.randn(1, 3, 32, 32)
    seen = []
    h = model.student.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    mask = torch.zeros(1, 64, dtype=torch.bool)
    mask[0, 5] = True
    try:
        model(x, mask=mask)
    finally:
        h.remove()
    tok = seen[0][0, 1:]  # drop CLS
    pos = model.student.pos_embed[0, 1:]
    assert torch.allclose(tok[5], model.mask_token[0, 0] + pos[5], atol=1e-6)
    assert not torch.allclose(tok[4], model.mask_token[0, 0] + pos[4], atol=1e-3)


def test_no_hooks_survive_forward():
    model = _model().train()
    model(torch.randn(2, 3, 32, 32))
    for vit in (model.student, model.teacher):
        for blk in vit.blocks:
            assert len(blk._forward_hooks) == 0 and len(blk._forward_pre_hooks) == 0


def test_ema_schedule_and_update():
    model = _model(ema_decay_start=0.9, ema_decay_end=0.99)
    total = 10
    for step in (0, 3, 10):
        model.on_train_step(step, total, epoch=0.0)
        expected = 0.99 - (0.99 - 0.9) * (1 + math.cos(math.pi * step / total)) / 2
        assert model.schedule_state()["ema_momentum"] == pytest.approx(expected)
    model.on_train_step(4, total, 0.0)
    m = 0.99 - 0.09 * (1 + math.cos(math.pi * 0.4)) / 2
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    t_before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    out = model(torch.randn(2, 3, 32, 32))
    opt.zero_grad()
    out.loss.backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    opt.step()
    assert all(torch.equal(t_before[k], v) for k, v in model.teacher.state_dict().items())  # not before the hook
    model.after_optimizer_step()
    s = model.student.state_dict()
    for k, v in model.teacher.state_dict().items():
        assert torch.allclose(v, m * t_before[k] + (1 - m) * s[k], atol=1e-6), k
    assert not model.teacher.training
    assert model.export_encoder() is model.teacher
    assert model.encoder_config()["encoder_kwargs"]["img_size"] == 32


def test_loss_scale_is_fairseqs():
    """fairseq examples/data2vec/models/data2vec_vision.py:107-111 (``loss_scale`` None -> ``1 / sqrt(embed_dim)``) and
    329-337 (``F.smooth_l1_loss(x, y, reduction="none", beta=self.loss_beta).sum(dim=-1) * self.loss_scale`` on the
    masked tokens), with ``losses: loss.sum()`` over ``sample_size = loss.numel()`` (the trainer divides by it)."""
    import math

    import torch.nn.functional as F

    for loss_scale in (None, 0.25):
        model = _model(loss_scale=loss_scale).train()
        images = torch.randn(2, 3, 32, 32)
        mask = torch.zeros(2, 64, dtype=torch.bool)
        mask[:, 5::4] = True
        out = model(images, mask=mask)
        bool_mask = mask
        x, y = out.predictions[bool_mask].float(), out.target[bool_mask].float()
        scale = loss_scale if loss_scale is not None else 1 / math.sqrt(model.embed_dim)
        loss = F.smooth_l1_loss(x, y, reduction="none", beta=2.0).sum(dim=-1)
        loss = loss * scale
        torch.testing.assert_close(out.loss, loss.sum() / loss.numel())
    assert _model(loss_scale=1.0 / 64).loss_scale == 1.0 / 64  # 1 / D: the per-channel mean of earlier versions


def test_beit_layer_scale_and_shared_relative_position_bias():
    """BEiT's encoder as data2vec builds it (fairseq data2vec_vision.py:656-676: one RelativePositionBias shared by all
    blocks, ``init_values=layer_scale_init_value``): a timm Beit whose blocks all get the same bias, targets from its
    blocks' outputs, LayerScale gains at 1e-4."""
    torch.manual_seed(0)
    model = Data2Vec("beit_base_patch16_224", top_k_blocks=2, image_size=32, shared_rel_pos_bias=True,
                     encoder_kwargs={"patch_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 2}).train()
    vit = model.student
    assert vit.rel_pos_bias is not None and vit.pos_embed is None
    assert all(b.attn.relative_position_bias_table is None for b in vit.blocks)
    assert torch.all(vit.blocks[0].gamma_1 == 1e-4)
    with torch.no_grad():
        vit.rel_pos_bias.relative_position_bias_table.normal_()
        model.teacher.rel_pos_bias.relative_position_bias_table.normal_()
    images = torch.randn(2, 3, 32, 32)
    # Beit.forward_features (timm) gives the last block's normed output: the encoder path must equal it
    from methods import vit as V

    torch.testing.assert_close(V.run_blocks(vit.eval(), V.embed_patches(vit, images)), vit.forward_features(images))
    model.train()
    out = model(images)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert vit.rel_pos_bias.relative_position_bias_table.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="shared_rel_pos_bias: expected false unless encoder_name is a timm Beit"):
        Data2Vec(shared_rel_pos_bias=True, encoder_kwargs=ENC, image_size=32, top_k_blocks=2)
    with pytest.raises(ValueError, match="method.loss_scale"):
        Data2Vec.check_kwargs({"loss_scale": 0.0}, prefix="method.")


@pytest.mark.parametrize("enc", [{}, {"reg_tokens": 2}])
def test_masked_rows_only_last_block_equals_the_full_computation(enc):
    """With the same number of masked patches per sample (the default masking), the student's last block, final norm,
    regression head and loss run only at the CLS token and the masked rows (methods.vit.block_rows); loss, embedding
    and gradients equal the full computation (float64), ``predictions`` at the masked patches too. Unequal counts
    (a mask given by the caller) run the full computation."""
    model = _model(enc=enc).double().train()
    _perturb_teacher(model)
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    student, n_prefix = model.student, model.student.num_prefix_tokens
    params = [p for p in model.parameters() if p.requires_grad]
    rows_seen: list[int] = []

    def run(*args, **kwargs):
        hook = student.blocks[-1].mlp.register_forward_pre_hook(lambda m, a: rows_seen.append(a[0].shape[1]))
        try:
            return model(*args, **kwargs)
        finally:
            hook.remove()

    for k in ([20, 20, 20], [20, 21, 19]):
        mask = torch.zeros(3, 64, dtype=torch.bool)
        for i, ki in enumerate(k):
            mask[i, torch.randperm(64)[:ki]] = True
        out = run(x, mask=mask)
        tokens = V.run_blocks(student, V.embed_patches(student, x, mask, model.mask_token))
        pred = model.regressor(tokens[:, n_prefix:])
        y = model.teacher_targets(x)
        # the loss is taken in float32 (as in the method), all else in float64
        per_token = F.smooth_l1_loss(pred.float(), y.float(), beta=2.0, reduction="none").sum(-1)
        direct = model.loss_scale * per_token[mask].mean()
        torch.testing.assert_close(out.loss, direct, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(out.embedding, V.pooled_embedding(student, tokens), atol=1e-12, rtol=1e-9)
        torch.testing.assert_close(out.predictions[mask], pred[mask], atol=1e-12, rtol=1e-9)
        got = torch.autograd.grad(out.loss, params, allow_unused=True)
        want = torch.autograd.grad(direct, params, allow_unused=True)
        for g, w in zip(got, want):
            assert (g is None) == (w is None)
            if w is not None:
                torch.testing.assert_close(g, w, atol=1e-9, rtol=1e-6)
    assert rows_seen == [1 + 20, n_prefix + 64]  # rows-only last block, then the full one for unequal counts
    run(x)  # the default mask: the same count in every sample -> rows only
    assert rows_seen[-1] == 1 + round(64 * model.mask_ratio)
