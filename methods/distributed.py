"""Collective helpers that work the same with one process or many (``torch.distributed``, gloo or NCCL)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def _many_workers() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def collective_device() -> torch.device:
    """Where the process group's collectives run: the current CUDA device under NCCL, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over the workers when ``torch.distributed`` is initialised with more than one; ``x`` otherwise.

    ``x`` itself is not changed; the reduction runs on a copy on :func:`collective_device` (a host value built
    on the CPU can take part in an NCCL reduction) and the result comes back on ``x``'s device.
    """
    if not _many_workers():
        return x
    y = x.detach().to(collective_device(), copy=True)
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y.to(x.device)


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over the workers (see :func:`all_reduce_sum`); ``x`` itself with one worker."""
    return all_reduce_sum(x) / dist.get_world_size() if _many_workers() else x
