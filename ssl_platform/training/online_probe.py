"""Online linear probe (``eval.online_probe``): a linear classifier trained with its own optimiser while the run
trains, as solo-learn's online classifier and stable-pretraining's ``OnlineProbe``, on the same features the kNN and
the end-of-run linear probe score.

Features: :func:`clean_features`, the evaluated encoder's embedding ``f(x)`` of the labelled training batch's
evaluation input ``x`` (Resize + CenterCrop, no augmentation), computed in eval mode without gradients, as the
validation features are. (The step's own embedding is not used: for MAE / data2vec it pools the visible patches of
the student, for DINO / iBOT it embeds an augmented crop, and a head fitted on it does not transfer to ``f``.)

The head is MAE's linear-probe head (He et al. 2022, Appendix A.2: ``BatchNorm1d(affine=False)`` then ``Linear``),
fitted by AdamW on the cross-entropy ``-log softmax(W BN(f(x)) + b)_y`` of each labelled training batch. Nothing of
it reaches the encoder's gradients. Rank 0's head is scored on the evaluation features each epoch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def clean_features(method: nn.Module, images: torch.Tensor, autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``f(images)``, the evaluated encoder's features as the kNN / linear probe take them: ``method(images=x)
    .embedding`` in eval mode without gradients (token maps ``[B, T, D]`` mean-pooled over T), ``[B, D]`` float32.
    The method's train / eval mode is restored afterwards."""
    was_training = method.training
    method.eval()
    try:
        with torch.autocast(images.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            emb = method(images=images).embedding
    finally:
        method.train(was_training)
    return (emb.mean(dim=1) if emb.ndim == 3 else emb).float()


class OnlineProbe:
    """``logits = W BN(x) + b`` (BN without affine parameters), one AdamW step per :meth:`step`."""

    def __init__(self, dim: int, num_classes: int, device: torch.device | str, lr: float = 1e-2,
                 weight_decay: float = 0.0, seed: int = 0):
        # its own seed, drawn apart from the global RNG: turning the probe on leaves the run's masks and crops alone
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.head = nn.Sequential(nn.BatchNorm1d(dim, affine=False), nn.Linear(dim, num_classes))
            nn.init.trunc_normal_(self.head[1].weight, std=0.01)
        nn.init.zeros_(self.head[1].bias)
        self.head.to(device)
        self.optimizer = torch.optim.AdamW(self.head.parameters(), lr=lr, weight_decay=weight_decay)
        self.correct = torch.zeros((), device=device)
        self.seen = torch.zeros((), device=device)

    def step(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One AdamW step on ``(features.detach(), labels)``; returns the batch's loss (on the device, no sync).
        Rows labelled ``-1`` (no label) are left out."""
        keep = labels >= 0
        x, y = features.detach().float()[keep], labels[keep]
        self.head.train()
        with torch.autocast(x.device.type, enabled=False):
            logits = self.head(x)
            loss = F.cross_entropy(logits, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.correct += (logits.detach().argmax(1) == y).sum()
        self.seen += y.numel()
        return loss.detach()

    def read_train_accuracy(self) -> float:
        """The accuracy over the batches since the last read (one host read), then restart the count."""
        acc = float(self.correct / self.seen.clamp_min(1.0))
        self.correct.zero_()
        self.seen.zero_()
        return acc

    @torch.no_grad()
    def accuracy(self, features: torch.Tensor, labels: torch.Tensor) -> float:
        """Top-1 accuracy of the head on ``features [N, D]`` (e.g. the kNN's validation features)."""
        self.head.eval()
        device = next(self.head.parameters()).device
        logits = self.head(features.to(device).float())
        return float((logits.argmax(1) == labels.to(device)).float().mean())

    def state_dict(self) -> dict[str, Any]:
        return {"head": self.head.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
