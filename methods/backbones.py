"""Encoder backbones by family: timm ViTs (every method) and timm ResNets (the joint-embedding methods).

A method declares the families it supports (``SSLMethod.backbones``); :func:`backbone_family` tells the family of an
``encoder_name`` from timm's model registry without building it, so an unsupported pair is refused first. Both
families are built with ``num_classes=0``: ``model(images)`` is the pooled ``[B, D]`` embedding (a ViT's normed
CLS token or average, a ResNet's global average pool), and exported weights load with
``timm.create_model(name, num_classes=0, **kwargs)``.

ResNets follow their papers (SimCLR, BYOL, MoCo, VICReg, Barlow Twins: ResNet-50 on ImageNet). For small images
(CIFAR-10 / digits) ``low_resolution=True`` replaces the 7x7 stride-2 stem and its max-pool with a 3x3 stride-1
convolution, the usual small-image variant (SimCLR's CIFAR-10 experiments, solo-learn's ``cifar`` backbones).
"""

from __future__ import annotations

from typing import Any

import timm
from torch import nn

from methods.vit import create_vit

# the timm modules of each family: ViTs (vision_transformer, deit, beit: data2vec's encoder), and
# ``timm.models.resnet`` (resnet*, wide_resnet*, resnext*, seresnet*)
_FAMILY_MODULES = {"vit": ("vision_transformer", "deit", "beit"), "resnet": ("resnet",)}
FAMILIES = tuple(_FAMILY_MODULES)


def backbone_family(encoder_name: str) -> str:
    """``"vit"`` or ``"resnet"`` for a timm model name, from timm's registry (no model is built).

    Raises ``ValueError`` for a name timm does not know or a family no method supports."""
    if not timm.is_model(encoder_name):
        raise ValueError(f"encoder_name {encoder_name!r} is not a timm model (e.g. 'vit_tiny_patch16_224', 'resnet18')")
    for family, modules in _FAMILY_MODULES.items():
        if timm.models.is_model_in_modules(encoder_name, modules):
            return family
    raise ValueError(f"encoder_name {encoder_name!r} is neither a ViT nor a ResNet; supported families: "
                     f"{list(FAMILIES)}")


def create_resnet(encoder_name: str, encoder_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """A timm ResNet with ``num_classes=0`` (pooled features); ``low_resolution=True``: 3x3 stride-1 stem, no max-pool."""
    kwargs = dict(encoder_kwargs or {})
    low_resolution = bool(kwargs.pop("low_resolution", False))
    kwargs.pop("img_size", None)  # the training size, kept in encoder_config for serving; a ResNet takes any size
    kwargs.setdefault("num_classes", 0)
    model = timm.create_model(encoder_name, **kwargs)
    if low_resolution:
        model.conv1 = nn.Conv2d(int(kwargs.get("in_chans", 3)), model.conv1.out_channels, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    return model


def create_backbone(encoder_name: str, encoder_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """The backbone of either family: :func:`methods.vit.create_vit` or :func:`create_resnet`."""
    if backbone_family(encoder_name) == "resnet":
        return create_resnet(encoder_name, encoder_kwargs)
    return create_vit(encoder_name, encoder_kwargs)


def embedding_dim(backbone: nn.Module) -> int:
    """The pooled embedding's width (timm's ``num_features``)."""
    return int(backbone.num_features)


def input_shape(backbone: nn.Module, encoder_kwargs: dict[str, Any], image_size: int | None = None) -> tuple[int, int, int]:
    """``(C, H, W)`` the backbone takes: a ViT's patch-embedding size, else ``image_size`` (a ResNet takes any)."""
    channels = int(encoder_kwargs.get("in_chans", 3))
    patch_embed = getattr(backbone, "patch_embed", None)
    if patch_embed is not None:
        img = patch_embed.img_size
        size = int(img[0] if isinstance(img, (tuple, list)) else img)
        return channels, size, size
    image_size = image_size or encoder_kwargs.get("img_size")
    if image_size is None:
        raise ValueError("input_shape: a ResNet's encoder_kwargs need 'img_size' (the size it was trained at)")
    return channels, int(image_size), int(image_size)
