"""A loaded model's layers on the fastest CPU kernels PyTorch has for them, computing the same.

Three in-place conversions, each the same function as the one it replaces:

- linear layers: :func:`moecl.onednn.use_onednn` (MKL's fast kernels or oneDNN);
- attention: models with grouped-query attention (SmolLM2: 9 query heads on 3 key/value heads)
  repeat their keys and values for each query head before ``scaled_dot_product_attention``
  whenever a padding mask is present, because CUDA's fast kernels take no grouped heads with a
  mask. PyTorch's CPU kernel does (``enable_gqa``): a PMoE training step of SmolLM2-135M on
  1,040 tokens goes from 1,376 to 1,356 ms (8 interleaved rounds); the outputs are
  bit-identical, gradients equal up to rounding. Registered with transformers as
  ``moecl_sdpa``, which is transformers' ``sdpa`` everywhere else (GPUs, decoding, no mask);
- rotary position embedding: Llama's ``apply_rotary_pos_emb`` (``x cos + rotate_half(x) sin``)
  leaves its gradient to autograd, which takes it apart in about eight passes over the queries
  and keys (two slices zero-filled and copied back, a negation, a concatenation, two products,
  two sums). :func:`fused_rotary` puts in its place the same formula with its gradient written
  out, three passes (:class:`_Rotary`): 730 -> 737 tokens/s on the benchmark's stream (5
  interleaved rounds). transformers calls the function through its modeling module, so the
  replacement holds for every model of that module in the process; it is made only after a
  probe shows both give the same values.

Tried and not kept: ``F.rms_norm`` for Llama's RMSNorm (one fused kernel instead of five passes;
2.4 -> 1.6 ms a call alone with a trainable weight, but level in the step: 1,354 against 1,358
ms, likely because the weight is frozen there and Llama's own backward skips its gradient), and
RMSNorm with its gradient written out like :class:`_Rotary` (718 against 719 tokens/s).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface, AttentionMaskInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from moecl.onednn import use_onednn

GQA_ATTENTION = "moecl_sdpa"
"""The attention implementation :func:`use_fast_kernels` gives grouped-query models."""


ROTARY_MODULES = ("transformers.models.llama.modeling_llama",)
"""Modeling modules whose ``apply_rotary_pos_emb`` :func:`fused_rotary` may replace (the families
whose rotary embedding is Llama's half-split form; others keep theirs)."""

ROTARY_ORIGINALS: dict[str, Callable] = {}
"""The ``apply_rotary_pos_emb`` each replaced module had, by module name (for comparisons)."""


def use_fast_kernels(model: nn.Module) -> dict[str, int]:
    """Convert ``model``'s layers in place (module docstring); returns how many of each."""
    return {"linear": use_onednn(model), "attention": grouped_attention(model), "rotary": fused_rotary(model)}


def grouped_attention(model: nn.Module) -> int:
    """Switch a grouped-query model on ``sdpa`` to :data:`GQA_ATTENTION`; returns 1 if it did."""
    config = getattr(model, "config", None)
    if not isinstance(model, PreTrainedModel) or getattr(config, "_attn_implementation", None) != "sdpa":
        return 0
    heads, kv_heads = getattr(config, "num_attention_heads", 0), getattr(config, "num_key_value_heads", None)
    if not kv_heads or heads <= kv_heads:
        return 0
    model.set_attn_implementation(GQA_ATTENTION)
    return 1


def grouped_sdpa(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' ``sdpa`` attention, with grouped key/value heads passed as they are on CPU.

    ``query (batch, heads, q_len, head_dim)``, ``key``/``value (batch, kv_heads, kv_len,
    head_dim)``, ``attention_mask (batch, 1, q_len, kv_len)``; returns ``(batch, q_len, heads,
    head_dim)`` as transformers' attention functions do."""
    plain = all(kwargs.get(k) is None for k in ("cache", "position_bias", "softcap"))  # nothing sdpa's path adds
    if plain and query.is_cpu and attention_mask is not None and query.shape[2] > 1 and query.shape[1] != key.shape[1]:
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, enable_gqa=True
        )
        return out.transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
    )


class _Rotary(torch.autograd.Function):
    """``x cos + rotate_half(x) sin`` for ``x (batch, heads, seq, head_dim)`` and ``cos``/``sin``
    broadcasting to it, ``rotate_half(x) = cat(-x2, x1)`` over the two halves of ``head_dim``.

    ``rotate_half`` is a signed permutation whose transpose is ``y -> cat(y2, -y1)``, so the input
    gradient is ``dy cos + cat(t2, -t1)`` with ``t = dy sin``: three passes. ``cos`` and ``sin``
    (which transformers computes without a gradient) get theirs only where asked, ``dy x`` and
    ``dy rotate_half(x)`` summed over what they broadcast over; ``x`` is kept for that alone."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(x if any(ctx.needs_input_grad[1:]) else None, cos, sin)
        return torch.addcmul(x * cos, _rotate_half(x), sin)

    @staticmethod
    def backward(ctx, grad):
        x, cos, sin = ctx.saved_tensors
        grad_x = grad_cos = grad_sin = None
        if ctx.needs_input_grad[0]:
            t = grad * sin
            half = t.shape[-1] // 2
            grad_x = torch.addcmul(torch.cat((t[..., half:], -t[..., :half]), dim=-1), grad, cos)
        if ctx.needs_input_grad[1]:
            grad_cos = (grad * x).sum_to_size(cos.shape)
        if ctx.needs_input_grad[2]:
            grad_sin = (grad * _rotate_half(x)).sum_to_size(sin.shape)
        return grad_x, grad_cos, grad_sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    """transformers' ``apply_rotary_pos_emb`` for queries and keys, by :class:`_Rotary`; the same
    signature and values (``cos``/``sin (batch, seq, head_dim)`` get a heads axis at
    ``unsqueeze_dim``)."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return _Rotary.apply(q, cos, sin), _Rotary.apply(k, cos, sin)


def fused_rotary(model: nn.Module) -> int:
    """Give the modeling module of ``model``'s family :func:`rotary_pos_emb` in place of its
    ``apply_rotary_pos_emb`` when it is one of :data:`ROTARY_MODULES` and a probe agrees with
    it; returns 1 if the model now runs on it."""
    name = type(model).__module__
    if name not in ROTARY_MODULES:
        return 0
    module = importlib.import_module(name)
    original = module.apply_rotary_pos_emb
    if original is rotary_pos_emb:
        return 1
    probe = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 5, 8, generator=probe), torch.randn(2, 2, 5, 8, generator=probe)
    cos, sin = torch.randn(2, 5, 8, generator=probe), torch.randn(2, 5, 8, generator=probe)
    pairs = zip(original(q, k, cos, sin), rotary_pos_emb(q, k, cos, sin), strict=True)
    if not all(torch.allclose(a, b, atol=1e-5) for a, b in pairs):
        return 0  # a transformers whose rotary differs: keep it
    ROTARY_ORIGINALS[name] = original
    module.apply_rotary_pos_emb = rotary_pos_emb
    return 1


AttentionInterface.register(GQA_ATTENTION, grouped_sdpa)
AttentionMaskInterface.register(GQA_ATTENTION, sdpa_mask)
