"""Barlow Twins: Self-Supervised Learning via Redundancy Reduction (Zbontar, Jing, Misra, LeCun, Deny, ICML 2021,
arXiv 2103.03230).

Two views of each image go through the same backbone and projector (8192-8192-8192: bias-free ``Linear-BN-ReLU``
x 2 then a bias-free ``Linear``); the projections are batch-normalised without affine parameters and their
cross-correlation over the global batch ``N`` is driven to the identity:

    C = BN(Z)^T BN(Z') / N,    loss = sum_i (1 - C_ii)^2 + lambd * sum_{i != j} C_ij^2,   lambd = 0.0051

(:mod:`methods.redundancy`; facebookresearch/barlowtwins ``main.py`` ``BarlowTwins.forward``: ``c.div_(batch_size)``
then ``all_reduce``). The normalising BatchNorm is a module, as the reference's ``self.bn``: the platform's
``SyncBatchNorm`` conversion on GPUs makes its statistics global, as the reference's. Views: BYOL's asymmetric pair,
as the paper's (the :class:`methods.joint_embedding.JointEmbeddingMethod` default). Constructor names and defaults
are stable-pretraining's ``BarlowTwins``; ``encoder_kwargs`` is the platform's extension.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from methods import constraints as C
from methods.joint_embedding import JointEmbeddingMethod, JointEmbeddingOutput
from methods.redundancy import Widths, barlow_twins_loss, redundancy_projector


@dataclass
class BarlowTwinsOutput(JointEmbeddingOutput):
    """``loss``; ``embedding`` ``[B, D]`` (backbone features of the first view, detached in training); ``projection``
    ``[B, P]`` (first view's projector output); the unweighted ``on_diagonal`` and ``off_diagonal`` sums."""

    on_diagonal: torch.Tensor | None = None
    off_diagonal: torch.Tensor | None = None


class BarlowTwins(JointEmbeddingMethod):
    """Barlow Twins with a timm ViT or ResNet backbone (see the module docstring).

    :param encoder_name: timm model name (ViT or ResNet) or a pre-built backbone whose forward gives ``[B, D]``.
    :param projector_dims: widths of the projector's layers (default ``(8192, 8192, 8192)``, the paper's ResNet-50).
    :param lambd: weight of the off-diagonal terms (default 0.0051, the paper's).
    :param low_resolution: small-image ResNet stem (3x3 stride 1, no max-pool), for 32 px inputs.
    :param pretrained: load pretrained timm weights for the backbone.
    :param encoder_kwargs: extension: extra keyword arguments of ``timm.create_model`` (e.g. ``img_size``).
    """

    method_name = "barlow_twins"
    output_class = BarlowTwinsOutput
    constraints = (Widths("projector_dims"), C.InRange("lambd", 0.0))

    def __init__(
        self,
        encoder_name: str | nn.Module = "vit_small_patch16_224",
        projector_dims: tuple[int, ...] = (8192, 8192, 8192),
        lambd: float = 5.1e-3,
        low_resolution: bool = False,
        pretrained: bool = False,
        encoder_kwargs: dict[str, Any] | None = None,
    ):
        super().__init__(encoder_name, encoder_kwargs, low_resolution, pretrained)
        self.projector = redundancy_projector(self.embed_dim, projector_dims, hidden_bias=False)
        self.bn = nn.BatchNorm1d(int(projector_dims[-1]), affine=False)  # normalises z1 and z2 for C
        self.lambd = float(lambd)

    def joint_loss(self, view1: torch.Tensor, view2: torch.Tensor) -> BarlowTwinsOutput:
        h1, h2 = self.backbone(view1), self.backbone(view2)
        z1, z2 = self.projector(h1), self.projector(h2)
        with torch.autocast(z1.device.type, enabled=False):
            a, b = self.bn(z1.float()), self.bn(z2.float())
        terms = barlow_twins_loss(a, b, self.lambd)
        return BarlowTwinsOutput(
            loss=terms.loss, embedding=h1.detach(), projection=z1.detach(), on_diagonal=terms.on_diagonal,
            off_diagonal=terms.off_diagonal,
        )
