"""The one source of truth for which tensors belong to adapters, which train, and which are saved.

An adapter module (:data:`ADAPTER_TYPES`) owns the tensors registered directly on it; its
``base_layer`` belongs to the base model. Its parameters are what the current task trains;
its buffers (frozen experts) are saved but never trained.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from moecl.adapters.expert_bank import LoRAExpertBank
from moecl.adapters.lora import LoRALinear
from moecl.adapters.router import Router
from moecl.adapters.subexperts import TaskPrototypes, TopKRouter

ADAPTER_TYPES: tuple[type[nn.Module], ...] = (LoRALinear, LoRAExpertBank, Router, TopKRouter, TaskPrototypes)


def _adapter_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if isinstance(module, ADAPTER_TYPES):
            yield (f"{name}." if name else ""), module


def named_adapter_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """Every adapter parameter, i.e. exactly what the current task may train."""
    for prefix, module in _adapter_modules(model):
        for name, param in module.named_parameters(recurse=False):
            yield prefix + name, param


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """All adapter tensors (trainable and frozen), keyed as in ``model.state_dict()``."""
    state: dict[str, torch.Tensor] = dict(named_adapter_parameters(model))
    for prefix, module in _adapter_modules(model):
        for name, buf in module.named_buffers(recurse=False):
            state[prefix + name] = buf
    return state


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` element counts of a model with adapters, frozen experts (buffers)
    counted in the total."""
    trainable = dict(named_adapter_parameters(model))
    frozen = sum(t.numel() for k, t in adapter_state_dict(model).items() if k not in trainable)
    return sum(p.numel() for p in trainable.values()), sum(p.numel() for p in model.parameters()) + frozen
