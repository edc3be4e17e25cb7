"""Redundancy-reduction objectives of VICReg and Barlow Twins, their projectors and their collectives.

* **VICReg** (Bardes, Ponce, LeCun, "VICReg: Variance-Invariance-Covariance Regularization for Self-Supervised
  Learning", ICLR 2022, arXiv 2105.04906, Eq. 1-6; facebookresearch/vicreg ``main_vicreg.py`` ``VICReg.forward``).
  With projections ``Z, Z' [n, d]`` of the two views, gathered over all workers (``N = n * W`` rows) for the
  variance and covariance terms:

      s(Z, Z')  = mean_{i,j} (Z_ij - Z'_ij)^2                                   (invariance, the local batch)
      v(Z)      = mean_j relu(1 - sqrt(Var_j(Z) + 1e-4))                         (variance, unbiased Var over N)
      C(Z)      = (Z - mean Z)^T (Z - mean Z) / (N - 1),  c(Z) = sum_{i != j} C(Z)_ij^2 / d   (covariance)
      loss      = lambda s(Z, Z') + mu (v(Z) + v(Z')) / 2 + nu (c(Z) + c(Z'))

  with ``lambda = sim_coeff = 25``, ``mu = std_coeff = 25``, ``nu = cov_coeff = 1``. The gather keeps the gradient
  (:class:`FullGatherLayer`, the reference's): each worker's backward sums the gradients of every worker's copy of
  the gathered rows, so after DDP's average the gradient is that of the global loss.
* **Barlow Twins** (Zbontar, Jing, Misra, LeCun, Deny, "Barlow Twins: Self-Supervised Learning via Redundancy
  Reduction", ICML 2021, arXiv 2103.03230, Eq. 1-2; facebookresearch/barlowtwins ``main.py`` ``BarlowTwins.forward``).
  With batch-normalised projections ``A = BN(Z), B = BN(Z')`` (affine-free BatchNorm over the batch) and the global
  batch ``N = n * W``:

      C_ij = sum_b A_bi B_bj / N   (summed over the workers)
      loss = sum_i (1 - C_ii)^2 + lambd * sum_{i != j} C_ij^2,   lambd = 0.0051

  The reference divides by the global batch and sums ``C`` over the workers with an in-place ``all_reduce`` that
  autograd does not see: the value is the global matrix, the gradient flows through the local term only
  (:func:`cross_correlation` does the same, so the gradients match the reference's worker for worker).

Both losses run in float32 with autocast off: under bf16 the ``d x d`` matrices (8192 x 8192 in the papers) lose the
small off-diagonal terms they penalise. Everything also works with one process (no ``torch.distributed`` group, or a
group of one): the collectives are then the identity.
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
from methods.distributed import all_reduce_sum, collective_device


# ---- collectives ----------------------------------------------------------------------------------------------
def world_size() -> int:
    """Number of workers of the ``torch.distributed`` group, 1 when there is none."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class FullGatherLayer(torch.autograd.Function):
    """All-gather with gradient (facebookresearch/vicreg ``main_vicreg.py`` ``FullGatherLayer``): forward returns
    every worker's ``x``; backward sums the incoming gradients over the workers and keeps this worker's slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        y = x.to(collective_device())
        output = [torch.zeros_like(y) for _ in range(dist.get_world_size())]
        dist.all_gather(output, y.contiguous())
        ctx.device = x.device
        return tuple(o.to(x.device) for o in output)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        all_gradients = torch.stack(grads).to(collective_device())
        dist.all_reduce(all_gradients)
        return all_gradients[dist.get_rank()].to(ctx.device)


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """``[n, d] -> [n * W, d]``: the rows of every worker in rank order, differentiable (:class:`FullGatherLayer`);
    ``x`` itself with one worker. Every worker must pass the same shape."""
    if world_size() <= 1:
        return x
    return torch.cat(FullGatherLayer.apply(x), dim=0)


def off_diagonal(x: torch.Tensor) -> torch.Tensor:
    """The ``n (n - 1)`` off-diagonal entries of a square ``[n, n]`` matrix, flattened (both references' helper)."""
    n, m = x.shape
    if n != m:
        raise ValueError(f"off_diagonal needs a square matrix, got {tuple(x.shape)}")
    return x.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


# ---- VICReg -----------------------------------------------------------------------------------------------------
@dataclass
class VICRegTerms:
    """``loss`` (weighted sum) and the unweighted terms: ``invariance`` s, ``variance`` (v(Z) + v(Z')) / 2,
    ``covariance`` c(Z) + c(Z') (module docstring)."""

    loss: torch.Tensor
    invariance: torch.Tensor
    variance: torch.Tensor
    covariance: torch.Tensor


def _variance_covariance(z: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``v(Z)`` and ``c(Z)`` of the gathered ``z [N, d]`` (module docstring)."""
    z = z - z.mean(dim=0)
    std = torch.sqrt(z.var(dim=0) + eps)
    cov = (z.T @ z) / (z.shape[0] - 1)
    return torch.mean(F.relu(1 - std)), off_diagonal(cov).pow(2).sum().div(z.shape[1])


def vicreg_loss(
    z1: torch.Tensor, z2: torch.Tensor, sim_coeff: float = 25.0, std_coeff: float = 25.0, cov_coeff: float = 1.0,
    eps: float = 1e-4,
) -> VICRegTerms:
    """VICReg's loss of the projections ``z1, z2 [n, d]`` of the two views (module docstring), in float32; the
    variance and covariance terms see the rows of every worker (:func:`gather_with_grad`)."""
    with torch.autocast(z1.device.type, enabled=False):
        z1, z2 = z1.float(), z2.float()
        invariance = F.mse_loss(z1, z2)
        v1, c1 = _variance_covariance(gather_with_grad(z1), eps)
        v2, c2 = _variance_covariance(gather_with_grad(z2), eps)
        variance, covariance = v1 / 2 + v2 / 2, c1 + c2
        loss = sim_coeff * invariance + std_coeff * variance + cov_coeff * covariance
    return VICRegTerms(loss, invariance.detach(), variance.detach(), covariance.detach())


# ---- Barlow Twins -----------------------------------------------------------------------------------------------
@dataclass
class BarlowTwinsTerms:
    """``loss`` and its unweighted parts ``on_diagonal`` sum (1 - C_ii)^2 and ``off_diagonal`` sum C_ij^2."""

    loss: torch.Tensor
    on_diagonal: torch.Tensor
    off_diagonal: torch.Tensor


def cross_correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``C = A^T B / N`` summed over the workers, for batch-normalised ``a, b [n, d]`` and ``N = n * W`` (every worker
    holds ``n`` rows, as the reference's ``per_device_batch_size``). The value is the global matrix; the gradient
    flows through this worker's term only, as the reference's in-place ``all_reduce``."""
    c = (a.T @ b) / (a.shape[0] * world_size())
    if world_size() <= 1:
        return c
    return c + (all_reduce_sum(c) - c).detach()


def barlow_twins_loss(a: torch.Tensor, b: torch.Tensor, lambd: float = 0.0051) -> BarlowTwinsTerms:
    """Barlow Twins' loss of the batch-normalised projections ``a, b [n, d]`` (module docstring), in float32."""
    with torch.autocast(a.device.type, enabled=False):
        c = cross_correlation(a.float(), b.float())
        on_diag = torch.diagonal(c).add(-1).pow(2).sum()
        off_diag = off_diagonal(c).pow(2).sum()
        loss = on_diag + lambd * off_diag
    return BarlowTwinsTerms(loss, on_diag.detach(), off_diag.detach())


# ---- projectors and argument rules --------------------------------------------------------------------------------
def redundancy_projector(in_dim: int, dims: Sequence[int], hidden_bias: bool = True) -> nn.Sequential:
    """``in_dim -> dims[0] -> ... -> dims[-1]``: ``Linear-BatchNorm-ReLU`` for every width but the last, then a bias-free
    ``Linear`` (PyTorch's default initialisation). VICReg's expander (``main_vicreg.py`` ``Projector``: hidden
    layers with bias) and Barlow Twins' projector (``main.py``: ``hidden_bias=False``), both 8192-8192-8192."""
    dims = [int(d) for d in dims]
    if not dims:
        raise ValueError("projector_dims needs at least one width")
    layers: list[nn.Module] = []
    prev = int(in_dim)
    for dim in dims[:-1]:
        layers += [nn.Linear(prev, dim, bias=hidden_bias), nn.BatchNorm1d(dim), nn.ReLU(inplace=True)]
        prev = dim
    layers.append(nn.Linear(prev, dims[-1], bias=False))
    return nn.Sequential(*layers)


@dataclass(frozen=True)
class Widths(Constraint):
    """``param`` is a non-empty list of layer widths, each an integer >= 1."""

    param: str

    def check(self, kwargs: Mapping[str, Any], prefix: str = "") -> None:
        value = kwargs.get(self.param)
        ok = isinstance(value, Sequence) and not isinstance(value, str) and len(value) > 0
        if not (ok and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)):
            raise ConstraintError(prefix + self.param, "a non-empty list of integers >= 1 (layer widths)", value)
