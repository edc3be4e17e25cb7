"""Batched device-side views (``ssl_platform.data.augment``) against the per-sample torchvision transforms they replace.

Distributions are compared with a fixed seed over many draws (two-sample KS tests against torchvision's own
``RandomResizedCrop.make_params``, binomial bounds on application rates); each image operation is compared with
torchvision's functional op on the same parameters; outputs are checked per view kind, on padded canvases, for
reproducibility and, where CUDA exists, on the GPU.
"""

from __future__ import annotations

import math

import pytest
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from omegaconf import OmegaConf
from scipy import stats
from torchvision.transforms import InterpolationMode

from methods.views import ViewGroup, multicrop_views, single_view
from ssl_platform.data import augment as A
from ssl_platform.data.augment import BatchViews, ViewRecipe, dino_recipes, eval_views
from ssl_platform.data.small_sets import MEAN, STD
from ssl_platform.spec import DataSpec


def _data(**overrides):
    data = OmegaConf.structured(DataSpec)
    for key, value in overrides.items():
        OmegaConf.update(data, key, value)
    return data


def _canvases(b: int, c: int, seed: int = 0, sizes: torch.Tensor | None = None, pad_value: int | None = None):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (b, 3, c, c), generator=g, dtype=torch.uint8)
    if sizes is not None and pad_value is not None:
        for i, (h, w) in enumerate(sizes.tolist()):
            images[i, :, h:, :] = pad_value
            images[i, :, :, w:] = pad_value
    return images


def _torchvision_crops(height: int, width: int, scale, n: int, seed: int) -> torch.Tensor:
    rrc = T.RandomResizedCrop(8, scale=scale)
    torch.manual_seed(seed)
    dummy = torch.zeros(1, height, width)
    return torch.tensor([[p["top"], p["left"], p["height"], p["width"]] for p in (rrc.make_params([dummy]) for _ in range(n))])


def _batched_crops(height: int, width: int, scale, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    log_ratio = torch.tensor([[math.log(3 / 4), math.log(4 / 3)]], dtype=torch.float64).expand(n, 2)
    return A.sample_resized_crops(torch.full((n,), height), torch.full((n,), width),
                                  torch.tensor([scale], dtype=torch.float64).expand(n, 2), log_ratio, g)  # fmt: skip


@pytest.mark.parametrize("height,width,scale", [(192, 256, (0.08, 1.0)), (96, 96, (0.4, 1.0)), (30, 200, (0.3, 1.0))])
def test_crop_parameters_follow_torchvision_random_resized_crop(height, width, scale):
    """Area fraction, log aspect ratio and relative position: KS tests against torchvision's sampler, including
    a very wide image (30x200) where many draws fall back to the centred crop; the fallback rate matches too."""
    n = 4000
    ours = _batched_crops(height, width, scale, n, seed=1).double()
    ref = _torchvision_crops(height, width, scale, n, seed=2).double()
    for name, f in {
        "area": lambda c: c[:, 2] * c[:, 3] / (height * width),
        "log_aspect": lambda c: torch.log(c[:, 3] / c[:, 2]),
        "top": lambda c: (c[:, 0] + c[:, 2] / 2) / height,
        "left": lambda c: (c[:, 1] + c[:, 3] / 2) / width,
    }.items():
        p = stats.ks_2samp(f(ours).numpy(), f(ref).numpy()).pvalue
        assert p > 1e-3, f"{name}: KS p-value {p:.2e}"
    assert (ours[:, 0] >= 0).all() and (ours[:, 0] + ours[:, 2] <= height).all()
    assert (ours[:, 1] >= 0).all() and (ours[:, 1] + ours[:, 3] <= width).all()
    full = lambda c: ((c[:, 2] == height) & (c[:, 3] == width)).double().mean()  # noqa: E731
    assert abs(full(ours) - full(ref)) < 5 * math.sqrt(0.25 / n) + 1e-9


def test_crop_fallback_is_torchvisions_centred_crop():
    """No try can fit a 4x400 image at scale >= 0.9: the centred crop with the ratio clamped to 4/3 (h 4, w 5)."""
    crops = _batched_crops(4, 400, (0.9, 1.0), 50, seed=0)
    assert crops.tolist() == [[0, 197, 4, 5]] * 50
    assert _torchvision_crops(4, 400, (0.9, 1.0), 5, seed=0).tolist() == [[0, 197, 4, 5]] * 5


def test_dino_application_rates_match_multicrop_transform():
    """Flip / jitter / grey / blur / solarise rates per view are MultiCropTransform's probabilities; jitter factors
    are uniform on torchvision's ranges and the orders uniform over the 24 permutations."""
    b = 3000
    recipes = dino_recipes(32, 16, n_global=2, n_local=3, hflip_p=0.5, color_jitter_p=0.8, solarize_p=0.2)
    g = torch.Generator().manual_seed(0)
    sizes = torch.full((b,), 40)
    expected = {  # per view: flip, jitter, grey, blur, solarise
        "global_views": [(0.5, 0.8, 0.2, 1.0, 0.0), (0.5, 0.8, 0.2, 0.1, 0.2)],
        "local_views": [(0.5, 0.8, 0.2, 0.5, 0.0)] * 3,
    }
    for key, views in recipes.items():
        p = A.sample_view_params(views, sizes, sizes, g)
        for v, probs in enumerate(expected[key]):
            rows = slice(v * b, (v + 1) * b)
            for name, prob in zip(("flip", "jitter", "grayscale", "blur", "solarize"), probs):
                rate = getattr(p, name)[rows].double().mean().item()
                assert abs(rate - prob) <= 5 * math.sqrt(prob * (1 - prob) / b) + 1e-9, (key, v, name, rate, prob)
        jit = p.jitter
        for j, (lo, hi) in enumerate([(0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)]):
            f = p.factors[jit, j]
            assert stats.kstest(f.numpy(), stats.uniform(loc=lo, scale=hi - lo).cdf).pvalue > 1e-3
        assert (p.factors[~jit] == torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64)).all()
        perms = torch.unique(p.order, dim=0, return_counts=True)[1]
        assert len(perms) == 24 and stats.chisquare(perms.numpy()).pvalue > 1e-3
        sigma = p.sigma[p.blur]
        assert stats.kstest(sigma.numpy(), stats.uniform(loc=0.1, scale=1.9).cdf).pvalue > 1e-3


def test_grayscale_rate_in_the_output():
    """The views themselves: about 20% have three equal channels (a grey conversion), as RandomGrayscale(0.2)."""
    b = 800
    views = BatchViews(dino_recipes(16, 8, n_local=0, color_jitter_p=0.0, hflip_p=0.0, solarize_p=0.0))
    out = views(_canvases(b, 20), generator=torch.Generator().manual_seed(0))
    grey = torch.cat([(v[:, 0] == v[:, 1]).flatten(1).all(1) & (v[:, 1] == v[:, 2]).flatten(1).all(1)
                      for v in out["global_views"]]).double().mean().item()  # fmt: skip
    assert abs(grey - 0.2) < 5 * math.sqrt(0.16 / (2 * b))


# ---- each operation against torchvision on the same parameters ---------------------------------------------
def test_hue_shift_matches_torchvision_adjust_hue():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 17, 19, generator=g)
    x[0] = x[0, :1]  # grey pixels: no hue
    x[1, :, :4] = torch.tensor([1.0, 0.2, 0.2]).view(3, 1, 1)  # ties of max / min channels
    x[1, :, 4:8] = torch.tensor([0.3, 0.3, 0.9]).view(3, 1, 1)
    shifts = torch.tensor([0.1, -0.1, 0.5, -0.5, 0.03, 0.0])
    ref = torch.stack([TF.adjust_hue(x[i], float(shifts[i])) for i in range(6)])
    torch.testing.assert_close(A.hue_shift(x, shifts), ref, atol=2e-6, rtol=0)


@pytest.mark.parametrize("op", [0, 1, 2])
def test_single_adjustments_match_torchvision(op):
    """The CPU path's brightness / contrast / saturation steps (one op on a run of rows), per-row factors."""
    x = torch.rand(5, 3, 9, 11, generator=torch.Generator().manual_seed(op))
    alpha = torch.tensor([0.6, 0.9, 1.0, 1.2, 1.4])
    tv = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation][op]
    ref = torch.stack([tv(x[i], float(alpha[i])) for i in range(5)])
    torch.testing.assert_close(A._ADJUST_BY_OP[op](x.clone(), alpha), ref, atol=2e-7, rtol=0)


@pytest.mark.parametrize("sparse,per_row_min", [(False, None), (True, None), (True, 0)])
def test_color_jitter_applies_each_rows_order_like_torchvision(sparse, per_row_min, monkeypatch):
    """Every row has its own factors and its own order of the four ops (all 24 orders appear). ``per_row_min=0``:
    the CPU path for large rows (each run of one op in a slot gets that op alone) on these small rows."""
    if per_row_min is not None:
        monkeypatch.setattr(A, "CPU_PER_ROW_MIN_VALUES", per_row_min)
    g = torch.Generator().manual_seed(0)
    n = 48
    x = torch.rand(n, 3, 9, 11, generator=g)
    factors = torch.stack([torch.empty(n).uniform_(0.6, 1.4, generator=g), torch.empty(n).uniform_(0.6, 1.4, generator=g),
                           torch.empty(n).uniform_(0.8, 1.2, generator=g), torch.empty(n).uniform_(-0.1, 0.1, generator=g)], 1)  # fmt: skip
    import itertools

    perms = torch.tensor(list(itertools.permutations(range(4))))
    order = torch.cat([perms, perms])
    jitter = torch.ones(n, dtype=torch.bool)
    jitter[::5] = False
    factors[~jitter] = torch.tensor([1.0, 1.0, 1.0, 0.0])
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    ref = x.clone()
    for i in range(n):
        if jitter[i]:
            for op in order[i].tolist():
                ref[i] = ops[op](ref[i], float(factors[i, op]))
    schedule = A.JitterSchedule.build(factors.double(), order, jitter)
    rows = torch.argsort(schedule.key, stable=True) if sparse else torch.arange(n)
    out = A.color_jitter_(x[rows].clone(), schedule.rows(rows), sparse)
    torch.testing.assert_close(out, ref[rows], atol=1e-5, rtol=0)


def test_gaussian_blur_matches_torchvision_per_row():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 24, 20, generator=g)
    sigma = torch.tensor([0.1, 0.7, 2.0, 1.3])
    apply = torch.tensor([True, True, True, False])
    out = A.gaussian_blur(x, sigma, apply, 9)
    for i in range(3):
        torch.testing.assert_close(out[i], TF.gaussian_blur(x[i], [9, 9], [float(sigma[i])] * 2), atol=1e-6, rtol=0)
    torch.testing.assert_close(out[3], x[3], atol=0, rtol=0)
    into = x.clone()
    assert A.gaussian_blur(into, sigma, apply, 9, out=into) is into  # written in place, same values
    torch.testing.assert_close(into, out, atol=0, rtol=0)


@pytest.mark.parametrize("mask,runs", [
    ([0, 1, 1, 0, 0, 1, 1, 1], [(1, 3), (5, 8)]),  # few runs: slices in place
    ([1, 0, 1, 0, 1, 0, 1, 1], [(0, 1), (2, 3), (4, 5), (6, 8)]),  # many runs: gathered rows
    ([0] * 8, []),
    ([1] * 8, [(0, 8)]),
])  # fmt: skip
@pytest.mark.parametrize("in_place", [False, True])
def test_sparse_steps_touch_only_the_masked_rows(mask, runs, in_place):
    """Few runs of masked rows are processed in place as slices, many runs on gathered rows: same result, and the
    per-row parameters are indexed consistently either way."""
    assert A._true_runs([bool(v) for v in mask]) == runs
    x = torch.rand(8, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    param = torch.arange(8, dtype=torch.float32) + 2.0

    def scale(rows, _apply, sel):
        factor = param[sel].view(-1, 1, 1, 1)
        return rows.mul_(factor) if in_place else rows * factor

    m = torch.tensor(mask, dtype=torch.bool)
    out = BatchViews._apply(x.clone(), m, True, scale)
    expected = torch.where(m.view(-1, 1, 1, 1), x * param.view(-1, 1, 1, 1), x)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


def test_grayscale_and_solarize_match_torchvision():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 8, 8, generator=g)
    apply = torch.tensor([True, False, True])
    gray, sol = A.grayscale(x, apply), A.solarize(x, apply)
    for i in range(3):
        expect_gray = TF.rgb_to_grayscale(x[i], num_output_channels=3) if apply[i] else x[i]
        expect_sol = TF.solarize(x[i], 0.5) if apply[i] else x[i]
        torch.testing.assert_close(gray[i], expect_gray, atol=0, rtol=0)
        torch.testing.assert_close(sol[i], expect_sol, atol=0, rtol=0)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_crop_resize_is_torchvisions_antialiased_resized_crop(interpolation):
    """Both resamplers give torchvision's ``resized_crop(..., antialias=True)`` of each box, up- and downsampling:
    the vectorised float one (GPU path) to float precision without reading outside its crop (NaN there), the
    per-crop uint8 one (CPU path) exactly as torchvision on the uint8 image; flips mirror the crop."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (3, 3, 40, 40), generator=g, dtype=torch.uint8)
    boxes = torch.tensor([[0, 0, 40, 40], [3, 5, 9, 14], [10, 2, 30, 37], [1, 1, 25, 6]])
    index = torch.tensor([0, 1, 2, 1])
    mode = getattr(InterpolationMode, interpolation.upper())
    for size in (8, 16, 57):
        ref = torch.stack([TF.resized_crop(images[i].float() / 255, *box.tolist(), [size, size], interpolation=mode,
                                           antialias=True) for i, box in zip(index.tolist(), boxes)])  # fmt: skip
        for k, (top, left, h, w) in enumerate(boxes.tolist()):
            nan_outside = torch.full((3, 3, 40, 40), float("nan"))
            nan_outside[index[k], :, top : top + h, left : left + w] = images[index[k], :, top : top + h, left : left + w] / 255
            one = A.crop_resize(nan_outside, boxes[k : k + 1], index[k : k + 1], size, interpolation=interpolation)
            torch.testing.assert_close(one[0], ref[k], atol=1e-5, rtol=0)
        flip = torch.tensor([True, False, True, False])
        flipped = A.crop_resize(images.float() / 255, boxes, index, size, flip, interpolation)
        torch.testing.assert_close(flipped, torch.where(flip.view(-1, 1, 1, 1), ref.flip(-1), ref), atol=1e-5, rtol=0)
        u8 = A.crop_resize_uint8(images, boxes.tolist(), index.tolist(), size, flip.tolist(), interpolation)
        ref_u8 = torch.stack([TF.resized_crop(images[i], *box.tolist(), [size, size], interpolation=mode,
                                              antialias=True) for i, box in zip(index.tolist(), boxes)])  # fmt: skip
        assert u8.dtype == torch.uint8
        assert torch.equal(u8, torch.where(flip.view(-1, 1, 1, 1), ref_u8.flip(-1), ref_u8))
        as_float = A.crop_resize_uint8(images, boxes.tolist(), index.tolist(), size, flip.tolist(), interpolation, True)
        assert as_float.dtype == torch.float32 and as_float.is_contiguous()
        assert torch.equal(as_float, u8.float() * (1.0 / 255.0))
        # quantised after each pass as the uint8 kernel (whose weights are fixed-point), the float resampler is
        # within two levels of it (one, plus one from the first pass through bicubic's lobes), mostly equal
        levels = (A.crop_resize(images.float() / 255, boxes, index, size, flip, interpolation, quantize=True) * 255
                  - u8.float()).abs()  # fmt: skip
        assert levels.max() <= 2.0 + 1e-3 and levels.mean() < 0.1, (levels.max(), levels.mean())


# ---- whole batches -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("view_kind", ["images", "multicrop", "global_views"])
def test_outputs_per_view_kind_are_the_forward_kwargs(view_kind):
    data = _data(image_size=24, **{"multicrop.local_size": 12, "multicrop.n_local": 3})
    declared = {"images": single_view(data), "multicrop": multicrop_views(data),
                "global_views": multicrop_views(data, with_locals=False)}[view_kind]
    views = BatchViews(declared)
    out = views(_canvases(5, 30), generator=torch.Generator().manual_seed(0))
    if view_kind == "images":
        assert set(out) == {"images"} and out["images"].shape == (5, 3, 24, 24)
        tensors = [out["images"]]
    else:
        expected = {"global_views", "local_views"} if view_kind == "multicrop" else {"global_views"}
        assert set(out) == expected
        assert [v.shape for v in out["global_views"]] == [(5, 3, 24, 24)] * 2
        if view_kind == "multicrop":
            assert [v.shape for v in out["local_views"]] == [(5, 3, 12, 12)] * 3
        tensors = out["global_views"] + out.get("local_views", [])
    for t in tensors:
        assert t.dtype == torch.float32 and torch.isfinite(t).all()
        assert t.min() >= -1.0 - 1e-6 and t.max() <= 1.0 + 1e-6  # (x - 0.5) / 0.5 of x in [0, 1]


def test_normalisation_and_identity_crop():
    """A full-image crop at the canvas size is the normalised image; a black image stays black in every view."""
    images = _canvases(3, 16)
    out = BatchViews({"images": ViewGroup((ViewRecipe(16, (1.0, 1.0)),), single=True)})(images, generator=torch.Generator().manual_seed(0))
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(out["images"], (images.float() / 255 - mean) / std, atol=1e-6, rtol=0)
    black = BatchViews(dino_recipes(16, 8, n_local=2))(torch.zeros(4, 3, 20, 20, dtype=torch.uint8))
    for v in black["global_views"] + black["local_views"]:
        torch.testing.assert_close(v, torch.full_like(v, -1.0), atol=1e-6, rtol=0)


def test_each_sample_and_each_view_differs():
    """The same image in every slot of the batch: per-sample parameters give different views."""
    image = _canvases(1, 32)
    out = BatchViews(dino_recipes(16, 8, n_local=2))(image.expand(8, -1, -1, -1).contiguous(),
                                                     generator=torch.Generator().manual_seed(0))  # fmt: skip
    for v in out["global_views"] + out["local_views"]:
        flat = v.flatten(1)
        assert (torch.cdist(flat, flat) + torch.eye(8) > 1e-3).all()
    assert not torch.allclose(out["global_views"][0], out["global_views"][1])


def test_padded_canvas_crops_only_the_valid_region():
    """What lies outside each image's valid (h, w) never reaches a view: two padding values give the same views,
    and every crop box lies inside the valid region."""
    sizes = torch.tensor([[32, 32], [10, 32], [32, 9], [5, 6], [17, 23]])
    views = BatchViews(dino_recipes(16, 8, n_local=2))
    a = views(_canvases(5, 32, sizes=sizes, pad_value=0), sizes, torch.Generator().manual_seed(3))
    b = views(_canvases(5, 32, sizes=sizes, pad_value=255), sizes, torch.Generator().manual_seed(3))
    for key in a:
        for va, vb in zip(a[key], b[key]):
            torch.testing.assert_close(va, vb, atol=0, rtol=0)
    g = torch.Generator().manual_seed(0)
    for recipes in dino_recipes(16, 8, n_local=2).values():
        heights, widths = sizes[:, 0].repeat(200), sizes[:, 1].repeat(200)
        boxes = A.sample_view_params(recipes, heights, widths, g).boxes
        h_valid, w_valid = heights.repeat(len(recipes)), widths.repeat(len(recipes))
        top, left, h, w = boxes.unbind(1)
        assert (top >= 0).all() and (left >= 0).all() and (h >= 1).all() and (w >= 1).all()
        assert (top + h <= h_valid).all() and (left + w <= w_valid).all()


def test_generator_makes_views_reproducible():
    views = BatchViews(dino_recipes(16, 8, n_local=2))
    images = _canvases(4, 24)
    a = views(images, generator=torch.Generator().manual_seed(7))
    b = views(images, generator=torch.Generator().manual_seed(7))
    c = views(images, generator=torch.Generator().manual_seed(8))
    assert all(torch.equal(x, y) for x, y in zip(a["local_views"], b["local_views"]))
    assert all(torch.equal(x, y) for x, y in zip(a["global_views"], b["global_views"]))
    assert not torch.equal(a["global_views"][0], c["global_views"][0])


@pytest.mark.parametrize("per_row_min", [None, 0])
def test_sparse_cpu_path_equals_dense_device_path(per_row_min, monkeypatch):
    """The CPU's path (uint8 crops; random steps only on the rows that draw them, rows sorted by jitter order) and
    the GPU's path (float crops; every step on every row, identity parameters elsewhere) give the same views up to
    the uint8 kernels' rounding. ``per_row_min=0``: the CPU path for large rows (per-view outputs written row by
    row, one op per run of rows) on these small rows."""
    if per_row_min is not None:
        monkeypatch.setattr(A, "CPU_PER_ROW_MIN_VALUES", per_row_min)
    images = _canvases(12, 40)
    sizes = torch.tensor([[40, 40], [30, 40], [40, 25]] * 4)
    recipes = dino_recipes(24, 12, n_local=3)
    dense = BatchViews(recipes, sparse=False)(images, sizes, torch.Generator().manual_seed(0))
    sparse = BatchViews(recipes, sparse=True)(images, sizes, torch.Generator().manual_seed(0))
    level = 1 / 255 / min(STD)  # one uint8 level after normalisation
    for key in dense:
        for d, s in zip(dense[key], sparse[key]):
            diff = (d - s).abs()  # the resamplers: float vs uint8 fixed-point weights (a level or two, rarely)
            assert diff.max() <= 4 * level and diff.mean() < 0.05 * level, (key, diff.max() / level, diff.mean() / level)


def test_eval_views_are_the_centred_square_of_the_valid_region():
    images = _canvases(2, 40)
    sizes = torch.tensor([[20, 40], [40, 40]])
    out = eval_views(images, sizes, 20, crop_fraction=1.0, interpolation="bilinear")
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    torch.testing.assert_close(out[0], (images[0, :, :20, 10:30].float() / 255 - mean) / std, atol=1e-6, rtol=0)
    halved = TF.resize(images[1], [20, 20], antialias=True)  # torchvision's bilinear + antialias, as the eval path
    torch.testing.assert_close(out[1], (halved.float() / 255 - mean) / std, atol=1e-5, rtol=0)


def test_bad_inputs_are_refused_with_the_reason():
    views = BatchViews(single_view(_data(image_size=16)))
    with pytest.raises(ValueError, match="uint8"):
        views(torch.rand(2, 3, 16, 16))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        views(torch.zeros(2, 1, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="sizes"):
        views(torch.zeros(2, 3, 16, 16, dtype=torch.uint8), torch.tensor([16, 16]))
    with pytest.raises(ValueError, match="differ in size"):
        BatchViews({"views": [ViewRecipe(16, (0.5, 1.0)), ViewRecipe(8, (0.5, 1.0))]})
    with pytest.raises(ValueError, match="exactly one recipe"):
        ViewGroup((ViewRecipe(16, (0.5, 1.0)),) * 2, single=True)
    with pytest.raises(ValueError, match="scale"):
        ViewRecipe(16, (0.0, 1.0))
    with pytest.raises(ValueError, match="solarize_p"):
        ViewRecipe(16, (0.5, 1.0), solarize_p=1.5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_on_cuda_matches_cpu_for_the_same_parameters():
    """On the GPU (dense path, parameters drawn on the CPU generator's device and moved): the CPU's dense views
    (the same float resampler); with a CUDA generator, no host synchronisation."""
    images = _canvases(16, 48)
    sizes = torch.tensor([[48, 48], [30, 48], [48, 33], [20, 20]] * 4)
    views = BatchViews(dino_recipes(32, 16, n_local=4))
    cpu = BatchViews(dino_recipes(32, 16, n_local=4), sparse=False)(images, sizes, torch.Generator().manual_seed(0))
    gpu = views(images.cuda(), sizes.cuda(), torch.Generator().manual_seed(0))
    for key in cpu:
        for c, g in zip(cpu[key], gpu[key]):
            assert g.device.type == "cuda" and g.dtype == torch.float32
            torch.testing.assert_close(g.cpu(), c, atol=1e-4, rtol=0)
    generator = torch.Generator(device="cuda").manual_seed(0)
    views(images.cuda(), sizes.cuda(), generator)  # constants made once per device
    torch.cuda.set_sync_debug_mode("error")  # any host synchronisation raises
    try:
        on_device = views(images.cuda(), sizes.cuda(), generator)
        evaluated = eval_views(images.cuda(), sizes.cuda(), 32)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert on_device["global_views"][0].device.type == "cuda" and evaluated.shape == (16, 3, 32, 32)
