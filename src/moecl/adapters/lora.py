"""A single LoRA adapter around a linear layer: ``y = base(x) + (alpha / r) B A x``.

The adapter keeps the wrapped module as ``base_layer``, calls it first and adds its low-rank
delta, so the ``nn.Linear`` contract (signature, output dtype) is unchanged. It wraps both
``nn.Linear`` (weight ``(out, in)``) and transformers' ``Conv1D`` (GPT-2; weight ``(in, out)``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

LINEAR_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, Conv1D)
"""Module types an adapter can wrap; model surgery only targets these."""


def linear_features(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of an ``nn.Linear`` or a transformers ``Conv1D``."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        in_features, out_features = module.weight.shape
        return in_features, out_features
    raise TypeError(
        f"cannot attach a LoRA adapter to {type(module).__name__}: only nn.Linear and "
        "transformers' Conv1D are supported; choose target modules of those types"
    )


def adapter_dtype(module: nn.Module) -> torch.dtype:
    """Adapters of a half-precision layer train in float32 (as PEFT does); others match the layer."""
    dtype = module.weight.dtype
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def init_lora_pair(
    rank: int, in_features: int, out_features: int, like: torch.Tensor, dtype: torch.dtype
) -> tuple[nn.Parameter, nn.Parameter]:
    """Fresh ``A (rank, in)`` with PEFT's Kaiming-uniform init and ``B (out, rank)`` at zero.

    ``B = 0`` makes a new adapter an exact no-op, so wrapping a model or adding an expert
    leaves its outputs unchanged until training moves ``B``.
    """
    a = torch.empty(rank, in_features, dtype=dtype, device=like.device)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    b = torch.zeros(out_features, rank, dtype=dtype, device=like.device)
    return nn.Parameter(a), nn.Parameter(b)


def make_dropout(p: float) -> nn.Module:
    return nn.Dropout(p) if p > 0 else nn.Identity()


class LoRALinear(nn.Module):
    """One LoRA adapter shared by every task (PMoE's shallow blocks).

    Args:
        base_layer: the ``nn.Linear`` or ``Conv1D`` to adapt; it stays frozen.
        rank: ``r``, the inner dimension of ``B A``.
        alpha: scale numerator; the delta is multiplied by ``alpha / r``.
        dropout: dropout on the adapter's input only (the base path is untouched).
    """

    def __init__(self, base_layer: nn.Module, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base_layer = base_layer
        in_features, out_features = linear_features(base_layer)
        self.in_features, self.out_features = in_features, out_features
        self.rank = rank
        self.scaling = alpha / rank
        self.dropout = make_dropout(dropout)
        self.lora_A, self.lora_B = init_lora_pair(
            rank, in_features, out_features, base_layer.weight, adapter_dtype(base_layer)
        )

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """``(alpha/r) B A x`` for ``x (..., in)`` -> ``(..., out)`` in the adapter dtype.

        The scale multiplies ``B (out, r)``, not the ``(..., out)`` product: the same numbers
        up to rounding, one pass over the activations fewer forward and backward."""
        h = F.linear(self.dropout(x.to(self.lora_A.dtype)), self.lora_A)  # (..., r)
        return F.linear(h, self.lora_B * self.scaling)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``base(x) + delta(x)`` for ``x (..., in)`` -> ``(..., out)`` in the base's dtype: the
        stock form (the CPU backend's merged layer is tested against it)."""
        result = self.base_layer(x)
        return result + self.delta(x).to(result.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, scaling={self.scaling:g}"
