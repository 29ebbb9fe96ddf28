"""PMoE experts out as standard PEFT LoRA adapters, or merged into a plain transformers model.

Serving stacks (vLLM, PEFT, TGI) load LoRA adapters, not routed mixtures. Two exports are exact:

- **one expert** ``k``: the shallow LoRA in blocks ``1..tau`` and expert ``k`` in the deep blocks,
  one rank-``r`` LoRA everywhere: PMoE with the gate fixed one-hot on ``k``;
- **a fixed gate** ``g`` (e.g. a task's mean allocation): in the deep blocks
  ``sum_k g_k B_k A_k = (B_cat * expand_r(g)) A_cat``, one LoRA of rank ``T*r`` (the gate folded
  into ``B``); PEFT's ``rank_pattern`` / ``alpha_pattern`` give those modules rank ``T*r`` and alpha
  ``T*alpha``, so their scale ``alpha / r`` is unchanged.

Either can be merged (``W + (alpha/r) B A``) into the base weights and saved with
``save_pretrained`` as an ordinary model folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from moecl.adapters.expert_bank import LoRAExpertBank
from moecl.adapters.lora import LoRALinear
from moecl.models.pmoe import PMoEModel


def lora_factors(model: PMoEModel, gate: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Per adapted projection (its module path in the base model), ``(A (r', in), B (out, r'),
    scale)`` of the single LoRA equal to ``model`` under the fixed ``gate (num_experts,)``.

    Shallow projections give their shared LoRA as it is; deep ones the gate-weighted stack of
    experts, with only the experts of non-zero gate kept (one expert -> rank ``r``).
    """
    if gate.shape != (model.num_experts,):
        raise ValueError(f"the gate has shape {tuple(gate.shape)}; this model has {model.num_experts} experts")
    keep = torch.nonzero(gate).flatten()
    factors = {}
    for name, module in model.base_model.named_modules():
        if isinstance(module, LoRALinear):
            factors[name] = (module.lora_A.detach(), module.lora_B.detach(), module.scaling)
        elif isinstance(module, LoRAExpertBank):
            a_cat, b_cat = (t.detach() for t in module.stacked_weights())
            r = module.rank
            rows = torch.cat([torch.arange(k * r, (k + 1) * r) for k in keep.tolist()])
            scale = gate[keep].repeat_interleave(r).to(b_cat.dtype)  # g_k on each of expert k's r channels
            factors[name] = (a_cat[rows], b_cat[:, rows] * scale, module.scaling)
    return factors


def _check_linear(model: PMoEModel) -> None:
    for name, module in model.base_model.named_modules():
        if isinstance(module, (LoRALinear, LoRAExpertBank)) and not isinstance(module.base_layer, nn.Linear):
            raise ValueError(
                f"{name} wraps a {type(module.base_layer).__name__}, which PEFT stores transposed; export this "
                "model with --merged instead"
            )


def export_peft(model: PMoEModel, gate: torch.Tensor, out: Path, base_name: str = "") -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` in PEFT's LoRA format, loadable
    with ``peft.PeftModel.from_pretrained(base_model, out)`` onto the same base model."""
    _check_linear(model)
    factors = lora_factors(model, gate)
    rank, alpha = model.adapter_config.rank, model.adapter_config.alpha
    tensors, rank_pattern, alpha_pattern = {}, {}, {}
    for name, (a, b, _scale) in factors.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.contiguous().cpu()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.contiguous().cpu()
        if a.shape[0] != rank:  # a deep stack of several experts: same alpha / r as one expert
            rank_pattern[f"^{name}$"] = a.shape[0]
            alpha_pattern[f"^{name}$"] = alpha * a.shape[0] / rank
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "target_modules": sorted(factors),  # exact module paths: only the adapted projections
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "inference_mode": True,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=1))
    return out


@torch.no_grad()
def merge_into_base(model: PMoEModel, gate: torch.Tensor) -> nn.Module:
    """The base model with ``model``'s LoRA under ``gate`` added to its weights (the adapters
    removed): an ordinary transformers model to ``save_pretrained``."""
    factors = lora_factors(model, gate)
    base = model.base_model
    for name, (a, b, scale) in factors.items():
        parent_name, _, leaf = name.rpartition(".")
        parent = base.get_submodule(parent_name)
        adapter = getattr(parent, leaf)
        layer = adapter.base_layer
        delta = (b.float() @ a.float()) * scale  # (out, in)
        if not isinstance(layer, nn.Linear):  # transformers' Conv1D keeps (in, out)
            delta = delta.T
        layer.weight.add_(delta.to(layer.weight.dtype))
        setattr(parent, leaf, layer)
    return base


def parse_gate(text: str, num_experts: int) -> torch.Tensor:
    """``--gate 0.2,0.5,0.3`` -> a gate over the experts (must sum to 1, as the router's does)."""
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError as err:
        raise ValueError(f"--gate {text!r}: give {num_experts} comma-separated numbers") from err
    if len(values) != num_experts or any(v < 0 for v in values) or abs(sum(values) - 1) > 1e-3:
        raise ValueError(f"--gate {text!r}: give {num_experts} non-negative numbers that sum to 1")
    return torch.tensor(values)
