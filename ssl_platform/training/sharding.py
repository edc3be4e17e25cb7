"""How a method's weights are spread over the workers (``scaling.strategy``), activation checkpointing, gradient
accumulation without all-reduce, and checkpoint state in one form for every strategy and world size.

* ``ddp`` (default): every worker holds the whole method, its EMA teacher and AdamW state; Ray's ``prepare_model``
  wraps it in DDP (gradients all-reduced in backward).
* ``fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``): every transformer block (a module whose class name ends
  in ``Block``: timm's ``Block`` in encoders, MAE's decoder, SALT's predictor, APL's blocks), every head (class name
  ending in ``Head``) and then the whole method are sharded: the student's and the EMA teacher's parameters and
  AdamW's moments are split over the workers (each holds ``1/world`` of every tensor; a block is gathered only while
  it runs). The EMA update (:meth:`methods.teacher_student.TeacherStudent.update_teacher`) works on the local shards.
  Gradient norms and clipping (``global`` and ``per_param``) are computed here over the shards with one all-reduce.
* ``scaling.activation_checkpointing``: every block that has trainable parameters (student encoder, MAE decoder,
  SALT predictor; not the frozen / EMA teacher) recomputes its activations in backward
  (``torch.utils.checkpoint``, non-reentrant, RNG state kept: same loss and gradients). timm's own
  ``set_grad_checkpointing`` is not enough: the methods run ``vit.blocks`` directly, not ``forward_features``.
* Checkpoints hold full (unsharded) state dicts keyed by parameter names, model and optimizer alike
  (``torch.distributed.checkpoint.state_dict``, gathered to rank 0 on the CPU): a DDP checkpoint loads into an FSDP
  run and the reverse, at any world size.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

STRATEGIES = ("ddp", "fsdp")


def _many_workers() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _is_block(module: nn.Module) -> bool:
    return type(module).__name__.endswith("Block")


def _is_head(module: nn.Module) -> bool:
    return type(module).__name__.endswith("Head")


# ---- FSDP ---------------------------------------------------------------------------------------------------
def shard_method(method: nn.Module, device: torch.device) -> nn.Module:
    """``fully_shard`` every block and head of ``method`` (student, teacher, decoder / predictor), then ``method``
    itself (in place; its parameters become ``DTensor`` shards: build the optimizer afterwards)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    world = dist.get_world_size() if dist.is_initialized() else 1
    mesh = init_device_mesh(device.type, (world,))
    units = [m for m in method.modules() if m is not method and (_is_block(m) or _is_head(m))]
    inner = {id(sub) for m in units for sub in m.modules() if sub is not m}  # a head's blocks: sharded once, outside
    for module in units:
        if id(module) not in inner:
            fully_shard(module, mesh=mesh)
    fully_shard(method, mesh=mesh)
    return method


def is_sharded(method: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(method, FSDPModule)


def local(t: torch.Tensor) -> torch.Tensor:
    """A ``DTensor``'s local shard; a plain tensor as it is."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Backward passes inside all-reduce (or reduce-scatter) their gradients only when ``enabled``: DDP's
    ``no_sync`` and FSDP2's ``set_requires_gradient_sync``; a plain module always accumulates locally."""
    if enabled:
        yield
    elif isinstance(model, nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
    elif is_sharded(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


# ---- gradient norms and clipping over shards ---------------------------------------------------------------
def gradient_norm_and_clip(params: list[nn.Parameter], optim: Any) -> torch.Tensor:
    """The global L2 norm of the gradients of ``params`` (the whole gradient, also when sharded), after clipping them
    as ``optim.clip_grad`` / ``optim.clip_mode`` say (``global``: ``g <- g * min(1, c / (||g|| + 1e-6))`` as
    ``clip_grad_norm_``; ``per_param``: each parameter by its own norm, DINO's ``clip_gradients``). One all-reduce
    of the per-parameter squared norms under FSDP, none otherwise."""
    grads = [local(p.grad) for p in params]
    if not grads:
        return torch.zeros(())
    squares = torch.stack(torch._foreach_norm(grads)).float() ** 2
    if grads[0] is not params[0].grad and _many_workers():
        dist.all_reduce(squares)  # the shards' squared norms add up to each parameter's
    norms = squares.sqrt()
    total = squares.sum().sqrt()
    clip = float(optim.clip_grad)
    if clip > 0:
        if optim.get("clip_mode", "global") == "per_param":
            coefs = (clip / (norms + 1e-6)).clamp_(max=1.0)
            torch._foreach_mul_(grads, [c.to(g.dtype) for c, g in zip(coefs.unbind(), grads)])
        else:
            torch._foreach_mul_(grads, (clip / (total + 1e-6)).clamp(max=1.0).to(grads[0].dtype))
    return total


# ---- activation checkpointing -------------------------------------------------------------------------------
def _checkpointed_forward(forward, *args, **kwargs):
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def enable_activation_checkpointing(method: nn.Module) -> int:
    """Every block of ``method`` with trainable parameters recomputes its activations in backward (before any
    sharding: state-dict keys do not change). Returns the number of blocks."""
    count = 0
    for module in method.modules():
        if _is_block(module) and any(p.requires_grad for p in module.parameters()):
            module.forward = functools.partial(_checkpointed_forward, module.forward)
            count += 1
    return count


# ---- checkpoint state, the same for every strategy ----------------------------------------------------------
def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_model_state(method: nn.Module) -> dict[str, torch.Tensor]:
    """The whole method's unsharded state dict on the CPU; collective under FSDP (every rank calls it, rank 0 gets
    it, the others an empty dict)."""
    if not is_sharded(method):
        return {k: v.detach().cpu() for k, v in method.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(method, options=_options(cpu_offload=True))


def full_optimizer_state(method: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """AdamW's state keyed by parameter names (unsharded, CPU): loadable by :func:`load_full_state` under any
    strategy and world size; collective under FSDP like :func:`full_model_state`."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    if is_sharded(method):
        return get_optimizer_state_dict(method, optimizer, options=_options(cpu_offload=True))
    return get_optimizer_state_dict(method, optimizer, options=_options())


def load_full_state(method: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict[str, torch.Tensor],
                    optimizer_state: dict[str, Any] | None) -> None:
    """Load full state dicts (every rank passes the same) into a plain or sharded method and its optimizer. An
    optimizer state keyed by parameter indices (checkpoints written before ``scaling.strategy``) loads as before
    into an unsharded method."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    if is_sharded(method):
        set_model_state_dict(method, model_state, options=_options())
    else:
        method.load_state_dict(model_state, strict=True)
    if optimizer_state is None:
        return
    if all(isinstance(k, int) for k in optimizer_state.get("state", {})) and optimizer_state.get("state"):
        if is_sharded(method):
            raise ValueError("optimizer.pt: a checkpoint with index-keyed optimizer state (written before "
                             "scaling.strategy existed) loads only with scaling.strategy: ddp")
        optimizer.load_state_dict(optimizer_state)
        return
    set_optimizer_state_dict(method, optimizer, optimizer_state, options=_options())


def module_prefix(root: nn.Module, module: nn.Module) -> str:
    """The name of ``module`` inside ``root`` (``""`` for ``root``)."""
    for name, sub in root.named_modules():
        if sub is module:
            return name
    raise ValueError(f"{type(module).__name__} is not a submodule of {type(root).__name__}")


def encoder_state_from(method: nn.Module, model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The exported encoder's state dict (``method.export_encoder()``) cut out of the whole method's full state dict:
    the same plain timm state dict as ``method.encoder_state_dict()`` of an unsharded method."""
    prefix = module_prefix(method, method.export_encoder())
    own = method.export_encoder().state_dict().keys()
    cut = len(prefix) + 1 if prefix else 0
    out = {k[cut:]: v for k, v in model_state.items() if not prefix or k.startswith(prefix + ".")}
    return {k: out[k].detach().cpu().clone() for k in own}


# ---- evaluation under FSDP ----------------------------------------------------------------------------------
def equal_length_batches(batches: Iterable, empty_like: Callable[[Any], Any]) -> Iterator:
    """``batches``, then ``empty_like(last batch)`` until every rank is out of batches: under FSDP each forward is a
    collective (blocks are gathered), so every rank must run as many. One all-reduce of a flag per batch."""
    it = iter(batches)
    last = None
    while True:
        batch = next(it, None)
        flag = torch.tensor([0.0 if batch is None else 1.0])
        if _many_workers():
            dist.all_reduce(flag)
        if float(flag) == 0.0:
            return
        if batch is not None:
            last = batch
        elif last is None:
            raise RuntimeError("evaluation: this rank got no batch while others did (fewer batches than ranks)")
        yield batch if batch is not None else empty_like(last)
