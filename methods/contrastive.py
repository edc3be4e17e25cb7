"""Contrastive losses (InfoNCE, SimCLR's NT-Xent, MoCo v3's symmetric loss), the cross-worker gathers they need, and
the BatchNorm MLP heads of SimCLR and MoCo v3.

* **InfoNCE** (van den Oord et al. 2018; Chen et al. 2020): for L2-normalised queries ``q_i`` and candidates ``k_j``,
  ``l_i = -log( exp(q_i . k_{y_i} / T) / sum_j exp(q_i . k_j / T) )``, averaged over the queries.
* **NT-Xent** (SimCLR, Chen et al. 2020, arXiv 2002.05709, Eq. 1 and Algorithm 1): the ``2N`` projections of ``N``
  pairs; each anchor's positive is its other view, the ``2(N - 1)`` other samples are the negatives, the anchor itself
  is excluded; ``L = 1 / (2N) sum_k [l(2k-1, 2k) + l(2k, 2k-1)]``, the mean over the ``2N`` anchors (as the paper's
  Algorithm 1 and stable-pretraining's ``NTXEntLoss``; google-research/simclr ``objective.py`` returns the sum of the
  two directions' means, twice this). With ``W`` workers the candidates are every worker's projections
  (:func:`gather_with_grad`: SimCLR's cross-replica negatives, the gradient flows back to their worker).
* **MoCo v3** (Chen, Xie, He 2021, arXiv 2104.02057, Algorithm 1): ``ctr(q, k) = 2 T * CE(q k_all^T / T, y)`` with the
  momentum keys of every worker ``k_all`` (no gradient: facebookresearch/moco-v3 ``concat_all_gather``) and ``y_i`` the
  row of ``q_i``'s own key; the loss is ``ctr(q1, k2) + ctr(q2, k1)``.

Losses run in float32 at least (autocast's bf16 logits at ``T = 0.1 - 0.5`` lose the small differences the softmax reads).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from methods.constraints import Constraint, ConstraintError
from methods.distributed import collective_device


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_gather(x: torch.Tensor) -> list[torch.Tensor]:
    """Every worker's ``x`` (equal shapes), in rank order, on ``x``'s device (the collective on its own device)."""
    device = collective_device()
    y = x.detach().to(device).contiguous()
    out = [torch.empty_like(y) for _ in range(dist.get_world_size())]
    dist.all_gather(out, y)
    return [t.to(x.device) for t in out]


class _GatherWithGrad(torch.autograd.Function):
    """``all_gather`` whose backward sums every worker's gradient of the gathered copy and returns this worker's
    rows: worker ``s`` receives ``sum_r dL_r / dx_s``, so DDP's gradient average is the gradient of the mean loss.
    (An all-reduce, not a reduce-scatter: gloo has none.)"""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.rows = x.shape[0]
        return torch.cat(_all_gather(x), dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        device = grad.device
        total = grad.detach().to(collective_device(), copy=True).contiguous()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        start = dist.get_rank() * ctx.rows
        return total[start : start + ctx.rows].to(device)


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """``[W * n, ...]``: the ``[n, ...]`` tensors of all ``W`` workers concatenated in rank order, differentiable
    (see :class:`_GatherWithGrad`); ``x`` itself with one worker."""
    return _GatherWithGrad.apply(x) if world()[1] > 1 else x


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """``[W * n, ...]`` as :func:`gather_with_grad`, without gradient (moco-v3's ``concat_all_gather``)."""
    return torch.cat(_all_gather(x), dim=0) if world()[1] > 1 else x.detach()


def info_nce(query: torch.Tensor, keys: torch.Tensor, labels: torch.Tensor, temperature: float,
             self_mask: torch.Tensor | None = None) -> torch.Tensor:
    """InfoNCE (module docstring): ``CE(q_hat k_hat^T / T, labels)`` averaged over the ``[n, d]`` queries, with
    ``keys`` ``[m, d]``; ``self_mask`` ``[n, m]`` (bool) drops candidates (an anchor itself) from the softmax."""
    dtype = torch.promote_types(query.dtype, torch.float32)  # float32 at least (float64 stays float64)
    with torch.autocast(query.device.type, enabled=False):  # autocast would run the product in bf16
        q = F.normalize(query.to(dtype), dim=1)
        k = F.normalize(keys.to(dtype), dim=1)
        logits = q @ k.t() / temperature
        if self_mask is not None:
            logits = logits.masked_fill(self_mask, float("-inf"))
        return F.cross_entropy(logits, labels)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """SimCLR's NT-Xent (module docstring) of the projections ``z1``, ``z2`` ``[n, d]`` of ``n`` pairs: the mean over
    the ``2n`` local anchors, against the ``2 W n`` candidates of all workers (gathered with gradient)."""
    n = z1.shape[0]
    rank, size = world()
    anchors = torch.cat([z1, z2], dim=0)  # [2n, d]: view 1 of every sample, then view 2
    candidates = gather_with_grad(anchors)  # [2 W n, d], worker r's block at rows 2 r n ... 2 (r + 1) n
    local = torch.arange(2 * n, device=z1.device)
    offset = 2 * n * rank
    labels = offset + (local + n) % (2 * n)  # the other view of the same sample
    self_mask = torch.zeros(2 * n, 2 * n * size, dtype=torch.bool, device=z1.device)
    self_mask[local, offset + local] = True
    return info_nce(anchors, candidates, labels, temperature, self_mask)


def moco_contrastive(q: torch.Tensor, k: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """MoCo v3's ``ctr(q, k) = 2 T * CE(q_hat k_all_hat^T / T, y)`` (module docstring): predictions ``q`` ``[n, d]``,
    momentum keys ``k`` ``[n, d]`` (no gradient), the keys of every worker as candidates."""
    keys = gather_no_grad(k.to(torch.promote_types(k.dtype, torch.float32)))
    labels = torch.arange(q.shape[0], device=q.device) + q.shape[0] * world()[0]
    return info_nce(q, keys, labels, temperature) * (2.0 * temperature)


class ScaleOnlyBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm with a learned scale and no shift (TensorFlow's ``center=False``): SimCLR's last projector layer
    (google-research/simclr ``model_util.linear_layer``: ``batch_norm_relu(..., center=use_bias)`` with
    ``use_bias=False``), stable-pretraining's ``BatchNorm1dNoBias``."""

    def __init__(self, num_features: int):
        super().__init__(num_features)
        self.bias = None  # F.batch_norm with weight and no bias: y = gamma * x_hat


def bn_mlp(dims: list[int], last_bn: str = "affine") -> nn.Sequential:
    """``Linear(bias=False) -> BN -> ReLU`` for each hidden layer of ``dims = [in, h_1, ..., out]``, then
    ``Linear(bias=False)`` and a last BatchNorm: ``"affine"``, ``"scale"`` (:class:`ScaleOnlyBatchNorm1d`, SimCLR),
    ``"no_affine"`` (no gamma / beta: moco-v3 ``_build_mlp(last_bn=True)``) or ``"none"`` (no BatchNorm)."""
    if len(dims) < 2:
        raise ValueError(f"bn_mlp needs [in_dim, ..., out_dim], got {dims}")
    layers: list[nn.Module] = []
    for d_in, d_out in zip(dims[:-2], dims[1:-1]):
        layers += [nn.Linear(d_in, d_out, bias=False), nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
    layers.append(nn.Linear(dims[-2], dims[-1], bias=False))
    last = {"affine": lambda d: nn.BatchNorm1d(d), "scale": ScaleOnlyBatchNorm1d,
            "no_affine": lambda d: nn.BatchNorm1d(d, affine=False), "none": None}
    if last_bn not in last:
        raise ValueError(f"last_bn must be one of {list(last)}, got {last_bn!r}")
    if last[last_bn] is not None:
        layers.append(last[last_bn](dims[-1]))
    return nn.Sequential(*layers)


@dataclass(frozen=True)
class Widths(Constraint):
    """``param`` is a list of at least ``min_len`` layer widths, each an integer >= 1 (an MLP's ``dims``)."""

    param: str
    min_len: int = 1

    def check(self, kwargs: Mapping[str, Any], prefix: str = "") -> None:
        value = kwargs.get(self.param)
        ok = isinstance(value, Sequence) and not isinstance(value, str) and len(value) >= self.min_len
        if not (ok and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)):
            raise ConstraintError(prefix + self.param, f"a list of at least {self.min_len} integer widths >= 1", value)
