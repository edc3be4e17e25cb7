"""Online linear probe (``eval.online_probe``): a linear classifier on the step's detached embeddings, trained with
its own optimiser in the same step, as solo-learn's online classifier and stable-pretraining's ``OnlineProbe``.

The head is MAE's linear-probe head (He et al. 2022, Appendix A.2: ``BatchNorm1d(affine=False)`` then ``Linear``),
fitted by AdamW on cross-entropy with the labelled training batch. Its input is ``embedding.detach()``, so the
encoder's gradients are exactly those of the method's loss. Each rank trains its own head on its shard (no
collective per step); rank 0's head is scored on the evaluation features each epoch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class OnlineProbe:
    def __init__(self, dim: int, num_classes: int, device: torch.device | str, lr: float = 1e-3,
                 weight_decay: float = 0.0):
        self.head = nn.Sequential(nn.BatchNorm1d(dim, affine=False), nn.Linear(dim, num_classes)).to(device)
        nn.init.trunc_normal_(self.head[1].weight, std=0.01)
        nn.init.zeros_(self.head[1].bias)
        self.optimizer = torch.optim.AdamW(self.head.parameters(), lr=lr, weight_decay=weight_decay)
        self.correct = torch.zeros((), device=device)
        self.seen = torch.zeros((), device=device)

    def step(self, embedding: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One AdamW step on ``(embedding.detach(), labels)``; returns the batch's loss (on the device, no sync).
        Rows labelled ``-1`` (no label) are left out."""
        keep = labels >= 0
        x, y = embedding.detach().float()[keep], labels[keep]
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

    def state_dict(self) -> dict:
        return {"head": self.head.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
