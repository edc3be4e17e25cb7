"""Frozen-encoder evaluation: kNN top-1 (DINO's weighted vote) and a linear probe.

kNN (Wu et al. 2018; Caron et al. 2021): embeddings L2-normalised, cosine similarity s_ij to the train set,
the k nearest neighbours vote for their label with weight exp(s_ij / T); prediction = argmax of the votes.

Distributed: every worker embeds its own shard of the train bank and of the validation split in streamed
batches (:func:`embed_batches`); :func:`gather_to_rank0` collects the features (``[N, D]`` floats, never images)
on rank 0, which scores them. The similarity matrix is computed in chunks of test rows, so a 100k-image bank
and a 50k-image validation split fit in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

from methods.base import SSLMethod


@torch.no_grad()
def embed_images(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 256, device: torch.device | str = "cpu") -> torch.Tensor:
    """Eval-mode embeddings ``[N, D]`` of a method (``model(images=x).embedding``) or a plain encoder."""
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, len(images), batch_size):
            x = images[start : start + batch_size].to(device, non_blocking=True)
            result = model(images=x) if isinstance(model, SSLMethod) else model(x)
            emb = result.embedding if hasattr(result, "embedding") else result
            if emb.ndim == 3:
                emb = emb.mean(dim=1)
            out.append(emb.float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


@torch.no_grad()
def embed_batches(
    model: torch.nn.Module, batches: Iterable, to_input: Callable, device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode embeddings and labels of streamed batches: ``to_input(batch)`` makes the normalised images."""
    was_training = model.training
    model.eval()
    embs, labels = [], []
    try:
        for batch in batches:
            x = to_input(batch)
            result = model(images=x) if isinstance(model, SSLMethod) else model(x)
            emb = result.embedding if hasattr(result, "embedding") else result
            embs.append((emb.mean(dim=1) if emb.ndim == 3 else emb).float().cpu())
            labels.append(batch.labels.cpu())
    finally:
        model.train(was_training)
    if not embs:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
    return torch.cat(embs), torch.cat(labels)


def gather_to_rank0(emb: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Every rank's features concatenated on rank 0 (None elsewhere); a plain pass-through without a process group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return emb, labels
    parts: list | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object((emb, labels), parts, dst=0)
    if parts is None:
        return None
    parts = [p for p in parts if len(p[1])]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


@torch.no_grad()
def knn_top1(
    train_emb: torch.Tensor, train_labels: torch.Tensor, test_emb: torch.Tensor, test_labels: torch.Tensor,
    k: int = 20, temperature: float = 0.07, num_classes: int | None = None, chunk: int = 1024,
) -> float:
    """Top-1 accuracy of the temperature-weighted kNN vote on cosine similarity."""
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    k = min(k, len(train_emb))
    tr = F.normalize(train_emb.float(), dim=1)
    te = F.normalize(test_emb.float(), dim=1)
    correct = 0
    for start in range(0, len(te), chunk):
        sim = te[start:start + chunk] @ tr.T  # [chunk, Ntr]
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(len(sim), num_classes, device=sim.device)
        votes.scatter_add_(1, train_labels[top_idx], weights)
        correct += int((votes.argmax(dim=1) == test_labels[start:start + chunk]).sum())
    return correct / len(te)


def linear_probe_top1(
    train_emb: torch.Tensor, train_labels: torch.Tensor, test_emb: torch.Tensor, test_labels: torch.Tensor,
    epochs: int = 50, lr: float = 1e-2, seed: int = 0,
) -> float:
    """Linear classifier on standardised frozen features (full-batch AdamW, cross-entropy)."""
    g = torch.Generator().manual_seed(seed)
    mean, std = train_emb.mean(0, keepdim=True), train_emb.std(0, keepdim=True) + 1e-6
    xtr, xte = (train_emb - mean) / std, (test_emb - mean) / std
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    head = torch.nn.Linear(xtr.shape[1], num_classes).to(xtr.device)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=g).to(xtr.device) * 0.01)
        head.bias.zero_()
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    for _ in range(epochs):
        opt.zero_grad()
        F.cross_entropy(head(xtr), train_labels).backward()
        opt.step()
    with torch.no_grad():
        return float((head(xte).argmax(1) == test_labels).float().mean())
