"""Downstream evaluation of an APL encoder, after the seed's ``Tuner`` (le0x99/self-supervised-vision-transformers).

A classifier ``y = W dropout(mean_j h_j) + b`` on the mean of the encoder's tokens ``h = f(x)`` (``[B, T, D]``;
an encoder returning ``[B, D]`` is used as is) is trained with cross-entropy on ``samples_per_class`` (NPC)
labelled images per class, either fine-tuning the encoder or with it frozen. Adam with weight decay; the
learning rate per step ``s`` of ``S`` is ``lr * f(s)`` with a 5 % linear warm-up, then a cosine to ``0.1 lr``:

    f(s) = (s + 1) / W                                  for s < W = max(1, ceil(0.05 S)),
    f(s) = 0.1 + 0.9 * (1 + cos(pi * (s - W) / (S - W))) / 2   otherwise.

With ``patch_dropout > 0`` (the seed Tuner's PDO, 0.1) the encoder zeroes that share of its tokens while the tuner
trains and none while it is tested, as the reference Tuner (``PatchDropout(PDO)`` in ``ft_mode``, ``PatchDropout(0)``
around ``test_model``); the encoder must take ``forward(images, patch_dropout=...)`` (:class:`methods.apl.APLEncoder`).

Returns the top-1 accuracy on the test images. Pure torch; the platform wires it to its datasets.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn


def tuner_lr_factor(step: int, total_steps: int, warmup_fraction: float = 0.05, final_fraction: float = 0.1) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based) of ``total_steps`` (see module docstring)."""
    warmup = max(1, math.ceil(warmup_fraction * total_steps))
    if step < warmup:
        return (step + 1) / warmup
    span = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    return final_fraction + (1.0 - final_fraction) * (1.0 + math.cos(math.pi * progress)) / 2.0


def select_per_class(labels: torch.Tensor, samples_per_class: int, seed: int) -> torch.Tensor:
    """Indices of (at most) ``samples_per_class`` random examples of every class, reproducible with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    labels = labels.cpu()
    chosen = []
    for c in labels.unique(sorted=True).tolist():
        idx = (labels == c).nonzero().flatten()
        chosen.append(idx[torch.randperm(idx.numel(), generator=g)[:samples_per_class]])
    return torch.cat(chosen).sort().values


class TunerModel(nn.Module):
    """Encoder -> mean over tokens -> dropout -> linear classifier."""

    def __init__(self, encoder: nn.Module, embed_dim: int, num_classes: int, dropout: float, patch_dropout: float = 0.0):
        super().__init__()
        self.encoder = encoder
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(embed_dim, num_classes)
        self.patch_dropout = patch_dropout

    def features(self, images: torch.Tensor) -> torch.Tensor:
        if self.training and self.patch_dropout > 0:
            h = self.encoder(images, patch_dropout=self.patch_dropout)
        else:
            h = self.encoder(images)
        return h.mean(dim=1) if h.ndim == 3 else h

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.features(images)))


def fit_tuner(
    encoder_module: nn.Module,
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    samples_per_class: int = 500,
    epochs: int = 30,
    lr: float = 5e-4,
    weight_decay: float = 1e-4,
    dropout: float = 0.1,
    freeze_encoder: bool = False,
    seed: int = 42,
    batch_size: int = 1024,
    patch_dropout: float = 0.0,
) -> float:
    """Train the tuner on NPC images per class and return the test accuracy (the seed's defaults).

    ``encoder_module`` is deep-copied, so the caller's encoder is never modified.
    """
    torch.manual_seed(seed)
    device = train_images.device
    encoder = copy.deepcopy(encoder_module).to(device)
    embed_dim = _probe_embed_dim(encoder, train_images[:1])
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    model = TunerModel(encoder, embed_dim, num_classes, dropout, patch_dropout).to(device)
    if freeze_encoder:
        encoder.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)

    idx = select_per_class(train_labels, samples_per_class, seed).to(device)
    _train_tuner(model, optimizer, train_images[idx], train_labels[idx].long(), epochs, batch_size, freeze_encoder, seed)
    return _test_accuracy(model, test_images, test_labels, batch_size)


def _probe_embed_dim(encoder: nn.Module, probe_images: torch.Tensor) -> int:
    """The encoder's output width, from one eval-mode pass (its train/eval mode is restored)."""
    with torch.no_grad():
        was = encoder.training
        encoder.eval()
        probe = encoder(probe_images)
        encoder.train(was)
    return probe.shape[-1]


def _train_tuner(
    model: TunerModel,
    optimizer: torch.optim.Optimizer,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    epochs: int,
    batch_size: int,
    freeze_encoder: bool,
    seed: int,
) -> None:
    """``epochs`` shuffled passes (order drawn from a generator seeded with ``seed``), warm-up + cosine schedule.

    A frozen encoder stays in eval mode (no dropout / patch dropout inside it).
    """
    device = x_train.device
    n = len(x_train)
    total = max(1, epochs * math.ceil(n / batch_size))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: tuner_lr_factor(s, total))
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        if freeze_encoder:
            model.encoder.eval()
        order = torch.randperm(n, generator=g).to(device)
        for start in range(0, n, batch_size):
            batch = order[start : start + batch_size]
            loss = F.cross_entropy(model(x_train[batch]), y_train[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()


def _test_accuracy(model: nn.Module, test_images: torch.Tensor, test_labels: torch.Tensor, batch_size: int) -> float:
    """Top-1 accuracy of ``model`` (in eval mode) on the test images, in batches of ``batch_size``."""
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(test_images), batch_size):
            pred = model(test_images[start : start + batch_size]).argmax(dim=-1)
            correct += int((pred == test_labels[start : start + batch_size].to(pred.device)).sum())
    return correct / max(1, len(test_images))
