"""The last block of a Llama causal LM computing only the positions its caller keeps.

A caller that asks for the logits of the last ``n`` positions only (``logits_to_keep = n``:
training's answer loss, generation's prefill) needs the last block's output there alone, since
no later block reads the others. :class:`LastColumnsBlock` computes keys and values for every
position (the attention, and the KV cache, need them) and its queries, attention output, MLP and
norms for those ``n`` positions only: on SmolLM2-135M the products of 3.3M of the model's 106M
weights run on the answer's few positions instead of all.

It mirrors transformers' ``LlamaDecoderLayer.forward`` and ``LlamaAttention.forward``, so it is
used only up to the newest transformers it is tested against (:data:`TESTED_TRANSFORMERS`) and
only where the block takes the cache as ``cache`` (5.25 does; 5.0 still calls it
``past_key_values`` and keeps its own block, checked in a venv at 5.0.0); elsewhere the block
stays transformers' own.
"""

from __future__ import annotations

import importlib
import inspect

import torch
import transformers
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from moecl.adapters.router import computing_last_positions
from moecl.backends import Applied

TESTED_TRANSFORMERS = ((5, 0), (5, 25))
"""The transformers versions (major, minor; both ends included) the piece may run with; within
them :func:`convert` also requires the block's ``cache`` argument (the code it mirrors)."""


def transformers_tested(version: str | None = None) -> bool:
    """Whether ``version`` (default: the installed transformers) lies in :data:`TESTED_TRANSFORMERS`."""
    parts = (version or transformers.__version__).split(".")
    major_minor = (int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0))
    low, high = TESTED_TRANSFORMERS
    return low <= major_minor <= high


LAST_BLOCK_ATTENTION = ("sdpa",)
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

    :func:`convert` sets :attr:`columns` from each call of the model's integer
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
            # Llama's function rotates a query and a key of one length: each goes in twice; the
            # spare results cost one more rotation of this block's keys
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


def convert(model: nn.Module) -> Applied:
    """Make the last block of a Llama causal LM (the model itself or the one an adapter model
    wraps) a :class:`LastColumnsBlock` (in place: the same module, parameters and state dict)
    computing each call's integer ``logits_to_keep`` positions. Other families, and transformers
    versions outside :data:`TESTED_TRANSFORMERS`, keep theirs. Undone by restoring the class
    and removing the hooks."""
    hf = model if isinstance(model, PreTrainedModel) else getattr(model, "base_model", None)
    layers = getattr(getattr(hf, "model", None), "layers", None)
    if not isinstance(hf, PreTrainedModel) or not layers or type(layers[-1]) is not LlamaDecoderLayer:
        return Applied("cpu")
    if not transformers_tested() or "cache" not in inspect.signature(LlamaDecoderLayer.forward).parameters:
        return Applied("cpu")
    block = layers[-1]
    block.__class__ = LastColumnsBlock
    handles = [
        block.register_forward_pre_hook(_pass_columns, with_kwargs=True),
        hf.register_forward_pre_hook(_keep_columns, with_kwargs=True),
        hf.register_forward_hook(_release_columns, with_kwargs=True, always_call=True),
    ]

    def undo() -> None:
        for handle in handles:
            handle.remove()
        block.__class__ = LlamaDecoderLayer
        block.__dict__.pop("columns", None)

    return Applied("cpu", {"last_block": 1}, [undo])


def _keep_columns(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """Before a call of the causal LM: its last block computes ``logits_to_keep`` positions."""
    n = kwargs.get("logits_to_keep")
    wanted = any(kwargs.get(k, getattr(model.config, k, False)) for k in ("output_hidden_states", "output_attentions"))
    model.model.layers[-1].columns = n if isinstance(n, int) and n > 0 and not wanted else None


def _release_columns(model: nn.Module, args: tuple, kwargs: dict, output) -> None:
    model.model.layers[-1].columns = None


def _pass_columns(block: LastColumnsBlock, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    return args, {**kwargs, "last_columns": block.columns}
