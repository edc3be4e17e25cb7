"""SimCLR (Chen, Kornblith, Norouzi, Hinton 2020, "A Simple Framework for Contrastive Learning of Visual
Representations", arXiv 2002.05709).

Two augmented views of each image go through the same backbone ``f`` and projector ``g``: ``z = g(f(x))``. The
NT-Xent loss (:func:`methods.contrastive.nt_xent`, Eq. 1) pulls the two views of an image together against the
``2(N - 1)`` other views of the batch (of every worker: SimCLR's cross-replica negatives):

    l(i, j) = -log( exp(sim(z_i, z_j) / T) / sum_{k != i} exp(sim(z_i, z_k) / T) ),   sim(u, v) = u.v / (|u| |v|)
    L = 1 / (2N) sum_k [ l(2k - 1, 2k) + l(2k, 2k - 1) ]

Projector (stable-pretraining ``_build_projector``, google-research/simclr ``model_util.projection_head``):
``Linear(bias=False) -> BN -> ReLU`` per hidden layer, then ``Linear(bias=False) -> BN`` with a scale and no shift.
Views: SimCLR's two identically distributed views (:func:`methods.views.simclr_recipes`: crop, flip 0.5, colour
jitter of strength 1 with p 0.8, grey 0.2, blur 0.5); ``data.augment.crop_scale`` sets the crop's area range and
``data.multicrop.hflip_p`` / ``color_jitter_p`` the flip and jitter probabilities (as the other joint-embedding
methods). Evaluation and export: the backbone ``f`` (the paper's ``h``, before the projector).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from methods import constraints as C
from methods.contrastive import Widths, bn_mlp, nt_xent
from methods.joint_embedding import JointEmbeddingMethod, JointEmbeddingOutput, pair_probabilities
from methods.views import ViewRecipe, simclr_recipes


class SimCLR(JointEmbeddingMethod):
    """SimCLR: backbone + BatchNorm MLP projector + NT-Xent (module docstring).

    :param encoder_name: timm ViT or ResNet name (or a module whose forward gives ``[B, D]``).
    :param projector_dims: hidden and output widths of the projector (``(2048, 2048, 256)``, stable-pretraining's;
        the paper's ResNet-50: ``(2048, 128)``).
    :param temperature: NT-Xent temperature ``T`` (0.5: the paper's CIFAR-10 / stable-pretraining default; 0.1 on
        ImageNet with large batches, Table 5 / B.7).
    :param low_resolution: a ResNet's 3x3 stride-1 stem without max-pool (the paper's CIFAR-10 variant).
    :param pretrained: timm's pretrained weights.
    :param encoder_kwargs: passed to timm (e.g. a small ViT's ``img_size``, ``patch_size``).
    """

    method_name = "simclr"
    constraints = (C.positive("temperature"), Widths("projector_dims"))

    def __init__(
        self,
        encoder_name: str | nn.Module = "vit_small_patch16_224",
        projector_dims: tuple[int, ...] = (2048, 2048, 256),
        temperature: float = 0.5,
        low_resolution: bool = False,
        pretrained: bool = False,
        encoder_kwargs: dict[str, Any] | None = None,
    ):
        super().__init__(encoder_name, encoder_kwargs, low_resolution, pretrained)
        self.projector = bn_mlp([self.embed_dim, *[int(d) for d in projector_dims]], last_bn="scale")
        self.temperature = float(temperature)

    @classmethod
    def view_recipes(cls, data: Mapping[str, Any]) -> tuple[ViewRecipe, ViewRecipe]:
        """Two draws of :func:`methods.views.simclr_recipes` (module docstring)."""
        augment = data.get("augment") or {}
        recipe, _ = simclr_recipes(int(data["image_size"]), tuple(augment.get("crop_scale", (0.08, 1.0))))
        probs = pair_probabilities(data)
        recipe = replace(recipe, hflip_p=probs["hflip_p"], color_jitter_p=probs["color_jitter_p"])
        return recipe, recipe

    def joint_loss(self, view1: torch.Tensor, view2: torch.Tensor) -> JointEmbeddingOutput:
        """NT-Xent of the projections of the two views; ``embedding``: ``f(view1)``, detached."""
        n = view1.shape[0]
        h = self.backbone(torch.cat([view1, view2], dim=0))  # one pass; BatchNorm sees both views, as the paper's
        z = self.projector(h)
        loss = nt_xent(z[:n], z[n:], self.temperature)
        return JointEmbeddingOutput(loss=loss, embedding=h[:n].detach(), projection=z[:n].detach())
