"""Self-distillation losses with teacher centring (DINO, Caron et al. 2021, arXiv 2104.14294; iBOT, Zhou et
al. 2022, arXiv 2111.07832).

DINO: for student views ``s`` (global + local) and teacher views ``t`` (global only), with temperatures
``tau_s`` and ``tau_t`` and the centre ``c``:

    P_t = softmax((g_t - c) / tau_t),   log P_s = log_softmax(g_s / tau_s)
    L   = 1 / |pairs| * sum_{(s, t), s != t} mean_b( - sum_k P_t[b, k] * log P_s[b, k] )

where student view ``i`` is not paired with teacher view ``i`` (the same global crop). After the loss the
centre follows an EMA of the teacher outputs' batch mean, all-reduced over workers when
``torch.distributed`` is initialised:

    c <- m * c + (1 - m) * mean_{workers, teacher views, batch} g_t

iBOT patch loss: per-patch cross-entropy between the teacher (unmasked view) and student (masked view)
patch distributions of the same view, averaged over the masked patches of each image, then over images and
views; its own centre is the EMA of the teacher patch outputs' mean over patches and images.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from methods.distributed import all_reduce_mean


class _CentredLoss(nn.Module):
    """A teacher centre ``c`` (zeros of ``center_shape``) and its EMA update, shared by DINO and iBOT losses."""

    center: torch.Tensor

    def __init__(self, center_shape: tuple[int, ...], center_momentum: float):
        super().__init__()
        if not 0.0 <= center_momentum <= 1.0:
            raise ValueError(f"center_momentum must be in [0, 1], got {center_momentum}")
        self.center_momentum = float(center_momentum)
        self.register_buffer("center", torch.zeros(*center_shape))

    @torch.no_grad()
    def update_center(self, teacher_outputs: Sequence[torch.Tensor]) -> None:
        """``c <- m c + (1 - m) * mean(teacher outputs)``: the mean over views, every non-class dim and workers."""
        stacked = torch.cat([t.detach().float() for t in teacher_outputs], dim=0)
        self.update_center_from_mean(stacked.mean(dim=tuple(range(stacked.ndim - 1))))

    @torch.no_grad()
    def update_center_from_mean(self, teacher_mean: torch.Tensor) -> None:
        """The same update from this worker's mean teacher output ``[K]`` (averaged over the workers here)."""
        batch_center = all_reduce_mean(teacher_mean.detach().float().reshape(self.center.shape))
        self.center.mul_(self.center_momentum).add_(batch_center * (1.0 - self.center_momentum))


class DINOLoss(_CentredLoss):
    """DINO cross-view cross-entropy with a centred, sharpened teacher (see module docstring).

    :param out_dim: number of prototypes ``K``.
    :param center_momentum: EMA momentum of the centre (DINO: 0.9).
    """

    def __init__(self, out_dim: int, center_momentum: float = 0.9):
        super().__init__((1, out_dim), center_momentum)

    def forward(
        self,
        student_outputs: Sequence[torch.Tensor],
        teacher_outputs: Sequence[torch.Tensor],
        temperature_student: float,
        temperature_teacher: float,
        update_center: bool = True,
    ) -> torch.Tensor:
        """``student_outputs``: ``n_s`` logits ``[B, K]`` (globals first); ``teacher_outputs``: ``n_t`` ``[B, K]``."""
        n_s, n_t = len(student_outputs), len(teacher_outputs)
        if n_t == 0 or n_s == 0:
            raise ValueError("DINOLoss needs at least one student and one teacher view")
        n_same = min(n_s, n_t)  # student view i < n_t is teacher view i's crop
        n_terms = n_s * n_t - n_same
        if n_terms == 0:
            raise ValueError(
                f"DINOLoss has no (student, teacher) pair of different views (n_s={n_s}, n_t={n_t})"
            )
        teacher_probs = [
            F.softmax((t.detach().float() - self.center) / temperature_teacher, dim=-1)
            for t in teacher_outputs
        ]
        student_logp = [F.log_softmax(s.float() / temperature_student, dim=-1) for s in student_outputs]
        # sum over pairs s != t of <P_t, log P_s> = <sum_t P_t, sum_s log P_s> - sum_i <P_i, log P_i>: one product of
        # the sums plus one per same-view pair instead of one per pair (2 global + 6 local crops: 3 products, not 14)
        all_pairs = torch.sum(torch.stack(teacher_probs).sum(0) * torch.stack(student_logp).sum(0), dim=-1).mean()
        same_view = sum(torch.sum(teacher_probs[i] * student_logp[i], dim=-1).mean() for i in range(n_same))
        if update_center:
            self.update_center(teacher_outputs)
        return (same_view - all_pairs) / n_terms



class iBOTPatchLoss(_CentredLoss):
    """iBOT masked-image-modelling loss on patch tokens, with its own centre.

    :param out_dim: number of patch prototypes ``K``.
    :param center_momentum: EMA momentum of the patch centre (iBOT: 0.9).
    """

    def __init__(self, out_dim: int, center_momentum: float = 0.9):
        super().__init__((1, 1, out_dim), center_momentum)

    def forward(
        self,
        student_patches: Sequence[torch.Tensor],
        teacher_patches: Sequence[torch.Tensor],
        masks: Sequence[torch.Tensor],
        temperature_student: float,
        temperature_teacher: float,
        update_center: bool = True,
        student_masked_only: bool = False,
        teacher_mean: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per view ``v``: student ``[B, N, K]`` (masked input), teacher ``[B, N, K]``, mask ``[B, N]`` (1 = masked).

        ``L = mean_v mean_b [ sum_n m_bn * CE(P_t[b, n], P_s[b, n]) / max(sum_n m_bn, 1) ]``.

        ``student_masked_only``: each student view is ``[M_v, K]``, its logits at the masked patches only (rows in
        ``mask.nonzero()`` order); the same loss, computed on those rows alone. ``teacher_mean`` ``[K]``: the
        teacher's mean logits over every patch of every view (the centre's update); each teacher view is then
        ``[M_v, K]``, its masked rows only, as the student's may be.
        """
        if not (len(student_patches) == len(teacher_patches) == len(masks)) or len(masks) == 0:
            raise ValueError(
                "iBOTPatchLoss needs as many student views, teacher views and masks (at least one)"
            )
        total = student_patches[0].new_zeros((), dtype=torch.float32)
        teacher_masked_only = teacher_mean is not None
        for s, t, m in zip(student_patches, teacher_patches, masks):
            m = m.reshape(m.shape[0], -1).bool()
            counts = m.sum(dim=-1).clamp(min=1).float()  # [B]
            if student_masked_only or teacher_masked_only:
                t_rows = t.detach() if teacher_masked_only else t.detach()[m]
                q = F.softmax((t_rows.float() - self.center.reshape(1, -1)) / temperature_teacher, dim=-1)
                logp = F.log_softmax((s if student_masked_only else s[m]).float() / temperature_student, dim=-1)
                ce = torch.sum(-q * logp, dim=-1)  # [M]
                image_of_row = m.nonzero()[:, 0]
                per_image = torch.zeros_like(counts).index_add_(0, image_of_row, ce) / counts
            else:
                q = F.softmax((t.detach().float() - self.center) / temperature_teacher, dim=-1)
                logp = F.log_softmax(s.float() / temperature_student, dim=-1)
                per_patch = torch.sum(-q * logp, dim=-1)  # [B, N]
                per_image = (per_patch * m.float()).sum(dim=-1) / counts
            total = total + per_image.mean()
        if update_center:
            self.update_center(teacher_patches) if teacher_mean is None else self.update_center_from_mean(teacher_mean)
        return total / len(masks)
