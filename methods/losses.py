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

DINOv2 (Oquab et al. 2023, arXiv 2304.07193, Sec. 4) offers a second teacher normalisation, ``centering=
"sinkhorn_knopp"`` (SwAV's, Caron et al. 2020): the teacher rows of a step (all views, all workers) become the
assignment ``P = diag(u) exp(g_t / tau_t) diag(v)`` of 3 Sinkhorn-Knopp iterations, which alternately scale each
prototype's total weight to ``1 / K`` and each row to sum 1 (:func:`sinkhorn_knopp`); no centre is kept then. Its
KoLeo regulariser (Sablayrolles et al. 2019) spreads a batch of features: with ``x_i`` L2-normalised and ``j(i)`` the
nearest other row, ``L_koleo = -mean_i log(||x_i - x_j(i)||_2 + eps)`` (:class:`KoLeoLoss`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from methods.distributed import all_reduce_mean, all_reduce_sum

#: teacher normalisations (DINOv2's ``train.centering``): DINO's EMA centre, or Sinkhorn-Knopp (no centre)
CENTERINGS = ("centering", "sinkhorn_knopp")


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, temperature: float, n_iterations: int = 3) -> torch.Tensor:
    """DINOv2's ``sinkhorn_knopp_teacher`` on ``teacher_logits [M, K]`` (this worker's rows): ``Q = exp(g / tau)^T``
    scaled to sum 1, then ``n_iterations`` times each prototype row to ``1 / K`` and each sample column to ``1 / B``
    (``B``: the rows of every worker); returns ``(B Q)^T``, each row a distribution over the ``K`` prototypes."""
    q = torch.exp(teacher_logits.float() / temperature).t()
    n_rows = all_reduce_sum(torch.tensor(q.shape[1], dtype=torch.long, device=q.device))
    k = q.shape[0]
    q /= all_reduce_sum(torch.sum(q))
    for _ in range(n_iterations):
        q /= all_reduce_sum(torch.sum(q, dim=1, keepdim=True))
        q /= k
        q /= torch.sum(q, dim=0, keepdim=True)
        q /= n_rows
    q *= n_rows
    return q.t()


class _CentredLoss(nn.Module):
    """A teacher centre ``c`` (zeros of ``center_shape``) and its EMA update, shared by DINO and iBOT losses."""

    center: torch.Tensor

    #: Sinkhorn-Knopp iterations (DINOv2's ``n_iterations=3``)
    sinkhorn_iterations: int = 3

    def __init__(self, center_shape: tuple[int, ...], center_momentum: float, centering: str = "centering"):
        super().__init__()
        if not 0.0 <= center_momentum <= 1.0:
            raise ValueError(f"center_momentum must be in [0, 1], got {center_momentum}")
        if centering not in CENTERINGS:
            raise ValueError(f"centering must be one of {CENTERINGS}, got {centering!r}")
        self.center_momentum = float(center_momentum)
        self.centering = centering
        self.register_buffer("center", torch.zeros(*center_shape))

    def sinkhorn_probabilities(self, teacher_rows: Sequence[torch.Tensor], temperature: float) -> list[torch.Tensor]:
        """:func:`sinkhorn_knopp` over the rows ``[M_i, K]`` of every group together, split back per group."""
        rows = torch.cat([t.detach().float() for t in teacher_rows], dim=0)
        q = sinkhorn_knopp(rows, temperature, self.sinkhorn_iterations)
        return list(q.split([t.shape[0] for t in teacher_rows]))

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
    :param centering: ``"centering"`` (DINO's centre) or ``"sinkhorn_knopp"`` (DINOv2's option: Sinkhorn-Knopp over
        the teacher rows of all views together; the centre stays unused).
    """

    def __init__(self, out_dim: int, center_momentum: float = 0.9, centering: str = "centering"):
        super().__init__((1, out_dim), center_momentum, centering)

    def teacher_probabilities(self, teacher_outputs: Sequence[torch.Tensor], temperature: float) -> list[torch.Tensor]:
        """The targets ``P_t`` per teacher view: ``softmax((g_t - c) / tau_t)``, or Sinkhorn-Knopp over all views."""
        if self.centering == "sinkhorn_knopp":
            return self.sinkhorn_probabilities(teacher_outputs, temperature)
        return [F.softmax((t.detach().float() - self.center) / temperature, dim=-1) for t in teacher_outputs]

    def forward(
        self,
        student_outputs: Sequence[torch.Tensor],
        teacher_outputs: Sequence[torch.Tensor],
        temperature_student: float,
        temperature_teacher: float,
        update_center: bool = True,
        teacher_probs: Sequence[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``student_outputs``: ``n_s`` logits ``[B, K]`` (globals first); ``teacher_outputs``: ``n_t`` ``[B, K]``;
        ``teacher_probs``: their :meth:`teacher_probabilities`, when the caller already has them."""
        n_s, n_t = len(student_outputs), len(teacher_outputs)
        if n_t == 0 or n_s == 0:
            raise ValueError("DINOLoss needs at least one student and one teacher view")
        n_same = min(n_s, n_t)  # student view i < n_t is teacher view i's crop
        n_terms = n_s * n_t - n_same
        if n_terms == 0:
            raise ValueError(
                f"DINOLoss has no (student, teacher) pair of different views (n_s={n_s}, n_t={n_t})"
            )
        if teacher_probs is None:
            teacher_probs = self.teacher_probabilities(teacher_outputs, temperature_teacher)
        student_logp = [F.log_softmax(s.float() / temperature_student, dim=-1) for s in student_outputs]
        # sum over pairs s != t of <P_t, log P_s> = <sum_t P_t, sum_s log P_s> - sum_i <P_i, log P_i>: one product of
        # the sums plus one per same-view pair instead of one per pair (2 global + 6 local crops: 3 products, not 14)
        all_pairs = torch.sum(torch.stack(teacher_probs).sum(0) * torch.stack(student_logp).sum(0), dim=-1).mean()
        same_view = sum(torch.sum(teacher_probs[i] * student_logp[i], dim=-1).mean() for i in range(n_same))
        if update_center and self.centering == "centering":
            self.update_center(teacher_outputs)
        return (same_view - all_pairs) / n_terms



class iBOTPatchLoss(_CentredLoss):
    """iBOT masked-image-modelling loss on patch tokens, with its own centre.

    :param out_dim: number of patch prototypes ``K``.
    :param center_momentum: EMA momentum of the patch centre (iBOT: 0.9).
    :param centering: ``"centering"`` (iBOT's centre) or ``"sinkhorn_knopp"`` (DINOv2's option: Sinkhorn-Knopp over
        the teacher's masked patches of all views together, DINOv2's ``n_masked_patches`` rows).
    """

    def __init__(self, out_dim: int, center_momentum: float = 0.9, centering: str = "centering"):
        super().__init__((1, 1, out_dim), center_momentum, centering)

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
        sinkhorn = self.centering == "sinkhorn_knopp"
        if sinkhorn:  # the targets of the masked patches of every view, normalised together
            rows = [t.detach() if teacher_masked_only else t.detach()[m.reshape(m.shape[0], -1).bool()]
                    for t, m in zip(teacher_patches, masks)]
            targets = self.sinkhorn_probabilities(rows, temperature_teacher)
        for v, (s, t, m) in enumerate(zip(student_patches, teacher_patches, masks)):
            m = m.reshape(m.shape[0], -1).bool()
            counts = m.sum(dim=-1).clamp(min=1).float()  # [B]
            if sinkhorn or student_masked_only or teacher_masked_only:
                if sinkhorn:
                    q = targets[v]
                else:
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
        if update_center and not sinkhorn:
            self.update_center(teacher_patches) if teacher_mean is None else self.update_center_from_mean(teacher_mean)
        return total / len(masks)


class KoLeoLoss(nn.Module):
    """KoLeo (Kozachenko-Leonenko) entropy estimator as a regulariser (Sablayrolles et al., "Spreading vectors for
    similarity search", ICLR 2019; DINOv2, Oquab et al. 2023, Sec. 4), on a batch ``x [n, D]`` (n >= 2):

        x_i <- x_i / max(||x_i||, eps),   j(i) = argmax_{j != i} <x_i, x_j>,
        L   = -1 / n * sum_i log(||x_i - x_j(i) + eps||_2 + eps)

    (the ``+ eps`` inside the norm is ``nn.PairwiseDistance``'s), computed in float32 as DINOv2's ``KoLeoLoss``.
    """

    def __init__(self, eps: float = 1e-8):
        super().__init__()
        self.eps = float(eps)
        self.pdist = nn.PairwiseDistance(2, eps=self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[0] < 2:
            raise ValueError(f"KoLeoLoss needs a batch [n >= 2, D], got shape {tuple(x.shape)}")
        with torch.autocast(x.device.type, enabled=False):
            x = F.normalize(x.float(), eps=self.eps, p=2, dim=-1)
            with torch.no_grad():  # the nearest neighbour's index (the reference's argmax has no gradient either)
                dots = x @ x.t()
                dots.fill_diagonal_(-1.0)
                nearest = torch.max(dots, dim=1).indices
            return -torch.log(self.pdist(x, x[nearest]) + self.eps).mean()
