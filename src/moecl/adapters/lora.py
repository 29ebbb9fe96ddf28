"""A single LoRA adapter around a linear layer: ``y = base(x) + (alpha / r) B A x``.

The adapter keeps the wrapped module as ``base_layer``, calls it first and adds its low-rank
delta, so the ``nn.Linear`` contract (signature, output dtype) is unchanged. It wraps both
``nn.Linear`` (weight ``(out, in)``) and transformers' ``Conv1D`` (GPT-2; weight ``(in, out)``).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from moecl.onednn import linear

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


class _MergedLoRA(torch.autograd.Function):
    """``x (W + s B A)^T + b``: the adapted layer as one product with the merged weight.

    Forward and input gradient each become one large product instead of the base product, two
    low-rank ones and an addition over the ``(tokens, out)`` activations: on CPU those extra
    passes over memory cost more than building ``W + s B A`` (``out x in``, once per call). The
    gradients of ``A (r, in)`` and ``B (out, r)`` are those of the separate form::

        dA = s (g B)^T x        dB = s g^T (x A^T)        dx = g (W + s B A)

    The backward's low-rank products take the ``M`` tokens as their columns: ``(g B)^T`` and
    ``(x A^T)^T`` are ``(r, M)`` products, and ``dA``, ``dB^T`` then read them row by row. With the
    tokens as rows instead (``(M, r)`` results), MKL's kernel gets an output panel only ``r = 8``
    wide: on SmolLM2-135M's shapes (968 tokens, two cores, operands cold) the four products of a
    layer took 15-26% longer, 194 against 159 ms of low-rank products per 8 x 121-token step.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling):
        merged = torch.addmm(weight, lora_b, lora_a, alpha=scaling)  # (out, in)
        ctx.save_for_backward(x, merged, lora_a, lora_b)
        ctx.scaling = scaling
        return linear(x, merged, bias)

    @staticmethod
    def backward(ctx, grad):
        x, merged, lora_a, lora_b = ctx.saved_tensors
        g, x2 = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])  # (M, out), (M, in)
        grad_x = linear(grad, merged.t()) if ctx.needs_input_grad[0] else None
        grad_a = grad_b = None
        if ctx.needs_input_grad[3]:
            g_b = linear(lora_b.t(), g)  # (r, M) = (g B)^T
            grad_a = linear(g_b, x2.t()) * ctx.scaling  # (r, in) = (g B)^T x
        if ctx.needs_input_grad[4]:
            h = linear(lora_a, x2)  # (r, M) = (x A^T)^T
            grad_b = linear(h, g.t()).t() * ctx.scaling  # (out, r) = g^T (x A^T)
        return grad_x, None, None, grad_a, grad_b, None


class LoRALinear(nn.Module):
    """One LoRA adapter shared by every task (PMoE's shallow blocks, SPEC §1.2).

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
        self._merged: tuple[tuple, torch.Tensor] | None = None  # (versions, W + s B A) for evaluation

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """``(alpha/r) B A x`` for ``x (..., in)`` -> ``(..., out)`` in the adapter dtype.

        The scale multiplies ``B (out, r)``, not the ``(..., out)`` product: the same numbers
        up to rounding, one pass over the activations fewer forward and backward."""
        h = linear(self.dropout(x.to(self.lora_A.dtype)), self.lora_A)  # (..., r)
        return linear(h, self.lora_B * self.scaling)

    def mergeable(self) -> bool:
        """The merged form computes the same function: an ``nn.Linear`` base of the adapters' own
        dtype and no dropout on the adapter's input (which the base path does not see)."""
        return (
            isinstance(self.base_layer, nn.Linear)
            and isinstance(self.dropout, nn.Identity)
            and self.base_layer.weight.dtype == self.lora_A.dtype
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mergeable() and x.dtype == self.lora_A.dtype:
            layer = self.base_layer
            if torch.is_grad_enabled() and (self.lora_A.requires_grad or self.lora_B.requires_grad or x.requires_grad):
                self._merged = None
                return _MergedLoRA.apply(x, layer.weight, layer.bias, self.lora_A, self.lora_B, self.scaling)
            return linear(x, self.merged_weight(), layer.bias)
        return self.reference_forward(x)

    def merged_weight(self) -> torch.Tensor:
        """``W + s B A`` for evaluation, built again only when ``W``, ``A`` or ``B`` changed."""
        tensors = (self.base_layer.weight, self.lora_A, self.lora_B)
        key = tuple((t.data_ptr(), t._version) for t in tensors)
        if self._merged is None or self._merged[0] != key:
            with torch.no_grad():
                self._merged = (key, torch.addmm(tensors[0], self.lora_B, self.lora_A, alpha=self.scaling))
        return self._merged[1]

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``base(x) + delta(x)`` computed apart: the slow, obvious form the merged one is tested
        against, and the path for ``Conv1D`` bases, dropout and half-precision bases."""
        result = self.base_layer(x)
        return result + self.delta(x).to(result.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, scaling={self.scaling:g}"
