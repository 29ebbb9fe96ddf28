"""MoSEs as a method: task-keyed sub-expert routing, TIL (task id given) or TaIL (inferred)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from moecl.data.batches import Collator
from moecl.data.trace import Example
from moecl.evaluation.generation import prompt_batches
from moecl.io import atomic_write_json
from moecl.methods.base import Method, ReportContext
from moecl.models.moses import MoSEsConfig, MoSEsModel


class MoSEsMethod(Method):
    """Training always routes each example as its own task; evaluation routes by the given task
    (``task_id = "given"``) or by the task inferred from the prompt (``"inferred"``)."""

    name = "moses"

    def wrap(self, base_model: PreTrainedModel) -> MoSEsModel:
        c = self.config
        return MoSEsModel(
            base_model,
            MoSEsConfig(
                rank=c.sub_rank,
                alpha=c.alpha,
                top_k=c.top_k,
                initial_experts=c.initial_experts,
                new_per_task=c.new_per_task,
                dropout=c.lora_dropout,
                target_modules=c.target_modules,
            ),
        )

    def before_task(self, model: MoSEsModel, task_index: int, examples: list[Example], collator: Collator) -> None:
        while model.num_tasks <= task_index:  # idempotent on resume
            model.add_task()
        model.infer_tasks = False

    def trainable_parameters(self, model: MoSEsModel) -> list[torch.nn.Parameter]:
        return model.trainable_parameters()

    def parameter_counts(self, model: MoSEsModel) -> tuple[int, int]:
        return model.parameter_counts()

    def forward_kwargs(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        return {"task_ids": batch["task_ids"]}

    def after_task(
        self,
        model: MoSEsModel,
        task_index: int,
        examples: list[Example],
        collator: Collator,
        replay: Sequence[tuple[int, Example]] = (),
    ) -> None:
        prompts = [e.prompt for e in examples]
        c = self.config
        device = next(model.parameters()).device
        batches = list(prompt_batches(collator.tokenizer, prompts, c.max_prompt_tokens, c.eval_batch_size, device))
        model.learn_task_key(task_index, batches)

    def before_eval(self, model: MoSEsModel, task_index: int) -> None:
        model.infer_tasks = self.config.task_id == "inferred"
        model.given_task = task_index

    def general_model(self, model: MoSEsModel, last_task: int) -> tuple[MoSEsModel, str | None]:
        self.before_eval(model, last_task)
        if self.config.task_id == "inferred":
            return model, "the task inferred from each prompt (TaIL)"
        return model, f"the last task's sub-experts (task {last_task + 1}, task id given)"

    def save(self, model: MoSEsModel, directory: Path) -> None:
        model.save_pretrained(directory)

    def load(self, base_model: PreTrainedModel, directory: Path) -> MoSEsModel:
        return MoSEsModel.from_pretrained(base_model, directory)

    def report(self, context: ReportContext, model: MoSEsModel, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
        """Capacity per task, task inference on each test set, and the transfer matrix: score on
        task ``j`` routed as task ``i`` (``transfer[i][j]``), written as JSON and PNG too."""
        tasks = context.tasks
        confusion = [[0] * len(tasks) for _ in tasks]  # [true][inferred], over test prompts
        c, device = self.config, next(model.parameters()).device
        for j, task in enumerate(tasks):
            prompts = [e.prompt for e in task.split(self.config.eval_split)]
            for batch in prompt_batches(tokenizer, prompts, c.max_prompt_tokens, c.eval_batch_size, device):
                for i in model.infer_task_ids(batch["input_ids"], batch["attention_mask"]):
                    confusion[j][int(i)] += 1
        accuracy = [row[j] / max(1, sum(row)) for j, row in enumerate(confusion)]
        transfer = []
        model.infer_tasks = False
        for i in range(len(tasks)):
            model.given_task = i
            transfer.append([context.score(model, task, f"routed-as-{i}") for task in tasks])
        report = {
            "task_id": self.config.task_id,
            "capacity": model.capacity(),
            "task_inference": {"confusion": confusion, "accuracy": accuracy},
            "transfer": transfer,
        }
        if context.main:
            atomic_write_json(context.out / "transfer.json", {"tasks": [t.name for t in tasks], **report})
            plot_transfer(transfer, confusion, [t.name for t in tasks], context.out / "transfer.png")
        return report


def plot_transfer(transfer: list[list[float]], confusion: list[list[int]], names: list[str], path: Path) -> None:
    """Left: score on task j (x) routed as task i (y). Right: share of task j's prompts given key i."""
    import numpy as np

    from moecl.io import atomic_path
    from moecl.reports.plots import plt

    share = np.array(confusion, dtype=float)
    share = (share / share.sum(1, keepdims=True).clip(min=1)).T * 100  # [inferred][true]
    fig, axes = plt.subplots(1, 2, figsize=(8.5, 3.6), dpi=120)
    for ax, matrix, title, ylabel in (
        (axes[0], np.array(transfer), "TIL: score on task, routed as task", "routed as"),
        (axes[1], share, "TaIL: % of task's prompts given key", "inferred task"),
    ):
        ax.imshow(matrix, vmin=0, vmax=100, cmap="viridis")
        for (y, x), value in np.ndenumerate(matrix):
            ax.text(x, y, f"{value:.0f}", ha="center", va="center", fontsize=7, color="w" if value < 60 else "k")
        ax.set_xticks(range(len(names)), [n[:10] for n in names], rotation=60, fontsize=7)
        ax.set_yticks(range(len(names)), [n[:10] for n in names], fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel(ylabel, fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
