"""The two-view joint-embedding family: a backbone (timm ViT or ResNet), two augmented views, a loss between them.

SimCLR, BYOL, MoCo v3, VICReg and Barlow Twins share what is here and differ in their heads and loss:

* **Backbone** (:mod:`methods.backbones`): ``encoder_name`` a timm ViT or ResNet, ``encoder_kwargs`` passed on;
  ``low_resolution=True`` gives a ResNet the small-image stem (3x3 stride 1, no max-pool), as stable-pretraining's
  ``low_resolution`` and the papers' CIFAR-10 variants. ``backbone(x)`` is the pooled ``[B, D]`` embedding.
* **Views** (:mod:`methods.views`): ``forward(view1=..., view2=...)``, as stable-pretraining's ``forward(view1,
  view2)``; by default BYOL's asymmetric pair (:func:`methods.views.byol_recipes`) at ``data.image_size`` with
  ``data.augment.crop_scale`` (the papers' ``(0.08, 1)``: the recipes set it) and the flip / colour-jitter /
  solarisation probabilities of ``data.multicrop`` (``hflip_p``, ``color_jitter_p``, ``solarize_p``: DINO's two
  global views are BYOL's pair, and those keys' defaults 0.5 / 0.8 / 0.2 are BYOL's; solarisation applies to the
  second view only). Digits specs set ``hflip_p`` and ``solarize_p`` to 0 (a mirrored or inverted digit is another
  digit). A subclass overrides :meth:`JointEmbeddingMethod.view_recipes` (SimCLR: two identical views).
* **Evaluation**: ``forward(images=...)`` (or ``view1`` alone, in eval mode) returns the backbone embedding and a
  zero loss; the exported encoder is the backbone (the online network's, as the papers evaluate).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
from torch import nn

from methods.backbones import create_backbone, embedding_dim
from methods.base import MethodOutput, SSLMethod
from methods.views import ViewGroup, ViewRecipe, byol_recipes


def pair_probabilities(data: Mapping[str, Any]) -> dict[str, float]:
    """``hflip_p``, ``color_jitter_p`` and ``solarize_p`` of the two views, from ``data.multicrop`` (defaults: BYOL's
    0.5, 0.8, 0.2; see the module docstring)."""
    multicrop = data.get("multicrop") or {}
    defaults = {"hflip_p": 0.5, "color_jitter_p": 0.8, "solarize_p": 0.2}
    return {key: float(multicrop.get(key, value)) for key, value in defaults.items()}


@dataclass
class JointEmbeddingOutput(MethodOutput):
    """``loss`` (0 in eval); ``embedding`` ``[B, D]`` (backbone features of ``view1``, or of ``images`` in eval,
    detached in training); ``projection`` the first view's projector output ``[B, P]`` (None in eval)."""

    projection: torch.Tensor | None = None


class JointEmbeddingMethod(SSLMethod):
    """Base of the two-view methods (see the module docstring). Subclasses implement :meth:`joint_loss`."""

    backbones: ClassVar[tuple[str, ...]] = ("vit", "resnet")
    output_class: ClassVar[type[JointEmbeddingOutput]] = JointEmbeddingOutput

    def __init__(
        self,
        encoder_name: str | nn.Module = "vit_small_patch16_224",
        encoder_kwargs: dict[str, Any] | None = None,
        low_resolution: bool = False,
        pretrained: bool = False,
    ):
        super().__init__()
        kwargs = dict(encoder_kwargs or {})
        if low_resolution:
            kwargs["low_resolution"] = True
        if pretrained:
            kwargs["pretrained"] = True
        if isinstance(encoder_name, nn.Module):  # a pre-built backbone whose forward gives [B, D]
            self.backbone, self.encoder_name = encoder_name, type(encoder_name).__name__
        else:
            self.backbone, self.encoder_name = create_backbone(encoder_name, kwargs), encoder_name
        self.encoder_kwargs = {k: v for k, v in kwargs.items() if k != "pretrained"}
        self.embed_dim = embedding_dim(self.backbone)

    # ---- views --------------------------------------------------------------------------------------------
    @classmethod
    def view_recipes(cls, data: Mapping[str, Any]) -> tuple[ViewRecipe, ViewRecipe]:
        """The two views' recipes (default: BYOL's asymmetric pair, :func:`methods.views.byol_recipes`)."""
        augment = data.get("augment") or {}
        first, second = byol_recipes(int(data["image_size"]), tuple(augment.get("crop_scale", (0.08, 1.0))))
        probs = pair_probabilities(data)
        solarize = probs.pop("solarize_p")
        return replace(first, **probs), replace(second, solarize_p=solarize, **probs)

    @classmethod
    def training_views(cls, data: Mapping[str, Any]) -> dict[str, ViewGroup]:
        first, second = cls.view_recipes(data)
        return {"view1": ViewGroup((first,), single=True), "view2": ViewGroup((second,), single=True)}

    # ---- forward ------------------------------------------------------------------------------------------
    def joint_loss(self, view1: torch.Tensor, view2: torch.Tensor) -> JointEmbeddingOutput:
        """The training output for a batch of view pairs (``loss``, ``embedding``, the method's terms)."""
        raise NotImplementedError

    def forward(
        self, view1: torch.Tensor | None = None, view2: torch.Tensor | None = None, images: torch.Tensor | None = None
    ) -> JointEmbeddingOutput:
        if images is None:
            images = view1 if view2 is None else None
        if images is not None or not self.training:
            x = images if images is not None else view1
            embedding = self.backbone(x)
            return self.output_class(loss=embedding.new_zeros(()), embedding=embedding)
        return self.joint_loss(view1, view2)

    # ---- export -------------------------------------------------------------------------------------------
    def export_encoder(self) -> nn.Module:
        return self.backbone

    def encoder_config(self) -> dict[str, Any]:
        return {"encoder_name": self.encoder_name, "encoder_kwargs": dict(self.encoder_kwargs)}
