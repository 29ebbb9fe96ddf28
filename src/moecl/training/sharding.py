"""Training under an engine that shards parameters (FSDP, DeepSpeed): one sharded replica per task.

Such engines take a model over in place: FSDP2 turns each parameter into a ``DTensor`` shard and
all-gathers in every forward, so every process must run every forward in lockstep; ZeRO-3
partitions parameters and ZeRO-1/2 cast them. Between tasks moecl needs the plain model: PMoE and
MoSEs grow (the trained expert is concatenated onto the frozen stack, the router gets a column),
evaluation generates on each process's own prompts and stops when they end (no lockstep), and
checkpoints read plain tensors. So under these engines a task trains a *replica* (:func:`replica_of`):
the same module tree, whose frozen tensors alias the plain model's storage (no second copy of the
base) and whose trainable tensors are its own. The engine shards the replica; after the task, and
at every mid-task checkpoint, :func:`gather_trained` copies the trained tensors back into the plain
model, which the run evaluates, grows and saves exactly as under DDP. Frozen experts are never
handed to the engine's optimizer and never leave the plain model, so they stay bit-identical.

What this shards: the trainable parameters, their gradients and optimizer state (what full
fine-tuning needs sharded; a LoRA's are small). What it does not: every process keeps the plain
model in full, as under DDP, so the base weights are not sharded.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict


def shards_parameters(accelerator: Accelerator) -> bool:
    """Whether ``accelerator.prepare`` hands the model to an engine that takes it over (FSDP or
    DeepSpeed), so that a task must train a replica."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def replica_of(model: nn.Module) -> nn.Module:
    """A copy of ``model`` to hand to a sharding engine: trainable parameters copied, frozen ones
    new ``Parameter`` objects over the same storage, buffers (frozen experts) the same tensors.
    An engine that re-binds a parameter (sharding, casting, moving) re-binds the replica's only;
    the plain model keeps its own. Shared submodule references (a shared gate, tied embeddings)
    stay shared inside the replica."""
    memo: dict[int, Any] = {}
    for param in model.parameters():
        if not param.requires_grad:
            memo[id(param)] = nn.Parameter(param.detach(), requires_grad=False)
    for buffer in model.buffers():
        memo[id(buffer)] = buffer
    return copy.deepcopy(model, memo)


@torch.no_grad()
def gather_trained(replica: nn.Module, model: nn.Module) -> None:
    """Copy the replica's trainable parameters into ``model`` (same names), whole: a ``DTensor``
    shard is all-gathered, a ZeRO-3 partition gathered by DeepSpeed. A collective under a
    sharding engine: every process calls it, in the same order. Nothing to do when no replica
    was made (``replica is model``)."""
    if replica is model:
        return
    plain = dict(model.named_parameters())
    for name, param in replica.named_parameters():
        if param.requires_grad:
            plain[name].copy_(_whole(param))


def _whole(param: nn.Parameter) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    if isinstance(param, DTensor):
        return param.full_tensor()
    if hasattr(param, "ds_id"):  # a ZeRO-3 partition
        import deepspeed

        with deepspeed.zero.GatheredParameters([param]):
            return param.detach().clone()
    return param


def optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer, sharded: bool) -> dict[str, Any]:
    """The optimizer's state keyed by parameter name, whole even when ``sharded`` (a collective
    then), so a checkpoint loads whatever the number of processes or the engine."""
    options = StateDictOptions(full_state_dict=sharded)
    return get_optimizer_state_dict(module, _inner(optimizer), options=options)


def load_optimizer_state(
    module: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any], sharded: bool
) -> None:
    """Load :func:`optimizer_state`'s dict into the optimizer over ``module`` (after
    ``accelerator.prepare``: a sharding engine takes its shard of each tensor)."""
    options = StateDictOptions(full_state_dict=sharded)
    set_optimizer_state_dict(module, _inner(optimizer), state, options=options)


def _inner(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside Accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)
