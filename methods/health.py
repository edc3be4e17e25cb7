"""Label-free health metrics of a self-supervised run: each defined once here, with its formula and citation.

A method declares which apply (``SSLMethod.health_metrics``) and hands the tensors its step already has to
:func:`health_metrics` through its output's ``health`` field (:class:`HealthInputs`); nothing here runs an extra
forward pass. Every function returns 0-dim tensors on the input's device (no host synchronisation).

* ``rank_fraction``: RankMe (Garrido et al., "RankMe: Assessing the downstream performance of pretrained
  self-supervised representations by their rank", ICML 2023): with singular values ``s_k`` of the batch embeddings
  ``Z [N, D]``, ``p_k = s_k / ||s||_1 + eps`` and ``RankMe(Z) = exp(-sum_k p_k log p_k)``, in ``[1, min(N, D)]``.
  Logged as a fraction of ``min(N, D)`` (the most a batch of N can show): 1 / min(N, D) when every embedding is
  the same up to scale (complete collapse), near 1 when the batch spans every direction.
* ``normalized_std``: the mean over dimensions of the per-dimension standard deviation of the L2-normalised
  embeddings, times ``sqrt(D)`` (SimSiam, Chen & He, CVPR 2021, Sec. 4.1: ``std(z / ||z||)`` is about
  ``1 / sqrt(D)`` for a healthy output and 0 for a collapsed one): about 1 healthy, 0 collapsed.
* ``teacher_entropy`` and ``student_teacher_kl`` (DINO, Caron et al., ICCV 2021, Sec. 5.3 and Fig. 7): with the
  centred, sharpened teacher distribution ``P_t = softmax((t - c) / tau_t)`` and the student's
  ``P_s = softmax(s / tau_s)``, ``H(P_t) = -sum P_t log P_t`` (logged over ``ln K``: near 1 for the uniform
  collapse, near 0 for the one-prototype collapse) and ``KL(P_t || P_s) = sum P_t (log P_t - log P_s)`` (near 0 in
  either collapse: the student has nothing left to learn).
* ``target_scale`` and ``prediction_scale`` (masked prediction: MAE, data2vec, SALT): the root mean square of the
  regression targets and of the predictions over the predicted tokens. A target that shrinks to a constant
  (a collapsing EMA teacher) or predictions that go to 0 show there first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

HEALTH_METRICS = ("rank_fraction", "normalized_std", "teacher_entropy", "student_teacher_kl", "target_scale",
                  "prediction_scale")


@dataclass
class HealthInputs:
    """What a training step already computed, detached: any field may be ``None`` when a method lacks it.

    ``embeddings [N, D]``: per-image embeddings of one view (student side); ``teacher_logits`` / ``student_logits``
    ``[N, K]`` with ``teacher_center [1, K]`` and the temperatures in force; ``targets`` / ``predictions``
    ``[B, N, C]``: the regression targets and predictions of the tokens, with ``token_mask [B, N]`` (True or 1 on the
    predicted tokens; ``None``: every token counts)."""

    embeddings: torch.Tensor | None = None
    teacher_logits: torch.Tensor | None = None
    student_logits: torch.Tensor | None = None
    teacher_center: torch.Tensor | None = None
    teacher_temperature: float = 1.0
    student_temperature: float = 1.0
    targets: torch.Tensor | None = None
    predictions: torch.Tensor | None = None
    token_mask: torch.Tensor | None = None


def rank_fraction(z: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """RankMe of ``z [N, D]`` over ``min(N, D)`` (see the module docstring)."""
    z = z.detach().float()
    s = torch.linalg.svdvals(z)
    p = s / s.sum().clamp_min(torch.finfo(s.dtype).tiny) + eps
    return torch.exp(-(p * p.log()).sum()) / min(z.shape)


def normalized_std(z: torch.Tensor) -> torch.Tensor:
    """``sqrt(D) * mean_d std_n(z_n / ||z_n||)_d`` for ``z [N, D]``: about 1 healthy, 0 collapsed."""
    z = F.normalize(z.detach().float(), dim=1)
    return z.std(dim=0).mean() * math.sqrt(z.shape[1])


def teacher_distribution(logits: torch.Tensor, center: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """``log softmax((t - c) / tau_t)``, the teacher's target as DINO's loss uses it."""
    t = logits.detach().float()
    if center is not None:
        t = t - center.detach().float()
    return F.log_softmax(t / temperature, dim=-1)


def teacher_entropy(log_p_t: torch.Tensor) -> torch.Tensor:
    """``mean_n H(P_t) / ln K``: near 1 for the uniform collapse, near 0 for the one-prototype collapse."""
    return -(log_p_t.exp() * log_p_t).sum(-1).mean() / math.log(log_p_t.shape[-1])


def student_teacher_kl(log_p_t: torch.Tensor, student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``mean_n KL(P_t || P_s)`` in nats, with ``P_s = softmax(s / tau_s)``."""
    log_p_s = F.log_softmax(student_logits.detach().float() / temperature, dim=-1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).mean()


def rms(x: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``sqrt(mean(x^2))`` over every element of the tokens ``token_mask`` selects (``x [B, N, C]``, mask ``[B, N]``;
    no mask: every element)."""
    sq = x.detach().float().pow(2)
    if token_mask is None:
        return sq.mean().sqrt()
    m = token_mask.detach().float().reshape(*sq.shape[:-1], 1)
    return ((sq * m).sum() / (m.sum() * sq.shape[-1]).clamp_min(1.0)).sqrt()


def health_metrics(inputs: HealthInputs, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The metrics ``names`` (a method's declared ``health_metrics``) that ``inputs`` can give, as 0-dim tensors."""
    unknown = set(names) - set(HEALTH_METRICS)
    if unknown:
        raise ValueError(f"unknown health metrics {sorted(unknown)}; expected some of {list(HEALTH_METRICS)}")
    out: dict[str, torch.Tensor] = {}
    z = inputs.embeddings
    if z is not None and z.ndim == 2 and z.shape[0] > 1:
        if "rank_fraction" in names:
            out["rank_fraction"] = rank_fraction(z)
        if "normalized_std" in names:
            out["normalized_std"] = normalized_std(z)
    if inputs.teacher_logits is not None and {"teacher_entropy", "student_teacher_kl"} & set(names):
        log_p_t = teacher_distribution(inputs.teacher_logits, inputs.teacher_center, inputs.teacher_temperature)
        if "teacher_entropy" in names:
            out["teacher_entropy"] = teacher_entropy(log_p_t)
        if "student_teacher_kl" in names and inputs.student_logits is not None:
            out["student_teacher_kl"] = student_teacher_kl(log_p_t, inputs.student_logits, inputs.student_temperature)
    if inputs.targets is not None and "target_scale" in names:
        out["target_scale"] = rms(inputs.targets, inputs.token_mask)
    if inputs.predictions is not None and "prediction_scale" in names:
        out["prediction_scale"] = rms(inputs.predictions, inputs.token_mask)
    return out
