"""Projection heads for self-distillation (DINO, Caron et al. 2021, arXiv 2104.14294; iBOT, Zhou et al.
2022, arXiv 2111.07832).

DINO head: ``x -> MLP (3 layers, GELU, hidden h) -> bottleneck b -> z / ||z||_2 -> W z`` where the last layer
is weight-normalised with its gain fixed to 1 (``weight_g = 1`` in DINO), i.e. every prototype row is
``w_k = v_k / ||v_k||_2`` and there is no bias. DINO freezes that last layer during the first epoch by
dropping its gradients (:func:`cancel_gradients_last_layer`). DINO's ``norm_last_layer=False`` (its choice for
ViT-S, "better performance but can make the training unstable") makes the gain trainable: ``w_k = g_k v_k / ||v_k||``
with ``g_k`` initialised to 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from methods.vit import trunc_normal_init


class _RowScaledLinear(torch.autograd.Function):
    """``y = (x V^T) * s`` with ``s_k = g_k / n_k``, ``n_k = ||v_k||`` (``g = 1`` when ``gain`` is None): the
    weight-normalised layer with the normalisation applied to the ``[M, K]`` output columns instead of the
    ``[K, D]`` weight (``x . (v_k / n_k) = (x . v_k) / n_k``).

    Backward in closed form, with ``G = dL/dy``, ``r = x V^T`` and ``q_k = sum_m G_mk r_mk`` (``= dL/ds_k``):
    ``dL/dx = (G * s) V``, ``dL/dv_k = ((G * s)^T x)_k - q_k s_k / n_k^2 v_k`` (``ds_k / dv_k = -s_k v_k / n_k^2``),
    ``dL/dg_k = q_k / n_k``: one pass over ``V`` for the norms and one for the gradient term, where autograd
    through ``F.normalize`` made about ten passes over the weight (DINO's 65,536 x 256 prototypes). Under autocast
    the products run in the dtype autocast gave ``x V^T`` (bf16 on GPUs), as ``F.linear``'s would. It keeps
    ``x V^T`` for the backward (the size of the output) where the reference kept the normalised ``[K, D]`` weight.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, gain: torch.Tensor | None):  # type: ignore[override]
        norm = torch.linalg.vector_norm(weight, dim=1).clamp_min(1e-12)  # F.normalize's eps
        scale = norm.reciprocal() if gain is None else gain.view(-1) / norm
        raw = F.linear(x, weight)
        ctx.save_for_backward(x, weight, gain, norm, scale, raw)
        return (raw * scale).to(raw.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x, weight, gain, norm, scale, raw = ctx.saved_tensors
        dtype = raw.dtype
        grad_raw = (grad * scale).to(dtype)
        grad_x = (grad_raw @ weight.to(dtype)).to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_weight = grad_gain = None
        if ctx.needs_input_grad[1] or (gain is not None and ctx.needs_input_grad[2]):
            acc = torch.promote_types(dtype, torch.float32)  # bf16 products summed in float32
            q = (grad.to(acc) * raw.to(acc)).reshape(-1, raw.shape[-1]).sum(0)  # dL/ds_k
            if ctx.needs_input_grad[1]:
                rows = grad_raw.reshape(-1, raw.shape[-1]).t() @ x.reshape(-1, x.shape[-1]).to(dtype)
                grad_weight = rows.to(weight.dtype).addcmul_(weight, (-q * scale / norm.square()).unsqueeze(1))
            if gain is not None and ctx.needs_input_grad[2]:
                grad_gain = (q / norm).view_as(gain).to(gain.dtype)
        return grad_x, grad_weight, grad_gain


class NormalizedLinear(nn.Module):
    """Bias-free weight-normalised linear layer ``y = x @ (g * V / ||V||_row)^T``.

    ``learn_gain=False`` (DINO's ``norm_last_layer=True``): ``g`` fixed to 1, unit-norm rows. ``learn_gain=True``:
    a trainable per-row gain ``weight_g`` ``[out, 1]`` initialised to 1 (``torch.nn.utils.weight_norm`` with g=1).
    Computed as ``(x V^T) * g / ||V||`` (:class:`_RowScaledLinear`: the same function, a few fewer passes over
    the weight; values and gradients equal to ``F.normalize``'s to float rounding, tested).
    """

    def __init__(self, in_features: int, out_features: int, learn_gain: bool = False):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight_v = nn.Parameter(nn.Linear(in_features, out_features, bias=False).weight.detach().clone())
        self.weight_g = nn.Parameter(torch.ones(out_features, 1)) if learn_gain else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _RowScaledLinear.apply(x, self.weight_v, self.weight_g)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The textbook computation (normalise the weight, then multiply): what the tests compare against."""
        w = F.normalize(self.weight_v, dim=1)
        if self.weight_g is not None:
            w = w * self.weight_g
        return F.linear(x, w)


def projection_mlp(in_dim: int, hidden_dim: int, bottleneck_dim: int, n_layers: int = 3, use_bn: bool = False) -> nn.Module:
    """DINO's head MLP: ``n_layers`` linear layers (GELU, optional BatchNorm after each hidden one) to ``bottleneck_dim``,
    initialised with a truncated normal (std 0.02) and zero biases."""
    if n_layers < 1:
        raise ValueError(f"n_layers must be >= 1, got {n_layers}")
    if n_layers == 1:
        mlp: nn.Module = nn.Linear(in_dim, bottleneck_dim)
    else:
        def hidden(d_in: int) -> list[nn.Module]:
            return [nn.Linear(d_in, hidden_dim), *([nn.BatchNorm1d(hidden_dim)] if use_bn else []), nn.GELU()]

        layers: list[nn.Module] = hidden(in_dim)
        for _ in range(n_layers - 2):
            layers += hidden(hidden_dim)
        layers.append(nn.Linear(hidden_dim, bottleneck_dim))
        mlp = nn.Sequential(*layers)
    mlp.apply(trunc_normal_init)
    return mlp


def _project(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``[..., D] -> [..., b]``: MLP on all leading positions as one batch, then L2 normalisation."""
    lead = x.shape[:-1]
    x = mlp(x.reshape(-1, x.shape[-1]))
    return F.normalize(x, dim=-1, p=2, eps=1e-6).reshape(*lead, x.shape[-1])  # also for 0 rows


class DINOHead(nn.Module):
    """3-layer MLP -> bottleneck -> L2 normalisation -> weight-normalised prototypes.

    :param in_dim: input (backbone) dimension.
    :param out_dim: number of prototypes.
    :param hidden_dim: MLP hidden dimension (DINO: 2048).
    :param bottleneck_dim: dimension before the prototypes (DINO: 256).
    :param n_layers: MLP layers (DINO: 3).
    :param norm_last_layer: fix the prototypes' weight-norm gain to 1 (DINO's default); False trains it.
    :param use_bn: BatchNorm after each hidden linear layer (DINO's ``--use_bn_in_head``, its ResNet setting). It
        removes the sample-independent part of the features, which dominates when all inputs look alike at
        initialisation (small, uniform images such as digits): then the centred teacher is near-uniform while
        the uncentred student is sharper, and training drifts to the uniform collapse.
    """

    def __init__(
        self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256, n_layers: int = 3,
        norm_last_layer: bool = True, use_bn: bool = False,
    ):
        super().__init__()
        self.mlp = projection_mlp(in_dim, hidden_dim, bottleneck_dim, n_layers, use_bn)
        self.last_layer = NormalizedLinear(bottleneck_dim, out_dim, learn_gain=not norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., in_dim] -> [..., out_dim]`` (patch tokens ``[B, N, D]`` too: BatchNorm sees them as one batch)."""
        return self.last_layer(self.bottleneck(x))

    def bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., in_dim] -> [..., bottleneck_dim]``: the L2-normalised input of the prototypes ``last_layer``."""
        return _project(self.mlp, x)


class iBOTHead(nn.Module):
    """iBOT's head (bytedance/ibot ``models/head.py``): ONE MLP for the CLS and the patch tokens, then the CLS
    prototypes ``last_layer`` and the patch prototypes ``last_layer2`` (``shared_last_layer=True``, iBOT's
    ``--shared_head``: the same prototypes for both, so ``cls_out_dim == patch_out_dim``).

    ``forward(cls [B, D], patches [B, N, D]) -> (cls logits [B, K], patch logits [B, N, K'])``; the MLP sees the
    ``B (1 + N)`` tokens as one batch (its BatchNorm statistics too), as the reference's ``CustomSequential``.
    """

    def __init__(
        self, in_dim: int, cls_out_dim: int, patch_out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
        n_layers: int = 3, norm_last_layer: bool = True, use_bn: bool = False, shared_last_layer: bool = False,
    ):
        super().__init__()
        if shared_last_layer and cls_out_dim != patch_out_dim:
            raise ValueError(
                f"a shared last layer needs as many CLS as patch prototypes, got {cls_out_dim} and {patch_out_dim}"
            )
        self.mlp = projection_mlp(in_dim, hidden_dim, bottleneck_dim, n_layers, use_bn)
        self.last_layer = NormalizedLinear(bottleneck_dim, cls_out_dim, learn_gain=not norm_last_layer)
        self.last_layer2 = (
            self.last_layer if shared_last_layer
            else NormalizedLinear(bottleneck_dim, patch_out_dim, learn_gain=not norm_last_layer)
        )  # fmt: skip

    def forward(self, cls: torch.Tensor, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``patches`` ``[B, N, D]`` or selected rows ``[M, D]``; the MLP runs once on all CLS and patch rows."""
        cls_logits, z = self.cls_logits_and_patch_bottleneck(cls, patches)
        return cls_logits, self.last_layer2(z)

    def cls_logits_and_patch_bottleneck(self, cls: torch.Tensor, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CLS logits and the patches' L2-normalised bottleneck (the input of ``last_layer2``), shaped as ``patches``."""
        d = cls.shape[-1]
        z = _project(self.mlp, torch.cat([cls, patches.reshape(-1, d)], dim=0))
        b = cls.shape[0]
        return self.last_layer(z[:b]), z[b:].reshape(*patches.shape[:-1], z.shape[-1])  # also for 0 patch rows


def cancel_gradients_last_layer(head: nn.Module) -> None:
    """DINO/iBOT's first-epoch freeze of the prototypes: drop the gradients of every ``last_layer*`` parameter."""
    for name, p in head.named_parameters():
        if name.startswith("last_layer"):
            p.grad = None
