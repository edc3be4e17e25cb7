"""Multi-crop views (DINO) and global-only views (iBOT): sizes, counts, normalisation, collation."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from benchmarks.per_sample_views import IMAGENET_MEAN, IMAGENET_STD, MultiCropTransform, multicrop_collate


def test_multicrop_sizes_and_counts():
    torch.manual_seed(0)
    tf = MultiCropTransform(32, 16, n_global=2, n_local=4)
    out = tf(torch.rand(3, 40, 48))
    assert set(out) == {"global_views", "local_views"}
    assert [v.shape for v in out["global_views"]] == [(3, 32, 32)] * 2
    assert [v.shape for v in out["local_views"]] == [(3, 16, 16)] * 4
    assert all(v.dtype == torch.float32 for v in out["global_views"] + out["local_views"])


def test_global_only_for_ibot_and_grayscale_uint8_input():
    tf = MultiCropTransform(24, 8, n_local=0)
    out = tf((torch.rand(1, 30, 30) * 255).to(torch.uint8))
    assert set(out) == {"global_views"} and [v.shape for v in out["global_views"]] == [(3, 24, 24)] * 2


def test_views_are_normalised():
    # A black image is invariant to crops, flips, colour jitter, grayscale and blur (and the first global and the
    # local crops are never solarised), so every view must equal (0 - mean) / std per channel.
    tf = MultiCropTransform(16, 8, n_local=2)
    out = tf(torch.zeros(3, 20, 20))
    expected = (-torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD)).reshape(3, 1, 1)
    for v in out["global_views"][:1] + out["local_views"]:
        torch.testing.assert_close(v, expected.expand_as(v), atol=1e-4, rtol=0)


def test_views_differ_between_crops():
    torch.manual_seed(1)
    out = MultiCropTransform(16, 8, n_local=2)(torch.rand(3, 32, 32))
    assert not torch.equal(out["global_views"][0], out["global_views"][1])


def test_collate_stacks_batches_with_and_without_labels():
    tf = MultiCropTransform(16, 8, n_local=3)
    samples = [tf(torch.rand(3, 20, 20)) for _ in range(5)]
    batch = multicrop_collate(samples)
    assert [v.shape for v in batch["global_views"]] == [(5, 3, 16, 16)] * 2
    assert [v.shape for v in batch["local_views"]] == [(5, 3, 8, 8)] * 3
    torch.testing.assert_close(batch["local_views"][2][4], samples[4]["local_views"][2])
    views, labels = multicrop_collate([(s, i % 2) for i, s in enumerate(samples)])
    assert labels.tolist() == [0, 1, 0, 1, 0] and len(views["global_views"]) == 2
    with pytest.raises(ValueError):
        multicrop_collate([samples[0], {"global_views": samples[0]["global_views"][:1]}])


def test_dataloader_feeds_dino_forward():
    from methods.dino import DINO

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return MultiCropTransform(32, 16, n_local=2)(torch.rand(3, 36, 36))

    batch = next(iter(DataLoader(DS(), batch_size=4, collate_fn=multicrop_collate)))
    torch.manual_seed(0)
    model = DINO(
        encoder_kwargs={"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2},
        n_prototypes=16,
        projector_hidden_dim=16,
        projector_bottleneck_dim=8,
    )
    out = model(**batch)
    assert torch.isfinite(out.loss) and out.embedding.shape == (4, 32)


def test_flip_jitter_solarise_probabilities_can_be_switched_off():
    """With scale (1, 1) crops, no flip, jitter or solarisation, and blur only on the first global crop, the
    second global view is exactly the normalised (bicubic-resized) image: nothing mirrored or inverted."""
    torch.manual_seed(0)
    img = torch.zeros(3, 16, 16)
    img[:, :, :4] = 1.0  # a bar on the left: a flip would move it to the right
    t = MultiCropTransform(16, 8, n_global=2, n_local=0, global_scale=(1.0, 1.0), hflip_p=0.0,
                           color_jitter_p=0.0, solarize_p=0.0, mean=(0.5,) * 3, std=(0.5,) * 3)
    for _ in range(10):
        g2 = t(img)["global_views"][1]
        if not torch.allclose(g2, (img - 0.5) / 0.5, atol=1e-4):  # the 10% blur of the 2nd crop may apply
            assert g2[:, :, :4].mean() > g2[:, :, -4:].mean()  # still not mirrored
    with pytest.raises(ValueError, match="hflip_p"):
        MultiCropTransform(16, 8, hflip_p=1.5)


def test_spec_rejects_probability_out_of_range():
    from ssl_platform.spec import SpecError, spec_from_dict

    with pytest.raises(SpecError, match=r"data\.multicrop\.solarize_p"):
        spec_from_dict({"name": "x", "method": {"name": "dino"}, "data": {"multicrop": {"solarize_p": 2.0}}})
