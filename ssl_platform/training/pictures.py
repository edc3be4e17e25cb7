"""PNG pictures of a run for MLflow's ``images/``: a method's panels (:mod:`methods.visualize`) and a 2-D embedding
plot. Rank 0 writes them every ``eval.every_epochs`` from a fixed batch of evaluation images; nothing here talks to
MLflow or Ray.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from methods.visualize import Panel


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def to_display(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``[B, C, H, W]`` in the method's normalised input space -> ``[B, H, W, C]`` in [0, 1] (``x * std + mean``)."""
    c = images.shape[1]
    m = torch.tensor(list(mean)[:c], dtype=torch.float32).view(1, c, 1, 1)
    s = torch.tensor(list(std)[:c], dtype=torch.float32).view(1, c, 1, 1)
    x = (images.detach().float().cpu() * s + m).clamp(0.0, 1.0)
    return x.permute(0, 2, 3, 1)


def _columns(panels: list[Panel]) -> list[tuple[str, Panel, int]]:
    cols = []
    for p in panels:
        if p.kind == "heatmap":
            cols.extend((f"{p.name} {k}", p, k) for k in range(p.images.shape[1]))
        else:
            cols.append((p.name, p, -1))
    return cols


def write_panels(panels: list[Panel], mean: Sequence[float], std: Sequence[float], path: Path, title: str) -> Path:
    """One row per image, one column per image panel and per channel of a heat-map panel (e.g. attention head)."""
    plt = _pyplot()
    cols = _columns(panels)
    rows = int(panels[0].images.shape[0])
    fig, axes = plt.subplots(rows, len(cols), figsize=(1.3 * len(cols) + 0.4, 1.3 * rows + 0.5), squeeze=False)
    shown = {id(p): to_display(p.images, mean, std) for p in panels if p.kind != "heatmap"}
    for j, (label, panel, channel) in enumerate(cols):
        for i in range(rows):
            ax = axes[i][j]
            if channel < 0:
                img = shown[id(panel)][i]
                ax.imshow(img.squeeze(-1) if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None)
            else:
                ax.imshow(panel.images[i, channel].detach().float().cpu(), cmap="inferno", interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[0][j].set_title(label, fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def principal_components(features: torch.Tensor, k: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """The projection of centred ``features [N, D]`` on their first ``k`` principal axes, and each axis' share of
    the variance (from the SVD of the centred matrix: ``X - mean = U S V^T``, scores ``U S``, share ``s^2 / sum s^2``)."""
    x = features.detach().float().cpu()
    x = x - x.mean(dim=0, keepdim=True)
    u, s, _ = torch.linalg.svd(x, full_matrices=False)
    share = s.pow(2) / s.pow(2).sum().clamp_min(1e-12)
    return u[:, :k] * s[:k], share[:k]


def write_embedding_plot(features: torch.Tensor, labels: torch.Tensor, path: Path, title: str) -> Path:
    """A PCA scatter of evaluation features, coloured by label."""
    plt = _pyplot()
    xy, share = principal_components(features)
    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    y = labels.detach().cpu().numpy()
    points = ax.scatter(xy[:, 0].numpy(), xy[:, 1].numpy(), c=y, cmap="tab10" if y.max() < 10 else "tab20", s=6)
    if y.max() < 20:
        ax.legend(*points.legend_elements(), fontsize=6, title="label", title_fontsize=7, loc="best", markerscale=0.8)
    ax.set_xlabel(f"PC 1 ({share[0]:.0%} of variance)")
    ax.set_ylabel(f"PC 2 ({share[1]:.0%} of variance)" if len(share) > 1 else "PC 2")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
