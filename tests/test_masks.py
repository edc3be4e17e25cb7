"""I-JEPA multi-block masks (methods.masks): geometry, non-overlap, equal counts, MAE multiblock use."""

from __future__ import annotations

import math

import pytest
import torch

from methods.masks import MultiBlockMaskGenerator


def _rect(idx: torch.Tensor, gw: int) -> tuple[int, int, bool]:
    """(height, width, filled) of the bounding box of a set of flat patch indices."""
    rows, cols = idx // gw, idx % gw
    h = int(rows.max() - rows.min() + 1)
    w = int(cols.max() - cols.min() + 1)
    return h, w, len(set(idx.tolist())) == h * w == idx.numel()


def test_shapes_equal_counts_sorted_and_no_overlap():
    gen = MultiBlockMaskGenerator((8, 8))
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        m = gen(6, generator=g)
        b, kc = m.context_idx.shape
        assert b == 6 and kc >= gen.min_keep
        assert m.target_idx.shape[:2] == (6, 4)
        assert torch.equal(m.context_idx, m.context_idx.sort(dim=1).values)
        # context_mask / target_mask agree with the indices
        assert torch.equal(m.context_mask.sum(1), torch.full((6,), kc))
        tm = torch.zeros(6, 64, dtype=torch.bool)
        tm.scatter_(1, m.flat_target_idx, True)
        assert torch.equal(tm, m.target_mask)
        # no context patch is a target patch
        for i in range(6):
            assert not set(m.context_idx[i].tolist()) & set(m.flat_target_idx[i].tolist())
        assert not (m.context_mask & m.target_mask).any()


def test_blocks_are_rectangles_of_one_size_per_batch():
    gen = MultiBlockMaskGenerator((10, 12))
    g = torch.Generator().manual_seed(1)
    for _ in range(10):
        m = gen(4, generator=g)
        h, w = m.target_block_size
        for i in range(4):
            for t in range(4):
                bh, bw, filled = _rect(m.target_idx[i, t], 12)
                assert (bh, bw) == (h, w) and filled


def test_block_size_formula_exact_cases():
    # k = int(N s); h = round(sqrt(k a)); w = round(sqrt(k / a)), each side below the grid (computed from the formula)
    for scale, ar in [(0.25, 1.0), (0.25, 4.0), (0.1, 0.5)]:
        gen = MultiBlockMaskGenerator((16, 16), target_scale=(scale, scale), target_aspect_ratio=(ar, ar))
        k = int(256 * scale)
        expected = (min(round(math.sqrt(k * ar)), 15), min(round(math.sqrt(k / ar)), 15))
        assert gen.block_size(gen.target_scale, gen.target_aspect_ratio) == expected
        m = gen(3, generator=torch.Generator().manual_seed(2))
        assert m.target_block_size == expected
        assert m.target_idx.shape[-1] == expected[0] * expected[1]


def test_scales_and_aspect_ratios_respected_on_large_grid():
    n_side = 32
    gen = MultiBlockMaskGenerator((n_side, n_side))
    g = torch.Generator().manual_seed(3)
    n = n_side * n_side
    for _ in range(100):
        h, w = gen.block_size(gen.target_scale, gen.target_aspect_ratio, g)
        assert 0.15 - 0.03 <= h * w / n <= 0.2 + 0.03
        assert 0.75 * 0.85 <= h / w <= 1.5 * 1.15
        hc, wc = gen.block_size(gen.context_scale, gen.context_aspect_ratio, g)
        assert hc == wc  # aspect ratio (1, 1)
        assert 0.85 - 0.03 <= hc * wc / n <= 1.0


def test_positions_reach_last_row_and_column():
    gen = MultiBlockMaskGenerator((8, 8))
    m = gen(256, generator=torch.Generator().manual_seed(4))
    idx = m.flat_target_idx
    assert bool(((idx // 8) == 7).any()) and bool(((idx % 8) == 7).any())
    assert bool(((idx // 8) == 0).any()) and bool(((idx % 8) == 0).any())


def test_reproducible_with_generator_and_min_keep():
    gen = MultiBlockMaskGenerator((8, 8), min_keep=10)
    a = gen(5, generator=torch.Generator().manual_seed(7))
    b = gen(5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.context_idx, b.context_idx) and torch.equal(a.target_idx, b.target_idx)
    assert a.context_idx.shape[1] >= 10


def test_infeasible_configuration_raises():
    gen = MultiBlockMaskGenerator((4, 4), target_scale=(0.9, 0.9), context_scale=(0.5, 0.5), max_tries=3)
    with pytest.raises(RuntimeError, match="no context"):
        gen(2)
    with pytest.raises(ValueError, match="target_scale"):
        MultiBlockMaskGenerator((8, 8), target_scale=(0.3, 0.2))


def test_mae_multiblock_uses_context_as_visible_set():
    from methods.mae import MAE

    torch.manual_seed(0)
    enc = {"img_size": 32, "patch_size": 4, "embed_dim": 64, "depth": 2, "num_heads": 2}
    model = MAE(mask_type="multiblock", encoder_kwargs=enc, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
    model.train()
    out = model(torch.randn(3, 3, 32, 32))
    assert torch.isfinite(out.loss)
    # masked fraction = non-context patches; a context block of >= 85 % minus 4 targets leaves a minority visible
    visible = (out.mask == 0).sum(1)
    assert bool((visible >= 4).all()) and bool((visible == visible[0]).all())


def test_union_target_idx_is_each_samples_union_padded_to_the_largest():
    masks = MultiBlockMaskGenerator((8, 8))(6, generator=torch.Generator().manual_seed(2))
    idx, valid = masks.union_target_idx()
    sizes = masks.target_mask.sum(dim=1)
    assert idx.shape == valid.shape == (6, int(sizes.max()))
    for b in range(6):
        union = torch.unique(masks.target_idx[b])  # overlapping blocks: each patch once
        assert int(valid[b].sum()) == len(union) == int(sizes[b])
        assert torch.equal(idx[b][valid[b]], union)  # raster order
        assert not masks.target_mask[b, idx[b][~valid[b]]].any()  # the padding points at non-target patches


class IJEPASizes:
    """facebookresearch/ijepa src/masks/multiblock.py:55-72 ``MaskCollator._sample_block_size``, ported."""

    def __init__(self, height, width):
        self.height, self.width = height, width

    def _sample_block_size(self, generator, scale, aspect_ratio_scale):
        _rand = torch.rand(1, generator=generator).item()
        # -- Sample block scale
        min_s, max_s = scale
        mask_scale = min_s + _rand * (max_s - min_s)
        max_keep = int(self.height * self.width * mask_scale)
        # -- Sample block aspect-ratio
        min_ar, max_ar = aspect_ratio_scale
        aspect_ratio = min_ar + _rand * (max_ar - min_ar)
        # -- Compute block height and width (given scale and aspect-ratio)
        h = int(round(math.sqrt(max_keep * aspect_ratio)))
        w = int(round(math.sqrt(max_keep / aspect_ratio)))
        while h >= self.height:
            h -= 1
        while w >= self.width:
            w -= 1

        return (h, w)


@pytest.mark.parametrize("grid", [(14, 14), (16, 16), (8, 8)])
def test_block_sizes_are_ijepas_one_draw_per_batch_seeded_per_call(grid):
    """ijepa multiblock.py:126-135 (``__call__``): ``g.manual_seed(seed)`` with the call's index, then ONE size for
    every target block (pred_mask_scale, aspect_ratio) and one for the context (enc_mask_scale, aspect (1, 1));
    in_1k_vith14_ep300.yaml's scales. The platform's ``step`` argument is that seed; without it, the call count."""
    ref = IJEPASizes(*grid)
    gen = MultiBlockMaskGenerator(grid)
    for seed in range(40):
        g = torch.Generator()
        g.manual_seed(seed)
        p_size = ref._sample_block_size(generator=g, scale=(0.15, 0.2), aspect_ratio_scale=(0.75, 1.5))
        e_size = ref._sample_block_size(generator=g, scale=(0.85, 1.0), aspect_ratio_scale=(1.0, 1.0))
        m = gen(3)  # the seed-th call
        assert (m.target_block_size, m.context_block_size) == (p_size, e_size)
        m = MultiBlockMaskGenerator(grid)(2, step=seed)
        assert (m.target_block_size, m.context_block_size) == (p_size, e_size)
        assert max(e_size) <= grid[0] - 1  # `while h >= self.height: h -= 1`


def test_contexts_keep_more_than_min_keep_patches():
    """ijepa multiblock.py:98 ``valid_mask = len(mask) > self.min_keep``; min_keep 10 (the ijepa configs)."""
    assert MultiBlockMaskGenerator((14, 14)).min_keep == 10
    gen = MultiBlockMaskGenerator((8, 8), target_scale=(0.2, 0.25))
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        assert gen(16, generator=g).context_idx.shape[1] > 10


def vjepa_block_size(height, width, generator, spatial_scale, aspect_ratio_scale, duration=1, temporal_scale=(1.0, 1.0)):
    """facebookresearch/jepa src/masks/multiblock3d.py:106-136 ``_MaskGenerator._sample_block_size``, ported (one frame)."""
    # -- Sample temporal block mask scale
    _rand = torch.rand(1, generator=generator).item()
    min_t, max_t = temporal_scale
    temporal_mask_scale = min_t + _rand * (max_t - min_t)
    t = max(1, int(duration * temporal_mask_scale))
    # -- Sample spatial block mask scale
    _rand = torch.rand(1, generator=generator).item()
    min_s, max_s = spatial_scale
    spatial_mask_scale = min_s + _rand * (max_s - min_s)
    spatial_num_keep = int(height * width * spatial_mask_scale)
    # -- Sample block aspect-ratio
    _rand = torch.rand(1, generator=generator).item()
    min_ar, max_ar = aspect_ratio_scale
    aspect_ratio = min_ar + _rand * (max_ar - min_ar)
    # -- Compute block height and width (given scale and aspect-ratio)
    h = int(round(math.sqrt(spatial_num_keep * aspect_ratio)))
    w = int(round(math.sqrt(spatial_num_keep / aspect_ratio)))
    h = min(h, height)
    w = min(w, width)
    return (t, h, w)


@pytest.mark.parametrize(("num_blocks", "scale"), [(8, 0.15), (2, 0.7)])
def test_vjepa_style_context_is_the_complement_of_the_union(num_blocks, scale):
    """jepa multiblock3d.py:155-190 ``__call__``: the size from a generator seeded per call, ``num_blocks`` blocks, context =
    complement of their union (truncated to the batch minimum), targets = the union; configs/pretrain/vitl16.yaml's
    two mask sets (8 x 0.15, 2 x 0.7, aspect 0.75-1.5)."""
    gen = MultiBlockMaskGenerator((14, 14), num_targets=num_blocks, target_scale=(scale, scale), style="vjepa")
    g = torch.Generator().manual_seed(5)
    for seed in range(10):
        ref = torch.Generator()
        ref.manual_seed(seed)
        _, h, w = vjepa_block_size(14, 14, ref, (scale, scale), (0.75, 1.5))
        m = gen(8, generator=g)
        assert m.target_block_size == (h, w)
        complement = ~m.target_mask
        assert not (m.context_mask & m.target_mask).any()
        assert m.context_idx.shape[1] == int(complement.sum(1).min()) > 0
        for b in range(8):  # each sample's first Kc complement patches, in raster order
            assert torch.equal(m.context_idx[b], complement[b].nonzero()[:, 0][: m.context_idx.shape[1]])


def test_min_keep_on_tiny_grids_is_a_quarter_of_the_context_block():
    """A 4x4 grid (32 px, patch 8) has contexts of at most 3x3: min_keep 10 cannot hold, a quarter of the block does."""
    gen = MultiBlockMaskGenerator((4, 4))
    for step in range(20):
        m = gen(4, step=step)
        hc, wc = m.context_block_size
        assert m.context_idx.shape[1] > (hc * wc) // 4
    assert MultiBlockMaskGenerator((14, 14)).sizes(torch.Generator().manual_seed(0))[2] == 10
