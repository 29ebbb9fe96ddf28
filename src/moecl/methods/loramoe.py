"""LoRAMoE as a method: a fixed mixture of LoRA experts per projection, trained on every task,
with the localized balancing constraint (arXiv 2312.09979). In a stream the two kinds of data
the constraint separates are the replayed examples of earlier tasks (the paper's world
knowledge) and the current task's, so half of each bank leans to each; with ``--replay 0``
only the second kind exists."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedModel

from moecl.adapters.mixture import localized_balance
from moecl.data.batches import Collator
from moecl.data.trace import Example
from moecl.methods.base import Method
from moecl.models.loramoe import LoRAMoEConfig, LoRAMoEModel


class LoRAMoEMethod(Method):
    """Every expert and router trains on every task (no growth, no task id)."""

    name = "loramoe"

    def __init__(self, config) -> None:
        super().__init__(config)
        self.task_index = 0

    def adapter_config(self) -> LoRAMoEConfig:
        c = self.config
        return LoRAMoEConfig(
            rank=c.rank,
            alpha=c.alpha,
            experts=c.loramoe_experts,
            dropout=c.lora_dropout,
            target_modules=c.target_modules,
        )

    def wrap(self, base_model: PreTrainedModel) -> LoRAMoEModel:
        return LoRAMoEModel(base_model, self.adapter_config())

    def before_task(self, model: LoRAMoEModel, task_index: int, examples: list[Example], collator: Collator) -> None:
        self.task_index = task_index
        while model.num_tasks <= task_index:
            model.add_task()

    def trainable_parameters(self, model: LoRAMoEModel) -> list[torch.nn.Parameter]:
        return model.trainable_parameters()

    def parameter_counts(self, model: LoRAMoEModel) -> tuple[int, int]:
        return model.parameter_counts()

    def loss(self, model: LoRAMoEModel, batch: dict[str, torch.Tensor], lm_loss: torch.Tensor) -> torch.Tensor:
        c = self.config
        if c.lambda_balance == 0:
            return lm_loss
        kinds = (batch["task_ids"] >= self.task_index).long()  # 0: replayed earlier task, 1: current
        terms = []
        for mixture in model.mixtures():
            gate, mixture.last_gate = mixture.last_gate, None
            if gate is not None:
                mask = batch["attention_mask"][:, -gate.shape[1] :]  # a pruned last block sees only the answer
                terms.append(localized_balance(gate, kinds, mask, c.balance_delta))
        return lm_loss + c.lambda_balance * torch.stack(terms).mean() if terms else lm_loss

    def save(self, model: LoRAMoEModel, directory: Path) -> None:
        model.save_pretrained(directory)

    def load(self, base_model: PreTrainedModel, directory: Path) -> LoRAMoEModel:
        return LoRAMoEModel.from_pretrained(base_model, directory)
