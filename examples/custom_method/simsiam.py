"""SimSiam (Chen & He, CVPR 2021, arXiv 2011.10566) as a plug-in method: a class in the user's own package.

Run it with ``method.name: examples.custom_method.simsiam:SimSiam`` (see ``simsiam_digits.yaml``); nothing in the
platform names it. Two views, one backbone; projector f and predictor h; the symmetric negative cosine with a
stop-gradient on the target branch:

    L = D(p1, sg(z2)) / 2 + D(p2, sg(z1)) / 2,   D(p, z) = -cos(p, z),   z = f(backbone(v)),   p = h(z)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from methods import constraints as C
from methods.joint_embedding import JointEmbeddingMethod, JointEmbeddingOutput


def _mlp(dims: list[int], last_bn: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        last = i == len(dims) - 2
        layers.append(nn.Linear(a, b, bias=last and not last_bn))
        if not last or last_bn:
            layers.append(nn.BatchNorm1d(b, affine=not last))
        if not last:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class SimSiam(JointEmbeddingMethod):
    """Backbone + 3-layer projector (``proj_dim``, BN on every layer) + bottleneck predictor (``pred_dim``)."""

    constraints = (C.positive_int("proj_dim"), C.positive_int("pred_dim"))

    def __init__(self, encoder_name: str = "resnet18", encoder_kwargs: dict[str, Any] | None = None,
                 proj_dim: int = 2048, pred_dim: int = 512, low_resolution: bool = False, pretrained: bool = False):
        super().__init__(encoder_name, encoder_kwargs, low_resolution, pretrained)
        self.projector = _mlp([self.embed_dim, proj_dim, proj_dim, proj_dim], last_bn=True)
        self.predictor = _mlp([proj_dim, pred_dim, proj_dim], last_bn=False)

    def joint_loss(self, view1: torch.Tensor, view2: torch.Tensor) -> JointEmbeddingOutput:
        h = self.backbone(torch.cat([view1, view2]))
        z = self.projector(h)
        p = self.predictor(z)
        (z1, z2), (p1, p2) = z.chunk(2), p.chunk(2)
        loss = -(F.cosine_similarity(p1, z2.detach()).mean() + F.cosine_similarity(p2, z1.detach()).mean()) / 2
        return JointEmbeddingOutput(loss=loss, embedding=h[: len(view1)].detach(), projection=z1.detach())
