"""VICReg: Variance-Invariance-Covariance Regularization (Bardes, Ponce, LeCun, ICLR 2022, arXiv 2105.04906).

Two views of each image go through the same backbone and a 3-layer expander (8192-8192-8192: ``Linear-BN-ReLU`` x 2
then a bias-free ``Linear``); the loss of the expanded embeddings ``Z, Z'`` is

    loss = sim_coeff * mean (Z - Z')^2 + std_coeff * (v(Z) + v(Z')) / 2 + cov_coeff * (c(Z) + c(Z'))

with the variance hinge ``v(Z) = mean_j relu(1 - sqrt(Var_j(Z) + 1e-4))`` and the covariance penalty
``c(Z) = sum_{i != j} Cov(Z)_ij^2 / d``, both over the batch gathered from every worker (:mod:`methods.redundancy`,
facebookresearch/vicreg ``main_vicreg.py`` ``VICReg.forward``). Views: BYOL's asymmetric pair, as the paper's
(the :class:`methods.joint_embedding.JointEmbeddingMethod` default). Constructor names and defaults are
stable-pretraining's ``VICReg``; ``encoder_kwargs`` is the platform's extension (timm arguments of the backbone).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from methods import constraints as C
from methods.joint_embedding import JointEmbeddingMethod, JointEmbeddingOutput
from methods.redundancy import Widths, redundancy_projector, vicreg_loss


@dataclass
class VICRegOutput(JointEmbeddingOutput):
    """``loss``; ``embedding`` ``[B, D]`` (backbone features of the first view, detached in training); ``projection``
    ``[B, P]`` (first view's expander output); the unweighted terms ``invariance``, ``variance``, ``covariance``."""

    invariance: torch.Tensor | None = None
    variance: torch.Tensor | None = None
    covariance: torch.Tensor | None = None


class VICReg(JointEmbeddingMethod):
    """VICReg with a timm ViT or ResNet backbone (see the module docstring).

    :param encoder_name: timm model name (ViT or ResNet) or a pre-built backbone whose forward gives ``[B, D]``.
    :param projector_dims: widths of the expander's layers (default ``(8192, 8192, 8192)``, the paper's ResNet-50).
    :param sim_coeff: weight of the invariance term (default 25).
    :param std_coeff: weight of the variance term (default 25).
    :param cov_coeff: weight of the covariance term (default 1).
    :param low_resolution: small-image ResNet stem (3x3 stride 1, no max-pool), for 32 px inputs.
    :param pretrained: load pretrained timm weights for the backbone.
    :param encoder_kwargs: extension: extra keyword arguments of ``timm.create_model`` (e.g. ``img_size``).
    """

    method_name = "vicreg"
    output_class = VICRegOutput
    constraints = (
        Widths("projector_dims"),
        C.InRange("sim_coeff", 0.0),
        C.InRange("std_coeff", 0.0),
        C.InRange("cov_coeff", 0.0),
    )

    def __init__(
        self,
        encoder_name: str | nn.Module = "vit_small_patch16_224",
        projector_dims: tuple[int, ...] = (8192, 8192, 8192),
        sim_coeff: float = 25.0,
        std_coeff: float = 25.0,
        cov_coeff: float = 1.0,
        low_resolution: bool = False,
        pretrained: bool = False,
        encoder_kwargs: dict[str, Any] | None = None,
    ):
        super().__init__(encoder_name, encoder_kwargs, low_resolution, pretrained)
        self.projector = redundancy_projector(self.embed_dim, projector_dims, hidden_bias=True)
        self.sim_coeff, self.std_coeff, self.cov_coeff = float(sim_coeff), float(std_coeff), float(cov_coeff)

    def joint_loss(self, view1: torch.Tensor, view2: torch.Tensor) -> VICRegOutput:
        h1, h2 = self.backbone(view1), self.backbone(view2)
        z1, z2 = self.projector(h1), self.projector(h2)
        terms = vicreg_loss(z1, z2, self.sim_coeff, self.std_coeff, self.cov_coeff)
        return VICRegOutput(
            loss=terms.loss, embedding=h1.detach(), projection=z1.detach(), invariance=terms.invariance,
            variance=terms.variance, covariance=terms.covariance,
        )
