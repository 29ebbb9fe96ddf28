"""Where a Hugging Face causal LM keeps its decoder blocks, and which projections to adapt.

A family is keyed by ``config.model_type``. Unknown families still work: the decoder blocks are
found as the ``nn.ModuleList`` whose length is the number of hidden layers, and the user names
the target modules.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers import PreTrainedModel


@dataclass(frozen=True)
class Family:
    """How to reach one model family's decoder blocks.

    Args:
        blocks: dotted path from the causal LM to its ``nn.ModuleList`` of decoder blocks.
        default_targets: projections adapted when the user names none (the paper's q and v).
    """

    blocks: str
    default_targets: tuple[str, ...]


_LLAMA_LIKE = Family("model.layers", ("q_proj", "v_proj"))

FAMILIES: dict[str, Family] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "mixtral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "olmo": _LLAMA_LIKE,
    "olmo2": _LLAMA_LIKE,
    # GPT-2 fuses q, k and v into one Conv1D; adapting it is the closest to "q and v".
    "gpt2": Family("transformer.h", ("c_attn",)),
    "gpt_neox": Family("gpt_neox.layers", ("query_key_value",)),
}


def check_causal_lm(model: nn.Module) -> None:
    """Raise ``ValueError`` unless ``model`` is a decoder-only Hugging Face LM with an LM head."""
    if not isinstance(model, PreTrainedModel):
        raise ValueError(
            f"expected a Hugging Face PreTrainedModel, got {type(model).__name__}; load the base model "
            "with transformers.AutoModelForCausalLM.from_pretrained(...)"
        )
    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError(
            f"{type(model).__name__} is an encoder-decoder model; PMoE needs a decoder-only causal LM "
            "(Llama, Mistral, Qwen2, GPT-2, GPT-NeoX, ...)"
        )
    if model.get_output_embeddings() is None:
        raise ValueError(
            f"{type(model).__name__} has no language-modelling head; load the checkpoint with "
            "transformers.AutoModelForCausalLM rather than AutoModel"
        )


def num_layers(model: PreTrainedModel) -> int:
    config = model.config
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    raise ValueError(f"cannot tell how many decoder blocks {type(model).__name__} has from its config")


def decoder_blocks(model: PreTrainedModel) -> nn.ModuleList:
    """The model's decoder blocks, in order (block ``i`` of the paper is index ``i - 1``)."""
    family = FAMILIES.get(model.config.model_type)
    if family is not None:
        blocks = model.get_submodule(family.blocks)
        if isinstance(blocks, nn.ModuleList):
            return blocks
    n = num_layers(model)
    candidates = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if len(candidates) != 1:
        raise ValueError(
            f"cannot locate the decoder blocks of model_type {model.config.model_type!r}: "
            f"found {len(candidates)} ModuleLists of length {n}; supported families: "
            f"{', '.join(sorted(FAMILIES))}"
        )
    return candidates[0]


def default_target_modules(model: PreTrainedModel) -> tuple[str, ...]:
    family = FAMILIES.get(model.config.model_type)
    if family is None:
        raise ValueError(
            f"no default target modules for model_type {model.config.model_type!r}; pass "
            "PMoEConfig(target_modules=[...]) naming the attention projections to adapt"
        )
    return family.default_targets


def hidden_size(model: PreTrainedModel) -> int:
    config = model.config
    for key in ("hidden_size", "n_embd", "d_model"):
        if isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    raise ValueError(f"cannot read the hidden size of {type(model).__name__} from its config")
