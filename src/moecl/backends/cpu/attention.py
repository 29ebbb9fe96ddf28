"""Attention of grouped-query models on CPU, computing what transformers' ``sdpa`` does.

Models with grouped-query attention (SmolLM2: 9 query heads on 3 key/value heads) repeat their
keys and values for each query head before ``scaled_dot_product_attention`` whenever a padding
mask is present, because CUDA's fast kernels take no grouped heads with a mask. PyTorch's CPU
kernel does (``enable_gqa``): the outputs are bit-identical, gradients equal up to rounding.
:func:`convert` switches one model to ``moecl_sdpa``, which is transformers' ``sdpa`` everywhere
else (decoding, no mask). In a training step on sequences of 64-512 tokens it computes causal
attention as batched products, block by block, with the gradient written out
(:class:`_BatchedAttention`): 0.8x SDPA's time at 121 tokens, 0.66x at 512.

The name is registered with transformers' attention registry (a new entry; no existing one
changes) the first time a model is converted.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface, AttentionMaskInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from moecl.backends import Applied

GQA_ATTENTION = "moecl_sdpa"
"""The attention implementation :func:`convert` gives grouped-query models."""


def convert(model: nn.Module) -> Applied:
    """Switch a grouped-query model on ``sdpa`` (the model itself or the Hugging Face model an
    adapter model wraps) to :data:`GQA_ATTENTION`; undone by setting ``sdpa`` back."""
    hf = model if isinstance(model, PreTrainedModel) else getattr(model, "base_model", None)
    config = getattr(hf, "config", None)
    if not isinstance(hf, PreTrainedModel) or getattr(config, "_attn_implementation", None) != "sdpa":
        return Applied("cpu")
    heads, kv_heads = getattr(config, "num_attention_heads", 0), getattr(config, "num_key_value_heads", None)
    if not kv_heads or heads <= kv_heads:
        return Applied("cpu")
    if GQA_ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(GQA_ATTENTION, grouped_sdpa)
        AttentionMaskInterface.register(GQA_ATTENTION, sdpa_mask)
    hf.set_attn_implementation(GQA_ATTENTION)
    return Applied("cpu", {"attention": 1}, [lambda: hf.set_attn_implementation("sdpa")])


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
    """transformers' ``sdpa`` attention, with grouped key/value heads passed as they are on CPU
    (by :class:`_BatchedAttention` where :func:`batched_attention_applies`, else SDPA).

    ``query (batch, heads, q_len, head_dim)``, ``key``/``value (batch, kv_heads, kv_len,
    head_dim)``, ``attention_mask (batch, 1, q_len, kv_len)``; returns ``(batch, q_len, heads,
    head_dim)`` as transformers' attention functions do."""
    plain = all(kwargs.get(k) is None for k in ("cache", "position_bias", "softcap"))  # nothing sdpa's path adds
    if plain and query.is_cpu and attention_mask is not None and query.shape[2] > 1 and query.shape[1] != key.shape[1]:
        if batched_attention_applies(query, key, attention_mask, dropout):
            out = _BatchedAttention.apply(query, key, value, attention_mask, scaling or query.shape[-1] ** -0.5)
            return out.transpose(1, 2).contiguous(), None
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, enable_gqa=True
        )
        return out.transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
    )


BATCHED_ATTENTION_LENGTHS = (64, 512)
"""Sequence lengths :class:`_BatchedAttention` takes (both ends included). On SmolLM2-135M's
attention (8 sequences, 9 query heads on 3, head dim 64), forward + backward, against SDPA's flash
kernel: 3.67 against 4.07 ms at 88 tokens, 6.31 / 7.81 at 121, 9.91 / 12.56 at 161, 21.0 / 27.6 at
256, 34.5 / 52.2 at 512 (4 sequences); but 0.66 against 0.45 ms at 18, where its dozens of small
operations cost more than the products. Beyond 512 the scores it keeps grow as the square."""

QUERY_BLOCK = 48
"""Query positions per block of :class:`_BatchedAttention` (about; the blocks split the sequence
evenly): a block attends to the keys up to its last query only, so two blocks skip a quarter of the
causal products, three a third."""


def batched_attention_applies(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor, dropout: float) -> bool:
    """Whether :class:`_BatchedAttention` computes what SDPA would, faster: a training step (a
    backward to come) on float32 CPU tensors, causal self-attention of a length within
    :data:`BATCHED_ATTENTION_LENGTHS`, a boolean ``(batch, 1, len, len)`` mask, no dropout.

    The mask must be causal (transformers' masks for decoder models are: causal and padding),
    since the blocks leave out the keys after each block's last query without reading the mask
    there; a mask that lets a query see a later key goes to SDPA."""
    b, _, s, _ = query.shape
    low, high = BATCHED_ATTENTION_LENGTHS
    return (
        torch.is_grad_enabled()
        and (query.requires_grad or key.requires_grad)
        and query.dtype == torch.float32
        and low <= key.shape[2] == s <= high
        and mask.dtype == torch.bool
        and tuple(mask.shape) == (b, 1, s, s)
        and not dropout
        and not bool(mask.triu(1).any())  # causal: no query attends to a later key
    )


def _query_blocks(length: int) -> list[tuple[int, int]]:
    """``[start, end)`` of each block of :data:`QUERY_BLOCK` or so query positions."""
    n = max(1, round(length / QUERY_BLOCK))
    edges = [round(i * length / n) for i in range(n + 1)]
    return list(zip(edges[:-1], edges[1:], strict=True))


class _BatchedAttention(torch.autograd.Function):
    """Causal grouped-query attention as batched products, with its gradient written out: for the
    sequences of a training step on CPU, faster than SDPA's flash kernel (numbers at
    :data:`BATCHED_ATTENTION_LENGTHS`).

    ``q (b, h, s, d)``, ``k``/``v (b, kv, s, d)``, ``mask (b, 1, s, s)`` (True: may attend, causal).
    For each key/value head, its ``g = h / kv`` query heads are stacked position by position into
    one ``(s g, d)`` operand, so a product covers a whole group (keys and values are never
    repeated), and a block of query positions is a range of its rows. Each block multiplies only
    the keys up to its own last position: the products above the causal diagonal's blocks are
    skipped, not masked. With ``P = softmax(scale Q K^T + mask)`` and ``dO`` the output gradient,
    block by block::

        O = P V        dV += P^T dO        dS = P * (dO V^T - rowsum(dO * O))
        dQ = scale dS K                    dK += scale dS^T Q

    A query row whose mask is all False (left padding) gets output 0 and passes no gradient, as
    SDPA's CPU kernels do. The output is a view of ``(b, s, h, d)`` memory, the layout the
    attention module reshapes it to.
    """

    @staticmethod
    def forward(ctx, q, k, v, mask, scale):
        b, h, s, d = q.shape
        kv = k.shape[1]
        g = h // kv
        qr = q.reshape(b, kv, g, s, d).transpose(2, 3).contiguous().view(b * kv, s * g, d)  # rows (s, g)
        kg, vg = k.contiguous().view(b * kv, s, d), v.contiguous().view(b * kv, s, d)
        bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, torch.finfo(q.dtype).min)
        rows, positions = (~mask.any(-1)[:, 0]).nonzero(as_tuple=True)  # fully masked query rows
        out = q.new_empty(b, s, kv, g, d)
        probs = []
        for start, end in _query_blocks(s):
            n = end - start
            scores = torch.bmm(qr[:, start * g : end * g], kg[:, :end].transpose(1, 2))  # (b kv, n g, end)
            grouped = scores.view(b, kv, n, g, end)
            torch.add(bias[:, :, start:end, :end].unsqueeze(3), grouped, alpha=scale, out=grouped)
            p = torch.softmax(scores, dim=-1)
            here = (positions >= start) & (positions < end)
            if bool(here.any()):  # uniform after the softmax; SDPA gives them 0
                p.view(b, kv, n, g, end)[rows[here], :, positions[here] - start] = 0
            out[:, start:end] = torch.bmm(p, vg[:, :end]).view(b, kv, n, g, d).transpose(1, 2)
            probs.append(p)
        ctx.save_for_backward(qr, kg, vg, out, *probs)
        ctx.scale = scale
        return out.view(b, s, h, d).transpose(1, 2)

    @staticmethod
    def backward(ctx, grad):
        qr, kg, vg, out, *probs = ctx.saved_tensors
        b, h, s, d = grad.shape
        kv = kg.shape[0] // b
        g = h // kv
        do = grad.transpose(1, 2).reshape(b, s, kv, g, d)
        delta = (do * out).sum(-1, keepdim=True)  # rowsum(dO * O), (b, s, kv, g, 1)
        grad_q = qr.new_empty(b, s, kv, g, d)
        grad_k, grad_v = torch.zeros_like(kg), torch.zeros_like(vg)
        for (start, end), p in zip(_query_blocks(s), probs, strict=True):
            n = end - start
            do_block = do[:, start:end].transpose(1, 2).reshape(b * kv, n * g, d)
            grad_v[:, :end].baddbmm_(p.transpose(1, 2), do_block)
            ds = torch.bmm(do_block, vg[:, :end].transpose(1, 2))  # dP (b kv, n g, end)
            ds.sub_(delta[:, start:end].transpose(1, 2).reshape(b * kv, n * g, 1)).mul_(p)  # softmax's gradient
            grad_q[:, start:end] = torch.bmm(ds, kg[:, :end]).view(b, kv, n, g, d).transpose(1, 2)
            grad_k[:, :end].baddbmm_(ds.transpose(1, 2), qr[:, start * g : end * g], alpha=ctx.scale)
        grad_q = grad_q.mul_(ctx.scale).view(b, s, h, d).transpose(1, 2)
        return grad_q, grad_k.view(b, kv, s, d), grad_v.view(b, kv, s, d), None, None
