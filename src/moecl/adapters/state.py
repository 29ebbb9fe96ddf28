"""The one source of truth for which tensors belong to adapters, which train, and which are saved.

An adapter module (:data:`ADAPTER_TYPES`) owns the tensors registered directly on it; its
``base_layer`` belongs to the base model. Its parameters are what the current task trains;
its buffers (frozen experts) are saved but never trained. A module may save them in another
form than it holds them (``saved_tensors``/``load_saved``: an expert bank and the router save one
stack of all their experts, not the frozen/training split).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from moecl.adapters.expert_bank import LoRAExpertBank
from moecl.adapters.lora import LoRALinear
from moecl.adapters.mixture import LoRAMixtureLinear
from moecl.adapters.router import Router
from moecl.adapters.subexperts import TaskPrototypes, TopKRouter

ADAPTER_TYPES: tuple[type[nn.Module], ...] = (
    LoRALinear,
    LoRAExpertBank,
    Router,
    TopKRouter,
    TaskPrototypes,
    LoRAMixtureLinear,
)


def _adapter_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if isinstance(module, ADAPTER_TYPES):
            yield (f"{name}." if name else ""), module


def named_adapter_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """Every adapter parameter, i.e. exactly what the current task may train."""
    for prefix, module in _adapter_modules(model):
        for name, param in module.named_parameters(recurse=False):
            yield prefix + name, param


def _own_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters and buffers registered on ``module`` itself, not on its children."""
    return {**dict(module.named_parameters(recurse=False)), **dict(module.named_buffers(recurse=False))}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """All adapter tensors (trainable and frozen), keyed as in ``model.state_dict()``."""
    return {prefix + name: t for prefix, module in _adapter_modules(model) for name, t in _own_tensors(module).items()}


def saved_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors as an adapter folder holds them: :func:`adapter_state_dict`, but in
    each module's saved form where it has one."""
    state: dict[str, torch.Tensor] = {}
    for prefix, module in _adapter_modules(model):
        tensors = module.saved_tensors() if hasattr(module, "saved_tensors") else _own_tensors(module)
        state.update({prefix + name: t for name, t in tensors.items()})
    return state


@torch.no_grad()
def load_saved_state(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copy ``weights`` (keys and shapes as :func:`saved_state_dict` gives, checked by the
    caller; a key may be absent where the module allows it) into ``model``'s adapters."""
    for prefix, module in _adapter_modules(model):
        local = {
            k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix) and "." not in k[len(prefix) :]
        }
        if hasattr(module, "load_saved"):
            module.load_saved(local)
        else:
            for name, tensor in local.items():
                getattr(module, name).copy_(tensor)


def upgrade_legacy_names(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Rename, in place, a folder's tensors saved under a module's older names (its
    ``LEGACY_NAMES``: the frozen/training split of an expert stack) to the saved form."""
    for prefix, module in _adapter_modules(model):
        legacy = getattr(module, "LEGACY_NAMES", ())
        current = set(module.saved_tensors()) if legacy else set()
        if not any(prefix + n in weights for n in legacy if n not in current):
            continue
        old = {n: weights.pop(prefix + n) for n in legacy if prefix + n in weights}
        weights.update({prefix + n: t for n, t in module.from_legacy(old).items()})


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` element counts of a model with adapters, frozen experts (buffers)
    counted in the total."""
    trainable = dict(named_adapter_parameters(model))
    frozen = sum(t.numel() for k, t in adapter_state_dict(model).items() if k not in trainable)
    return sum(p.numel() for p in trainable.values()), sum(p.numel() for p in model.parameters()) + frozen
