"""A loaded model's layers on the fastest CPU kernels PyTorch has for them, computing the same.

Two in-place conversions, each the same function as the layer it replaces:

- linear layers: :func:`moecl.onednn.use_onednn` (MKL's fast kernels or oneDNN);
- attention: models with grouped-query attention (SmolLM2: 9 query heads on 3 key/value heads)
  repeat their keys and values for each query head before ``scaled_dot_product_attention``
  whenever a padding mask is present, because CUDA's fast kernels take no grouped heads with a
  mask. PyTorch's CPU kernel does (``enable_gqa``): a PMoE training step of SmolLM2-135M on
  1,040 tokens goes from 1,376 to 1,356 ms (8 interleaved rounds); the outputs are
  bit-identical, gradients equal up to rounding. Registered with transformers as
  ``moecl_sdpa``, which is transformers' ``sdpa`` everywhere else (GPUs, decoding, no mask).

Tried and not kept: ``F.rms_norm`` for Llama's RMSNorm (one fused kernel instead of five passes;
2.4 -> 1.6 ms a call alone with a trainable weight, but level in the step: 1,354 against 1,358
ms, likely because the weight is frozen there and Llama's own backward skips its gradient).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface, AttentionMaskInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from moecl.onednn import use_onednn

GQA_ATTENTION = "moecl_sdpa"
"""The attention implementation :func:`use_fast_kernels` gives grouped-query models."""


def use_fast_kernels(model: nn.Module) -> dict[str, int]:
    """Convert ``model``'s layers in place (module docstring); returns how many of each."""
    return {"linear": use_onednn(model), "attention": grouped_attention(model)}


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


AttentionInterface.register(GQA_ATTENTION, grouped_sdpa)
AttentionMaskInterface.register(GQA_ATTENTION, sdpa_mask)
