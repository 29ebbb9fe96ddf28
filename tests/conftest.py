"""Tiny random-weight causal LMs of every supported family, built from a config (no downloads)."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 96
FAMILIES = ["llama", "mistral", "qwen2", "gpt2", "gpt_neox"]


def build_tiny(family: str, layers: int = 4, dtype: torch.dtype = torch.float32, seed: int = 0):
    """A 4-block, hidden-32 causal LM of ``family`` with random weights, in eval mode."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    llama_like = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        **common,
    )
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**llama_like))
    elif family == "mistral":
        model = MistralForCausalLM(MistralConfig(**llama_like))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**llama_like))
    elif family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=layers, n_head=4, n_positions=128, **common))
    elif family == "gpt_neox":
        model = GPTNeoXForCausalLM(
            GPTNeoXConfig(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=layers,
                num_attention_heads=4,
                max_position_embeddings=128,
                **common,
            )
        )
    else:
        raise KeyError(family)
    return model.to(dtype).eval()


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


def random_tokens(batch: int, seq: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, seq), generator=g)


def perturb_adapters(pmoe, scale: float = 0.5, seed: int = 2) -> None:
    """Give every adapter tensor (B included, which starts at zero) random values, so tests
    compare models whose adapters actually change the output."""
    from moecl.adapters.state import adapter_state_dict

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in adapter_state_dict(pmoe).values():
            tensor.copy_(torch.randn(tensor.shape, generator=g, dtype=torch.float64).to(tensor.dtype) * scale)


TINY_RUN = dict(
    model="tiny-random",
    benchmark="smoke",
    tasks=["sentiment", "parity", "addition"],
    train_size=8,
    test_size=6,
    epochs=1,
    batch_size=4,
    micro_batch_size=4,
    lr=1e-2,
    max_prompt_tokens=64,
    max_answer_tokens=8,
    eval_batch_size=8,
)


def tiny_run(tmp_path, monkeypatch, name: str, **options):
    """A whole `moecl run` in-process on tiny-random over 3 smoke tasks; ``(results, run folder)``."""
    from moecl.config import RunConfig
    from moecl.training import run as run_module

    monkeypatch.setenv("MOECL_CACHE", str(tmp_path / "cache"))
    out = tmp_path / name
    return run_module.run(RunConfig(**{**TINY_RUN, **options}), out), out
