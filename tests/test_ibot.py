"""iBOT (Zhou et al. 2022): masked-patch loss, CLS loss reduction, masking, EMA, eval, export."""

from __future__ import annotations

import inspect

import pytest
import torch

from methods import get_method_class
from methods.ibot import iBOT, iBOTOutput
from methods.losses import iBOTPatchLoss

TINY = {"patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2}


def tiny_ibot(**kw) -> iBOT:
    torch.manual_seed(0)
    args = dict(
        image_size=32,
        encoder_kwargs=dict(TINY),
        n_cls_prototypes=64,
        n_patch_prototypes=32,
        projector_hidden_dim=32,
        projector_bottleneck_dim=16,
    )
    args.update(kw)
    return iBOT(**args)


def test_signature_matches_seed_plus_encoder_kwargs_last():
    expected = {
        "encoder_name": "vit_small_patch16_224",
        "projector_hidden_dim": 2048,
        "projector_bottleneck_dim": 256,
        "n_cls_prototypes": 65536,
        "n_patch_prototypes": 8192,
        "mask_ratio": 0.3,
        "patch_loss_weight": 1.0,
        "temperature_student": 0.1,
        "temperature_teacher_warmup": 0.04,
        "temperature_teacher": 0.07,
        "warmup_epochs_temperature_teacher": 30,
        "ema_decay_start": 0.996,
        "ema_decay_end": 1.0,
        "image_size": 224,
        "pretrained": False,
        "encoder_kwargs": None,
    }
    params = inspect.signature(iBOT.__init__).parameters
    assert list(params)[1 : len(expected) + 1] == list(expected)  # the seed's order, then extensions
    assert {k: params[k].default for k in list(params)[len(expected) + 1 :]} == {
        "norm_last_layer": True, "use_bn_in_head": False, "mask_shape": "random", "mask_ratio_var": 0.0,
        "unmasked_fraction": 0.0, "mask_aspect_ratio": (0.3, 1 / 0.3), "mask_start_epoch": 0, "head_sharing": "none",
    }
    assert {k: params[k].default for k in expected} == expected
    assert get_method_class("ibot") is iBOT and set(iBOT.training_views({"image_size": 32, "multicrop": {"n_local": 2}})) == {"global_views", "local_views"}


def _direct_patch_loss(s, t, m, center, ts, tt):
    per_view = []
    for sv, tv, mv in zip(s, t, m):
        q = torch.exp((tv.double() - center.double()) / tt)
        q = q / q.sum(-1, keepdim=True)
        z = sv.double() / ts
        logp = z - torch.log(torch.exp(z).sum(-1, keepdim=True))
        ce = -(q * logp).sum(-1)  # [B, N]
        per_img = [(ce[b][mv[b].bool()]).mean() for b in range(ce.shape[0])]
        per_view.append(torch.stack(per_img).mean())
    return float(torch.stack(per_view).mean())


def test_patch_loss_formula_and_masked_positions_only():
    torch.manual_seed(2)
    b, n, k = 3, 6, 5
    s = [torch.randn(b, n, k), torch.randn(b, n, k)]
    t = [torch.randn(b, n, k), torch.randn(b, n, k)]
    masks = [torch.rand(b, n) < 0.5, torch.rand(b, n) < 0.5]
    for mk in masks:
        mk[:, 0] = True  # at least one masked patch per image
        mk[:, 1] = False  # at least one visible
    loss_fn = iBOTPatchLoss(k)
    loss = loss_fn(s, t, masks, 0.1, 0.04, update_center=False)
    assert float(loss) == pytest.approx(_direct_patch_loss(s, t, masks, torch.zeros(k), 0.1, 0.04), rel=1e-5)
    # Changing teacher (or student) outputs at unmasked positions does not change the loss ...
    t2 = [tv.clone() for tv in t]
    s2 = [sv.clone() for sv in s]
    for tv, sv, mk in zip(t2, s2, masks):
        tv[~mk] = torch.randn(int((~mk).sum()), k) * 10
        sv[~mk] = torch.randn(int((~mk).sum()), k) * 10
    assert float(loss_fn(s2, t2, masks, 0.1, 0.04, update_center=False)) == pytest.approx(
        float(loss), rel=1e-6
    )
    # ... while changing them at a masked position does.
    t3 = [tv.clone() for tv in t]
    t3[0][0, 0] = torch.randn(k) * 10
    assert float(loss_fn(s, t3, masks, 0.1, 0.04, update_center=False)) != pytest.approx(
        float(loss), rel=1e-6
    )


def test_zero_patch_weight_reduces_to_dino_cls_loss():
    model = tiny_ibot(patch_loss_weight=0.0).train()
    outs = {}
    model.student.cls_head.register_forward_hook(lambda m, a, o: outs.__setitem__("s", o.detach().clone()))
    model.teacher.cls_head.register_forward_hook(lambda m, a, o: outs.__setitem__("t", o.detach().clone()))
    g = [torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)]
    out = model(global_views=g)
    assert isinstance(out, iBOTOutput)
    assert float(out.loss.detach()) == pytest.approx(float(out.loss_cls), rel=1e-6)
    assert float(out.loss_patch) > 0
    # Cross-view DINO loss on the CLS logits (centre 0 at the first step, warm-up teacher temperature 0.04).
    s, t = outs["s"].chunk(2), outs["t"].chunk(2)
    q = [torch.softmax(tv.double() / 0.04, -1) for tv in t]
    logp = [torch.log_softmax(sv.double() / 0.1, -1) for sv in s]
    expected = (-(q[0] * logp[1]).sum(-1).mean() - (q[1] * logp[0]).sum(-1).mean()) / 2
    assert float(out.loss_cls) == pytest.approx(float(expected), rel=1e-5)
    full = tiny_ibot(patch_loss_weight=2.0).train()
    torch.manual_seed(5)
    out2 = full(global_views=g)
    assert float(out2.loss.detach()) == pytest.approx(float(out2.loss_cls + 2.0 * out2.loss_patch), rel=1e-6)


def test_student_masking_teacher_unmasked():
    model = tiny_ibot(mask_ratio=0.3).train()
    seen = {"student": [], "teacher": []}
    model.student.backbone.patch_embed.register_forward_pre_hook(
        lambda m, a: seen["student"].append(a[0].shape)
    )
    model.teacher.backbone.patch_embed.register_forward_pre_hook(
        lambda m, a: seen["teacher"].append(a[0].shape)
    )
    g = [torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)]
    out = model(global_views=g)
    assert seen["student"] == [(4, 3, 32, 32)] and seen["teacher"] == [(4, 3, 32, 32)]
    n = (32 // 8) ** 2
    assert len(out.masks) == 2
    for mk in out.masks:
        assert mk.shape == (2, n) and mk.sum(dim=1).tolist() == [round(0.3 * n)] * 2
    out.loss.backward()
    assert model.student.mask_token.grad is not None and model.student.mask_token.grad.abs().sum() > 0
    # With given all-False masks the student sees exactly the teacher's input, so at init (teacher == student)
    # the patch distributions agree up to temperatures; the mask token then gets no gradient.
    model.zero_grad(set_to_none=True)
    none_masked = [torch.zeros(2, n, dtype=torch.bool)] * 2
    out = model(global_views=g, masks=none_masked)
    out.loss.backward()
    assert model.student.mask_token.grad is None or model.student.mask_token.grad.abs().sum() == 0
    assert float(out.loss_patch) == 0.0  # no masked patch: the per-image average is over an empty set


def test_training_step_ema_and_last_layer_freeze():
    model = tiny_ibot().train()
    for ps, pt in zip(model.student.parameters(), model.teacher.parameters()):
        assert torch.equal(ps, pt) and not pt.requires_grad
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    lasts = [model.student.cls_head.last_layer.weight_v, model.student.patch_head.last_layer.weight_v]
    first = [p.detach().clone() for p in lasts]

    def step(epoch: float, i: int):
        model.on_train_step(i, 10, epoch)
        out = model(global_views=[torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)])
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        assert all(p.grad is None for p in model.teacher.parameters())
        model.before_optimizer_step(epoch)
        old = [p.detach().clone() for p in model.teacher.parameters()]
        opt.step()
        model.after_optimizer_step()
        m = model.ema_momentum
        for o, pt, ps in zip(old, model.teacher.parameters(), model.student.parameters()):
            torch.testing.assert_close(pt, m * o + (1 - m) * ps.detach())

    step(0.0, 0)
    assert all(torch.equal(p, f) for p, f in zip(lasts, first))
    step(1.5, 6)
    assert all(not torch.equal(p, f) for p, f in zip(lasts, first))


def test_eval_embedding_zero_loss_and_export():
    from methods.vit import create_vit

    model = tiny_ibot().eval()
    x = torch.randn(3, 3, 32, 32)
    out = model(images=x)
    assert out.embedding.shape == (3, 64) and float(out.loss) == 0.0
    torch.testing.assert_close(out.embedding, model.teacher.backbone(x))
    cfg = model.encoder_config()
    assert cfg["encoder_kwargs"]["img_size"] == 32
    rebuilt = create_vit(cfg["encoder_name"], cfg["encoder_kwargs"])
    rebuilt.load_state_dict(model.encoder_state_dict())
    torch.testing.assert_close(rebuilt(x), out.embedding)
    with pytest.raises(ValueError, match="img_size"):
        iBOT(image_size=32, encoder_kwargs={"img_size": 16})


@pytest.mark.parametrize("head_sharing", ["none", "mlp"])
@pytest.mark.parametrize("student, teacher", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("uneven", [False, True])
def test_patch_heads_on_masked_patches_only_give_the_same_loss_centre_and_gradients(uneven, student, teacher, head_sharing):
    """The patch logits enter the loss only at masked patches, so the student's patch head and the teacher's
    prototypes run on those rows only (the teacher's centre from its mean bottleneck): loss, centres and every
    gradient equal those of the heads over all patches (the previous computation)."""
    import copy

    model = tiny_ibot(head_sharing=head_sharing).train()
    assert model.student_head_on_masked_only and model.teacher_prototypes_on_masked_only
    model.student_head_on_masked_only, model.teacher_prototypes_on_masked_only = student, teacher
    full = copy.deepcopy(model)
    full.student_head_on_masked_only = full.teacher_prototypes_on_masked_only = False
    model.patch_loss_fn.center.normal_()  # a non-zero centre (the loss subtracts it)
    full.patch_loss_fn.center.copy_(model.patch_loss_fn.center)
    c0 = model.patch_loss_fn.center.clone()
    g = [torch.randn(3, 3, 32, 32), torch.randn(3, 3, 32, 32)]
    n = (32 // 8) ** 2
    gen = torch.Generator().manual_seed(1)
    masks = [torch.rand(3, n, generator=gen) < (torch.rand(3, 1, generator=gen) if uneven else 0.3) for _ in range(2)]
    masks[1][0] = False  # an image without a masked patch (its per-image term is 0)
    rows = []
    net = model.student
    prototypes = net.head.last_layer2 if net.head is not None else net.patch_head.last_layer
    teacher_prototypes = model.ts.teacher.head.last_layer2 if net.head is not None else model.ts.teacher.patch_head.last_layer
    prototypes.register_forward_pre_hook(lambda mod, a: rows.append(("student", a[0].shape[:-1].numel())))
    teacher_prototypes.register_forward_pre_hook(lambda mod, a: rows.append(("teacher", a[0].shape[:-1].numel())))
    out, ref = model(global_views=g, masks=masks), full(global_views=g, masks=masks)
    masked, total = int(sum(mk.sum() for mk in masks)), 2 * 3 * n
    assert rows[0] == ("student", masked if student else total)
    assert rows[1:] == ([("teacher", masked), ("teacher", 1)] if teacher else [("teacher", total)])  # 1: the mean
    assert float(out.loss_patch) == pytest.approx(float(ref.loss_patch), rel=1e-5)
    assert float(out.loss) == pytest.approx(float(ref.loss), rel=1e-5)
    assert torch.allclose(model.patch_loss_fn.center, full.patch_loss_fn.center, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(model.patch_loss_fn.center, c0)  # updated (by the mean of the teacher's patch logits)
    out.loss.backward()
    ref.loss.backward()
    for (name, p), q in zip(model.named_parameters(), full.parameters()):
        if p.grad is None:
            assert q.grad is None or not q.grad.any(), name
        else:
            assert torch.allclose(p.grad, q.grad, atol=1e-6, rtol=1e-4), name


def test_student_patch_head_with_batchnorm_sees_every_patch():
    model = tiny_ibot(use_bn_in_head=True).train()
    assert not model.student_head_on_masked_only
    rows = []
    model.student.patch_head.register_forward_pre_hook(lambda mod, a: rows.append(tuple(a[0].shape[:2])))
    model(global_views=[torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)]).loss.backward()
    assert rows == [(4, 16)]


def test_patch_loss_on_masked_student_rows_equals_full_formula():
    torch.manual_seed(3)
    b, n, k = 3, 6, 5
    s = [torch.randn(b, n, k), torch.randn(b, n, k)]
    t = [torch.randn(b, n, k), torch.randn(b, n, k)]
    masks = [torch.rand(b, n) < 0.5, torch.rand(b, n) < 0.5]
    for mk in masks:
        mk[:, 0] = True  # the direct formula averages over a non-empty set per image
    loss_fn = iBOTPatchLoss(k)
    loss_fn.center.normal_()
    rows = [sv[mk] for sv, mk in zip(s, masks)]
    got = loss_fn(rows, t, masks, 0.1, 0.04, update_center=False, student_masked_only=True)
    assert float(got) == pytest.approx(_direct_patch_loss(s, t, masks, loss_fn.center.reshape(-1), 0.1, 0.04), rel=1e-5)


# ---- local crops: bytedance/ibot main_ibot.py (commit da316d8), iBOTLoss.forward, lines 514-557 ----------------
def reference_ibot_loss(student_output, teacher_output, student_local_cls, student_mask, *, ngcrops, nlcrops, temp,
                        temp2, center, center2, student_temp=0.1, lambda1=1.0, lambda2=1.0):
    """The reference's lines, ported verbatim but for ``self.`` -> arguments and the schedules -> ``temp``/``temp2``."""
    F = torch.nn.functional
    ncrops = ngcrops + nlcrops
    student_cls, student_patch = student_output
    teacher_cls, teacher_patch = teacher_output
    if student_local_cls is not None:
        student_cls = torch.cat([student_cls, student_local_cls])
    student_cls = student_cls / student_temp
    student_cls_c = student_cls.chunk(ncrops)
    student_patch = student_patch / student_temp
    student_patch_c = student_patch.chunk(ngcrops)
    teacher_cls_c = F.softmax((teacher_cls - center) / temp, dim=-1)
    teacher_cls_c = teacher_cls_c.detach().chunk(ngcrops)
    teacher_patch_c = F.softmax((teacher_patch - center2) / temp2, dim=-1)
    teacher_patch_c = teacher_patch_c.detach().chunk(ngcrops)
    total_loss1, n_loss_terms1 = 0, 0
    total_loss2, n_loss_terms2 = 0, 0
    for q in range(len(teacher_cls_c)):
        for v in range(len(student_cls_c)):
            if v == q:
                loss2 = torch.sum(-teacher_patch_c[q] * F.log_softmax(student_patch_c[v], dim=-1), dim=-1)
                mask = student_mask[v].flatten(-2, -1)
                loss2 = torch.sum(loss2 * mask.float(), dim=-1) / mask.sum(dim=-1).clamp(min=1.0)
                total_loss2 += loss2.mean()
                n_loss_terms2 += 1
            else:
                loss1 = torch.sum(-teacher_cls_c[q] * F.log_softmax(student_cls_c[v], dim=-1), dim=-1)
                total_loss1 += loss1.mean()
                n_loss_terms1 += 1
    total_loss1 = total_loss1 / n_loss_terms1 * lambda1
    total_loss2 = total_loss2 / n_loss_terms2 * lambda2
    return dict(cls=total_loss1, patch=total_loss2, loss=total_loss1 + total_loss2)


@pytest.mark.parametrize("head_sharing", ["none", "all"])
def test_local_crops_loss_equals_the_reference_ibot_loss(head_sharing):
    """10 local crops (iBOT's ViT-S/16 recipe, scaled down): CLS loss over every (teacher global, student view != it)
    pair, patch loss on the globals only; the same values as the reference's ``iBOTLoss.forward``."""
    torch.manual_seed(0)
    model = tiny_ibot(head_sharing=head_sharing, n_patch_prototypes=64).train()
    model.cls_loss_fn.center.normal_()  # a non-zero centre, so that its use is checked too
    model.patch_loss_fn.center.normal_()
    model.current_teacher_temperature, model.current_patch_teacher_temperature = 0.05, 0.06
    g = [torch.randn(3, 3, 32, 32) for _ in range(2)]
    local = [torch.randn(3, 3, 16, 16) for _ in range(10)]
    masks = [torch.rand(3, 16) < 0.4 for _ in range(2)]
    masks[0][0] = False  # an unmasked image (the reference's clamp(min=1))
    x, m = torch.cat(g), torch.cat(masks)
    with torch.no_grad():  # the reference's inputs: student(globals, mask), student(locals)[0] (CLS), teacher(globals)
        _, s_cls, s_patch = model.student(x, m)
        s_local = model.student.cls_logits(torch.cat(local))
        _, t_cls, t_patch = model.teacher(x)
        grid_masks = [mk.reshape(3, 4, 4) for mk in masks]  # the reference's masks are [B, H, W]
        ref = reference_ibot_loss((s_cls, s_patch), (t_cls, t_patch), s_local, grid_masks, ngcrops=2, nlcrops=10, temp=0.05,
                                  temp2=0.06, center=model.cls_loss_fn.center.clone(),
                                  center2=model.patch_loss_fn.center.clone())
    out = model(global_views=g, local_views=local, masks=masks)
    assert float(out.student_views) == 12
    assert float(out.loss_cls) == pytest.approx(float(ref["cls"]), rel=1e-5)
    assert float(out.loss_patch) == pytest.approx(float(ref["patch"]), rel=1e-5)
    assert float(out.loss.detach()) == pytest.approx(float(ref["loss"]), rel=1e-5)
    without = reference_ibot_loss((s_cls, s_patch), (t_cls, t_patch), None, grid_masks, ngcrops=2, nlcrops=0, temp=0.05,
                                  temp2=0.06, center=model.cls_loss_fn.center, center2=model.patch_loss_fn.center)
    assert abs(float(without["cls"]) - float(ref["cls"])) > 1e-3  # the local crops change the CLS loss
    out.loss.backward()
    assert model.student.backbone.patch_embed.proj.weight.grad is not None


def test_local_crops_reach_the_student_only_unmasked_and_cls_only():
    model = tiny_ibot().train()
    seen = {"teacher": [], "student": []}
    model.teacher.backbone.register_forward_pre_hook(lambda mod, a: seen["teacher"].append(tuple(a[0].shape)))
    model.student.backbone.patch_embed.register_forward_pre_hook(lambda mod, a: seen["student"].append(tuple(a[0].shape)))
    patch_rows = []
    model.student.patch_head.register_forward_pre_hook(lambda mod, a: patch_rows.append(a[0].shape[0]))
    g = [torch.randn(2, 3, 32, 32) for _ in range(2)]
    masks = [torch.ones(2, 16, dtype=torch.bool)] * 2
    model(global_views=g, local_views=[torch.randn(2, 3, 16, 16)] * 3, masks=masks).loss.backward()
    assert seen["student"] == [(4, 3, 32, 32), (6, 3, 16, 16)]  # globals (masked), then locals in one batch
    assert all(s[-1] == 32 for s in seen["teacher"])  # the teacher sees globals only
    assert patch_rows == [64]  # the patch head: the globals' masked patches, no local patch
