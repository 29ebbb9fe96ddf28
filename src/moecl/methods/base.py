"""The seams of the training template where a continual-learning method plugs in.

The template (``moecl.training.trainer``) calls, for every task ``t`` of the stream:
``before_task`` -> per batch ``loss`` -> ``after_task``; it trains exactly
``trainable_parameters``, and checkpoints through ``save``/``load``. A method changes what it
must and inherits the rest.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel

from moecl.training.config import RunConfig


class Method:
    """Base class: plain fine-tuning of whatever ``wrap`` returns."""

    name = "base"

    def __init__(self, config: RunConfig):
        self.config = config

    def wrap(self, base_model: PreTrainedModel) -> nn.Module:
        """The model to train and evaluate, built around a fresh base model."""
        return base_model

    def before_task(self, model: nn.Module, task_index: int) -> None:
        """Called before training task ``task_index`` (0-based)."""

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad]

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], lm_loss: torch.Tensor) -> torch.Tensor:
        """Training loss of one batch: the answer-token LM loss plus the method's own terms.
        ``model`` is unwrapped (no DDP) and has just run the batch's forward."""
        return lm_loss

    def after_task(self, model: nn.Module, task_index: int) -> None:
        """Called after training task ``task_index``, before it is evaluated."""

    def save(self, model: nn.Module, directory: Path) -> None:
        raise NotImplementedError(f"method {self.name!r} does not define how to checkpoint itself")

    def load(self, base_model: PreTrainedModel, directory: Path) -> nn.Module:
        raise NotImplementedError(f"method {self.name!r} does not define how to resume itself")

    @torch.no_grad()
    def gate_means(
        self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor | None:
        """Mean routing probability per example over its tokens, ``(batch, experts)``; ``None``
        for methods without a router."""
        return None
