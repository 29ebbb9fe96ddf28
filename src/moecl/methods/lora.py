"""The LoRA baselines of PMoE's Table 1 (arXiv 2407.21571), built from PMoE's own adapters (no second LoRA code).

Each is a :class:`~moecl.models.pmoe.PMoEModel` with another split and a fixed gate:

=================  =====================  ==================  ==================================
method             blocks with a bank     gate                what trains on task ``t``
=================  =====================  ==================  ==================================
``seq-lora``       none (tau = N)         --                  the one LoRA on every block
``o-lora``         all (tau = 0)          sum: every expert 1  LoRA ``t``, + orthogonality loss
``per-task-lora``  all (tau = 0)          one-hot task id     LoRA ``t``; task id at inference
``mtl``            none (tau = N)         --                  the one LoRA, on all tasks at once
=================  =====================  ==================  ==================================
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from moecl.adapters.expert_bank import LoRAExpertBank
from moecl.data.batches import Collator
from moecl.data.trace import Example
from moecl.methods.pmoe import PMoEMethod
from moecl.models.pmoe import PMoEModel
from moecl.models.pmoe_config import PMoEConfig


class _FixedGateMethod(PMoEMethod):
    """PMoE's adapters without its router: no router loss, no gate to report."""

    tau: int | str = 0
    gate = "sum"

    def adapter_config(self) -> PMoEConfig:
        return replace(super().adapter_config(), tau=self.tau)

    def loss(self, model: PMoEModel, batch: dict[str, torch.Tensor], lm_loss: torch.Tensor) -> torch.Tensor:
        return lm_loss


class SeqLoRAMethod(_FixedGateMethod):
    """One LoRA on the target projections of every block, trained on each task in turn."""

    name = "seq-lora"
    tau = "all"

    def before_task(self, model: PMoEModel, task_index: int, examples: list[Example], collator: Collator) -> None:
        """The one adapter exists from ``wrap`` on and keeps training."""


class MTLMethod(SeqLoRAMethod):
    """Multi-task learning: the same single LoRA trained once on all tasks mixed (upper bound)."""

    name = "mtl"
    joint = True


class OLoRAMethod(_FixedGateMethod):
    """O-LoRA (Wang et al., 2023): a new LoRA per task in every block, earlier ones frozen, all
    summed at inference (no task id). The new ``A_t`` is pushed orthogonal to every earlier
    ``A_i``: ``lambda_orth * sum_i sum |A_i A_t^T|`` (as the official code, absolute entries),
    plus ``lambda_l2 * ||(A_t, B_t)||^2``."""

    name = "o-lora"

    def loss(self, model: PMoEModel, batch: dict[str, torch.Tensor], lm_loss: torch.Tensor) -> torch.Tensor:
        c = self.config
        orth, l2 = olora_penalties(model)
        return lm_loss + c.lambda_orth * orth + c.lambda_l2 * l2


def olora_penalties(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum over banks of sum |A_frozen A_new^T|, sum over banks of ||A_new||^2 + ||B_new||^2)``.

    ``A_frozen (k*r, in)`` stacks every earlier task's ``A`` (a bank's buffer), so one matmul
    gives all ``A_i A_t^T`` blocks at once: ``(k*r, r)``.
    """
    orth = l2 = None
    for bank in model.modules():
        if not isinstance(bank, LoRAExpertBank) or bank.expert_A is None:
            continue
        o = (bank.frozen_A @ bank.expert_A.T).abs().sum()
        n = bank.expert_A.pow(2).sum() + bank.expert_B.pow(2).sum()
        orth, l2 = (o, n) if orth is None else (orth + o, l2 + n)
    if orth is None:
        raise ValueError("o-lora found no LoRA expert banks in the model; was it wrapped by OLoRAMethod?")
    return orth, l2


class PerTaskLoRAMethod(_FixedGateMethod):
    """One LoRA per task, chosen by the task id at inference: the task-incremental upper bound
    (an oracle, since the other methods get no task id)."""

    name = "per-task-lora"
    gate = "task"

    def before_task(self, model: PMoEModel, task_index: int, examples: list[Example], collator: Collator) -> None:
        super().before_task(model, task_index, examples, collator)
        model.active_task = task_index

    def before_eval(self, model: PMoEModel, task_index: int) -> None:
        model.active_task = task_index

    def general_model(self, model: PMoEModel, last_task: int) -> tuple[PMoEModel, str | None]:
        self.before_eval(model, last_task)
        return model, f"the last task's LoRA (task {last_task + 1}, task id given)"
