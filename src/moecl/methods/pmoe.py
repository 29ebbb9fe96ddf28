"""PMoE (SPEC §1) as a method: a new expert per task, optional router loss (Eq. 7)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedModel

from moecl.methods.base import Method
from moecl.models.pmoe import PMoEModel
from moecl.models.pmoe_config import PMoEConfig


class PMoEMethod(Method):
    name = "pmoe"

    def adapter_config(self) -> PMoEConfig:
        """The adapters this method puts on the base model (subclasses change tau and the gate)."""
        c = self.config
        return PMoEConfig(
            tau=c.tau,
            rank=c.rank,
            alpha=c.alpha,
            dropout=c.lora_dropout,
            target_modules=c.target_modules,
            router_norm=c.router_norm,
        )

    def wrap(self, base_model: PreTrainedModel) -> PMoEModel:
        return PMoEModel(base_model, self.adapter_config())

    def before_task(self, model: PMoEModel, task_index: int) -> None:
        while model.num_experts <= task_index:  # one expert per task; idempotent on resume
            model.add_task()

    def trainable_parameters(self, model: PMoEModel) -> list[torch.nn.Parameter]:
        return model.trainable_parameters()

    def parameter_counts(self, model: PMoEModel) -> tuple[int, int]:
        return model.parameter_counts()

    def loss(self, model: PMoEModel, batch: dict[str, torch.Tensor], lm_loss: torch.Tensor) -> torch.Tensor:
        loss = lm_loss
        if self.config.lambda_route > 0:
            loss = loss + self.config.lambda_route * router_loss(
                model.gate.probs, batch["task_ids"], batch["attention_mask"]
            )
        return loss

    def save(self, model: PMoEModel, directory: Path) -> None:
        model.save_pretrained(directory)

    def load(self, base_model: PreTrainedModel, directory: Path) -> PMoEModel:
        return PMoEModel.from_pretrained(base_model, directory)

    @torch.no_grad()
    def gate_means(self, model: PMoEModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        probs = model.router_probs(input_ids, attention_mask)  # (batch, seq, experts)
        mask = attention_mask[..., None].to(probs.dtype)
        return (probs * mask).sum(1) / mask.sum(1)


def router_loss(probs: torch.Tensor, task_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Eq. 7: ``-log G_k(x)`` for each example's task ``k``, averaged over its tokens, then the batch.

    Args:
        probs: router output ``(batch, seq, experts)``.
        task_ids: ``(batch,)``, the expert each example should go to.
        attention_mask: ``(batch, seq)``; padding does not count.
    """
    idx = task_ids[:, None, None].expand(-1, probs.shape[1], 1)
    nll = -torch.log(probs.gather(-1, idx).squeeze(-1).clamp_min(1e-9))  # (batch, seq)
    mask = attention_mask.to(nll.dtype)
    return ((nll * mask).sum(1) / mask.sum(1)).mean()
