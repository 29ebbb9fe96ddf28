"""A loaded model's layers on the fastest CPU kernels PyTorch has for them, computing the same.

Four in-place conversions, each the same function as the one it replaces:

- linear layers: :func:`moecl.onednn.use_onednn` (MKL's fast kernels or oneDNN);
- attention: models with grouped-query attention (SmolLM2: 9 query heads on 3 key/value heads)
  repeat their keys and values for each query head before ``scaled_dot_product_attention``
  whenever a padding mask is present, because CUDA's fast kernels take no grouped heads with a
  mask. PyTorch's CPU kernel does (``enable_gqa``): a PMoE training step of SmolLM2-135M on
  1,040 tokens goes from 1,376 to 1,356 ms (8 interleaved rounds); the outputs are
  bit-identical, gradients equal up to rounding. Registered with transformers as
  ``moecl_sdpa``, which is transformers' ``sdpa`` everywhere else (GPUs, decoding, no mask).
  In a training step on sequences of 64-512 tokens it computes causal attention as batched
  products, block by block, with the gradient written out (:class:`_BatchedAttention`): 0.8x
  SDPA's time at 121 tokens, 0.66x at 512;
- rotary position embedding: Llama's ``apply_rotary_pos_emb`` (``x cos + rotate_half(x) sin``)
  leaves its gradient to autograd, which takes it apart in about eight passes over the queries
  and keys (two slices zero-filled and copied back, a negation, a concatenation, two products,
  two sums). :func:`fused_rotary` puts in its place the same formula with its gradient written
  out, three passes (:class:`_Rotary`): 730 -> 737 tokens/s on the benchmark's stream (5
  interleaved rounds). transformers calls the function through its modeling module, so the
  replacement holds for every model of that module in the process; it is made only after a
  probe shows both give the same values.

- the last block (Llama): a caller that asks for the logits of the last ``n`` positions only
  (``logits_to_keep = n``: training's answer loss, generation's prefill) needs the last block's
  output there alone, since no later block reads the others. :func:`pruned_last_block` makes it
  compute keys and values for every position (the attention, and the KV cache, need them) and
  its queries, attention output, MLP and norms for those ``n`` positions only: on SmolLM2-135M
  the products of 3.3M of the model's 106M weights run on the answer's few positions instead of
  all, about 3% of a training step's products (:class:`LastColumnsBlock`; +2.2% tokens/s).

Tried and not kept: ``F.rms_norm`` for Llama's RMSNorm (one fused kernel instead of five passes;
2.4 -> 1.6 ms a call alone with a trainable weight, but level in the step: 1,354 against 1,358
ms, likely because the weight is frozen there and Llama's own backward skips its gradient), and
RMSNorm with its gradient written out like :class:`_Rotary` (718 against 719 tokens/s).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface, AttentionMaskInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from moecl.adapters.router import computing_last_positions
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
    return {
        "linear": use_onednn(model),
        "attention": grouped_attention(model),
        "rotary": fused_rotary(model),
        "last_block": pruned_last_block(model),
    }


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


LAST_BLOCK_ATTENTION = ("sdpa", GQA_ATTENTION)
"""Attention implementations :class:`LastColumnsBlock` prunes under: they take a boolean mask
of ``n`` query rows against every key (it builds one where transformers passes ``None`` and
relies on ``is_causal``, which would align the ``n`` queries with the first keys)."""


class LastColumnsBlock(LlamaDecoderLayer):
    """A Llama decoder block that, called with ``last_columns = n``, returns its output for the
    last ``n`` positions only: ``(batch, n, hidden)``.

    Keys and values are projected (and cached) for every position; queries, the attention
    output, the residual stream, the post-attention norm and the MLP for the last ``n``. Since
    this is the model's last block and transformers then takes the last ``n`` positions of its
    output for the logits (``logits_to_keep = n``), the logits are those of the whole block, up
    to float rounding. Without ``last_columns``, with output hidden states or attentions
    requested, or with a forward hook on the block (which may read every position's output), it
    is Llama's block.

    :func:`pruned_last_block` sets :attr:`columns` from each call of the model's integer
    ``logits_to_keep``, and a pre-hook of the block hands it over as ``last_columns``: an argument,
    so that activation checkpointing's recomputation, which runs after the call, sees it too."""

    columns: int | None = None

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache=None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        last_columns: int | None = None,
        **kwargs,
    ) -> torch.Tensor:
        n, (batch, length) = last_columns, hidden_states.shape[:2]
        attn = self.self_attn
        implementation = attn.config._attn_implementation
        if (
            n is None
            or n >= length
            or self._forward_hooks  # a hook may read every position (PMoE's router at tau = all blocks)
            or implementation not in LAST_BLOCK_ATTENTION
            or not (attention_mask is None or isinstance(attention_mask, torch.Tensor))
        ):
            return super().forward(
                hidden_states,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                position_embeddings=position_embeddings,
                **kwargs,
            )
        with computing_last_positions(n):  # PMoE's deep banks read the gate of these positions
            normed = self.input_layernorm(hidden_states)  # (batch, length, hidden)
            dim = attn.head_dim
            key = attn.k_proj(normed).view(batch, length, -1, dim).transpose(1, 2)  # (batch, kv_heads, length, dim)
            value = attn.v_proj(normed).view(batch, length, -1, dim).transpose(1, 2)
            query = attn.q_proj(normed[:, -n:]).view(batch, n, -1, dim).transpose(1, 2)  # (batch, heads, n, dim)
            cos, sin = position_embeddings
            # Llama's function (or ours, fused_rotary) rotates a query and a key of one length: each
            # goes in twice; the spare results cost one more rotation of this block's keys
            rotary = importlib.import_module(type(attn).__module__).apply_rotary_pos_emb
            query = rotary(query, query, cos[:, -n:], sin[:, -n:])[0]
            key = rotary(key, key, cos, sin)[1]
            if cache is not None:
                key, value = cache.update(key, value, attn.layer_idx, kwargs=kwargs)
            keys = key.shape[2]
            if attention_mask is None:  # causal, no padding: query i sits at position keys - n + i
                mask = torch.ones(n, keys, dtype=torch.bool, device=query.device).tril(keys - n)[None, None]
            else:
                mask = attention_mask[:, :, -n:, :]
            out, _ = ALL_ATTENTION_FUNCTIONS[implementation](
                attn,
                query,
                key,
                value,
                mask,
                dropout=0.0 if not attn.training else attn.attention_dropout,
                scaling=attn.scaling,
                **kwargs,
            )
            hidden = hidden_states[:, -n:] + attn.o_proj(out.reshape(batch, n, -1).contiguous())
            return hidden + self.mlp(self.post_attention_layernorm(hidden))


def pruned_last_block(model: nn.Module) -> int:
    """Make the last block of a Llama causal LM a :class:`LastColumnsBlock` (in place: the same
    module, parameters and state dict) computing each call's integer ``logits_to_keep``
    positions; returns 1 if it did. Other families, and transformers versions whose
    block does not take the arguments :class:`LastColumnsBlock` was written against, keep theirs."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(model, PreTrainedModel) or not layers:
        return 0
    if type(layers[-1]) not in (LlamaDecoderLayer, LastColumnsBlock):
        return 0
    if "cache" not in inspect.signature(LlamaDecoderLayer.forward).parameters:
        return 0
    if type(layers[-1]) is LastColumnsBlock:
        return 1
    layers[-1].__class__ = LastColumnsBlock
    layers[-1].register_forward_pre_hook(_pass_columns, with_kwargs=True)
    model.register_forward_pre_hook(_keep_columns, with_kwargs=True)
    model.register_forward_hook(_release_columns, with_kwargs=True, always_call=True)
    return 1


def _keep_columns(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """Before a call of the causal LM: its last block computes ``logits_to_keep`` positions."""
    n = kwargs.get("logits_to_keep")
    wanted = any(kwargs.get(k, getattr(model.config, k, False)) for k in ("output_hidden_states", "output_attentions"))
    model.model.layers[-1].columns = n if isinstance(n, int) and n > 0 and not wanted else None


def _release_columns(model: nn.Module, args: tuple, kwargs: dict, output) -> None:
    model.model.layers[-1].columns = None


def _pass_columns(block: LastColumnsBlock, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    return args, {**kwargs, "last_columns": block.columns}


AttentionInterface.register(GQA_ATTENTION, grouped_sdpa)
AttentionMaskInterface.register(GQA_ATTENTION, sdpa_mask)
