"""Full fine-tuning in sequence (the PMoE paper's Full-ft; with ``--replay`` its Full-ft-RE)."""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedModel

from moecl.methods.base import Method


class SeqFTMethod(Method):
    """Every weight of the model trains on each task in turn (the paper: lr 1e-5, the default here)."""

    name = "seq-ft"

    def wrap(self, base_model: PreTrainedModel) -> PreTrainedModel:
        return base_model.requires_grad_(True)

    def save(self, model: PreTrainedModel, directory: Path) -> None:
        model.save_pretrained(directory)  # safetensors; the run marks the task done only afterwards

    def load(self, base_model: PreTrainedModel, directory: Path) -> PreTrainedModel:
        model = type(base_model).from_pretrained(directory, dtype=base_model.dtype)
        model.generation_config = base_model.generation_config
        return model.requires_grad_(True)
