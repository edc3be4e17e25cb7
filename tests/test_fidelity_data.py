"""Paper fidelity of the data path (issue #26): crops cut from full-resolution images, the evaluation protocol, each
method's normalisation and resampling, APL's grey and blur; each against the reference's transforms on the same input.

References (read from the official repositories): facebookresearch/dino main_dino.py (DataAugmentationDINO, lines
431-452), eval_linear.py lines 65-70 and eval_knn.py lines 32-37; bytedance/ibot README (ViT-S/16 command) and
main_ibot.py lines 586-608; facebookresearch/mae main_pretrain.py lines 123-127; le0x99/self-supervised-vision-transformers
APL/PreTrainer.py lines 24-30 (pt_train_transforms).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

from benchmarks.image_tree import encode_image
from methods.apl import APL
from methods.dino import DINO
from methods.ibot import iBOT
from methods.mae import MAE
from methods.registry import get_method_class
from methods.views import ViewGroup
from ssl_platform.data.augment import BatchViews, ViewRecipe, eval_views, sample_view_params
from ssl_platform.data.decode import decode_to_canvas
from ssl_platform.data.streaming import ImageBatch, canvas_size
from ssl_platform.spec import SpecError, load_spec
from ssl_platform.training.trainer import local_worker

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def photo(h: int = 375, w: int = 500, seed: int = 0) -> np.ndarray:
    """A smooth RGB image of ImageNet's typical size (low-frequency noise, bicubic-upsampled)."""
    rng = np.random.default_rng(seed)
    small = (rng.random((h // 25 + 1, w // 25 + 1, 3)) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC))


def _batch(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)[None].contiguous()


# ---- 1. crops from full-resolution images ------------------------------------------------------------------
@pytest.mark.parametrize("path", ["experiments/imagenet/dino_vit_small_100ep.yaml", "experiments/imagenet/ibot_vit_small.yaml",
                                  "experiments/imagenette/dino_vit_small.yaml", "experiments/imagenette/ibot_vit_small.yaml"])
def test_recipe_local_crops_are_cut_from_regions_of_the_papers_size(path):
    """At the recipe's settings a 500x375 JPEG keeps its resolution, and a local crop's region has the side the
    paper's ``RandomResizedCrop(96, scale=local_crops_scale)`` gives on the full image: ``sqrt(s * 500 * 375)``, e.g.
    DINO 0.05-0.4 -> 97-274 px, iBOT 0.05-0.25 -> 97-217 px (a 256 px canvas gave 50-140 px)."""
    spec = load_spec(path)
    _, h, w = decode_to_canvas(encode_image(photo()), canvas_size(spec.data), bool(spec.data.decode_draft))
    assert (h, w) == (375, 500)
    method = get_method_class(spec.method.name)
    views = BatchViews(method.training_views(spec.data), method.input_mean, method.input_std)
    for key, (lo_scale, hi_scale) in (("local_views", tuple(spec.data.multicrop.local_scale)),
                                      ("global_views", tuple(spec.data.multicrop.global_scale))):
        recipe = views.groups[key].recipes[0]
        assert recipe.scale == (lo_scale, hi_scale) and recipe.interpolation == "bicubic"
        n = 4000
        p = sample_view_params([recipe], torch.full((n,), h), torch.full((n,), w), torch.Generator().manual_seed(0))
        top, left, bh, bw = p.boxes.unbind(1)
        assert bool(((top + bh <= h) & (left + bw <= w) & (top >= 0) & (left >= 0)).all())
        side = (bh * bw).double().sqrt()
        lo, hi = math.sqrt(lo_scale * h * w), math.sqrt(hi_scale * h * w)
        assert float(side.min()) >= lo - 1.5 and float(side.max()) <= hi + 1.5
        assert float(side.quantile(0.01)) < lo + 0.1 * (hi - lo) and float(side.quantile(0.99)) > hi - 0.1 * (hi - lo)
    assert math.sqrt(0.05 * h * w) == pytest.approx(96.8, abs=0.1)
    assert math.sqrt(0.05 * 192 * 256) < 50.0  # the old 256 px canvas: half-size regions


def test_imagenet_recipes_keep_full_resolution_and_the_papers_views():
    ibot_spec = load_spec("experiments/imagenet/ibot_vit_small.yaml")
    ibot = ibot_spec.data.multicrop
    # iBOT README, ViT-S/16: --local_crops_number 10 --global_crops_scale 0.25 1 --local_crops_scale 0.05 0.25
    assert (ibot.n_global, ibot.n_local, ibot.local_size) == (2, 10, 96) and iBOT.training_views(ibot_spec.data) == DINO.training_views(ibot_spec.data)
    assert list(ibot.global_scale) == [0.25, 1.0] and list(ibot.local_scale) == [0.05, 0.25]
    for path in ("experiments/imagenet/dino_vit_small_100ep.yaml", "experiments/imagenet/mae_vit_base.yaml",
                 "experiments/imagenet/ibot_vit_small.yaml", "experiments/imagenet/data2vec_vit_base.yaml",
                 "experiments/imagenette/dino_vit_small.yaml", "experiments/imagenette/mae_vit_small.yaml",
                 "experiments/imagenette/ibot_vit_small.yaml", "experiments/imagenette/data2vec_vit_small.yaml"):
        data = load_spec(path).data
        assert canvas_size(data) >= 500 and not data.decode_draft, path
    # fairseq examples/data2vec/data/mae_image_dataset.py: RandomResizedCrop(..., interpolation=3), as MAE's
    assert get_method_class("data2vec").view_interpolation == "bicubic"


# ---- 4. normalisation: declared by the method, the same in training and evaluation ---------------------------
def test_methods_declare_their_references_normalisation():
    # DINO main_dino.py line 431, iBOT main_ibot.py line 586, MAE main_pretrain.py line 127: ImageNet's statistics;
    # data2vec: fairseq examples/data2vec/data/mae_image_dataset.py (MaeImageDataset.final_transform) ImageNet's;
    # SALT (code not public; built on V-JEPA / I-JEPA, whose src/transforms.py normalises with ImageNet's);
    # APL: PreTrainer.py line 29, Normalize((0.5,), (0.5,)).
    for name in ("dino", "ibot", "mae", "data2vec", "salt"):
        cls = get_method_class(name)
        assert (cls.input_mean, cls.input_std) == IMAGENET, name
    assert (APL.input_mean, APL.input_std) == ((0.5,) * 3, (0.5,) * 3)


@pytest.mark.parametrize("path", ["experiments/mae_vit_tiny_digits.yaml", "experiments/apl_digits.yaml",
                                  "experiments/ibot_vit_tiny_digits.yaml"])
def test_training_views_and_evaluation_input_use_the_methods_normalisation(path):
    # a flat grey image stays flat through crops, grey and blur (colour jitter off: it would change its level)
    spec = load_spec(path, ["scaling.precision=fp32", "data.multicrop.color_jitter_p=0", "data.multicrop.solarize_p=0"])
    method = get_method_class(spec.method.name)
    _, data, _ = local_worker(spec)
    level = 77
    images = torch.full((4, 3, 32, 32), level, dtype=torch.uint8)
    batch = ImageBatch(images, None, torch.zeros(4, dtype=torch.long))
    expected = (level / 255 - torch.tensor(method.input_mean)) / torch.tensor(method.input_std)
    views = data.views(batch, torch.Generator().manual_seed(0))
    first = views["images"] if "images" in views else views["global_views"][0]
    torch.testing.assert_close(first.mean(dim=(0, 2, 3)), expected.float(), atol=2e-2, rtol=0)  # jitter aside
    evaluated = data.eval_input(batch)
    torch.testing.assert_close(evaluated, expected.float().view(1, 3, 1, 1).expand_as(evaluated), atol=1e-5, rtol=0)


# ---- 1. evaluation protocol: Resize(256) + CenterCrop(224), bicubic, from the full-resolution image ----------
def test_evaluation_input_is_the_reference_resize_256_center_crop_224():
    # facebookresearch/dino eval_linear.py lines 65-70 (eval_knn.py lines 32-37 the same)
    reference = T.Compose([
        T.Resize(256, interpolation=3),
        T.CenterCrop(224),
        T.ToTensor(),
        T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ])
    crop_fraction = float(load_spec("experiments/imagenet/dino_vit_small_100ep.yaml").eval.crop_fraction)
    errors = {}
    for h, w in ((512, 640), (375, 500)):  # 640x512: the reference's crop box is whole source pixels (32, 96, 448)
        image = photo(h, w)
        canvas, vh, vw = decode_to_canvas(encode_image(image, "PNG"), 640)
        ref = reference(Image.fromarray(image))
        got = eval_views(_batch(canvas), torch.tensor([[vh, vw]]), 224, DINO.input_mean, DINO.input_std, crop_fraction)[0]
        whole = eval_views(_batch(canvas), torch.tensor([[vh, vw]]), 224, DINO.input_mean, DINO.input_std, 1.0)[0]
        errors[h] = float((got - ref).abs().mean()), float((whole - ref).abs().mean())
    assert errors[512][0] < 1e-3, errors  # the same pixels but for the border rows' filter taps
    # 500x375: the reference's box falls between pixels (top 23.4, left 85.0, its two scales 0.6827 / 0.682)
    assert errors[375][0] < 0.08 < 0.5 < errors[375][1], errors


# ---- 5. MAE's view: bicubic ---------------------------------------------------------------------------------
def test_mae_view_is_the_references_bicubic_random_resized_crop():
    # facebookresearch/mae main_pretrain.py lines 123-127:
    #   transforms.RandomResizedCrop(args.input_size, scale=(0.2, 1.0), interpolation=3),  # 3 is bicubic
    #   transforms.RandomHorizontalFlip(), transforms.ToTensor(), transforms.Normalize(ImageNet mean, std)
    assert MAE.view_interpolation == "bicubic" and APL.view_interpolation == "bilinear"
    data = load_spec("experiments/imagenet/mae_vit_base.yaml").data
    views = BatchViews(MAE.training_views(data), MAE.input_mean, MAE.input_std)
    image = photo(seed=1)
    heights, widths = torch.tensor([375]), torch.tensor([500])
    out = views(_batch(image), torch.tensor([[375, 500]]), torch.Generator().manual_seed(3))["images"][0]
    p = sample_view_params(list(views.groups["images"].recipes), heights, widths, torch.Generator().manual_seed(3))  # the same draws
    top, left, bh, bw = p.boxes[0].tolist()
    normalize = T.Compose([T.ToTensor(), T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])])

    def reference(mode):
        crop = TF.resized_crop(Image.fromarray(image), top, left, bh, bw, [224, 224], mode)
        return normalize(TF.hflip(crop) if bool(p.flip[0]) else crop)

    level = 1 / 255 / min(IMAGENET[1])
    bicubic = (out - reference(T.InterpolationMode.BICUBIC)).abs()
    bilinear = (out - reference(T.InterpolationMode.BILINEAR)).abs()
    assert float(bicubic.max()) <= 2.01 * level and float(bicubic.mean()) < 0.1 * level  # Pillow's, to its rounding
    assert float(bilinear.mean()) > 5 * float(bicubic.mean())


# ---- 11a. APL's grey and blur ------------------------------------------------------------------------------
def test_apl_recipes_carry_the_references_grey_and_blur():
    # le0x99/self-supervised-vision-transformers APL/PreTrainer.py lines 24-30 (pt_train_transforms):
    #   RandomHorizontalFlip(), RandomResizedCrop(size=96, scale=(0.6, 1.0)), RandomGrayscale(p=0.2),
    #   RandomApply([GaussianBlur(kernel_size=9, sigma=(0.1, 0.5))], 0.5), ToTensor(), Normalize((0.5,), (0.5,))
    for path in ("experiments/imagenet/apl_stl10_96px.yaml", "experiments/imagenette/apl_96px.yaml"):
        spec = load_spec(path)
        r = APL.training_views(spec.data)["images"].recipes[0]
        assert (r.size, r.scale, r.hflip_p, r.grayscale_p, r.blur_p, r.blur_sigma, r.blur_kernel, r.interpolation) == (
            96, (0.6, 1.0), 0.5, 0.2, 0.5, (0.1, 0.5), 9, "bilinear"), path
        assert spec.eval.crop_fraction == 1.0  # ft_test_transforms: ToTensor + Normalize, no crop
    with pytest.raises(SpecError, match="blur_kernel"):
        load_spec("experiments/apl_digits.yaml", ["data.augment.blur_kernel=8"])
    with pytest.raises(SpecError, match="eval.crop_fraction"):
        load_spec("experiments/apl_digits.yaml", ["eval.crop_fraction=0"])


def test_blur_is_torchvisions_gaussian_blur_with_the_given_kernel():
    recipe = ViewRecipe(96, (1.0, 1.0), blur_p=1.0, blur_sigma=(0.1, 0.5), blur_kernel=9)
    views = BatchViews({"images": ViewGroup((recipe,), single=True)}, mean=(0.0,) * 3, std=(1.0,) * 3)
    images = torch.from_numpy(np.stack([photo(96, 96, seed=s) for s in range(6)])).permute(0, 3, 1, 2).contiguous()
    images[:, :, ::7] = 255  # sharp edges, so that the kernel and sigma matter
    out = views(images, None, torch.Generator().manual_seed(0))["images"]
    p = sample_view_params([recipe], torch.full((6,), 96), torch.full((6,), 96), torch.Generator().manual_seed(0))
    assert float(p.sigma.min()) >= 0.1 and float(p.sigma.max()) <= 0.5 and bool(p.blur.all())
    for i in range(6):
        # torchvision.transforms.GaussianBlur(kernel_size=9, sigma) on the image (PIL -> tensor -> blurred -> uint8)
        ref = TF.gaussian_blur(images[i], [9, 9], [float(p.sigma[i])] * 2).float() / 255
        assert float((out[i] - ref).abs().max()) <= 0.6 / 255
        weakest = TF.gaussian_blur(images[i], [9, 9], [0.1, 0.1]).float() / 255  # per-image sigma ~ U(0.1, 0.5)
        assert float(p.sigma[i]) < 0.3 or float((out[i] - weakest).abs().max()) > 2 / 255
