"""MoSEs (mixtures of sub-experts, arXiv 2511.06237): a pool of LoRA sub-experts on every target
projection, token-level top-k routing keyed by the task, growth within a budget; task id given
(TIL) or inferred (TaIL).

Our reading of the MoSEs paper; see the README. Forward pass::

    task ids of the batch (given, or inferred from the prompt) -> self.routing
    every block: q/v = base(x) + LoRAExpertBank(x, gate = TopKRouter(x, task))   # k of the pool
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel

from moecl.adapters.expert_bank import LoRAExpertBank
from moecl.adapters.lora import linear_features
from moecl.adapters.subexperts import TaskPrototypes, TaskRouting, TopKRouter
from moecl.models.adapter_model import AdapterModel
from moecl.models.architectures import hidden_size


@dataclass
class MoSEsConfig:
    """Hyper-parameters of a mixture of LoRA sub-experts.

    Args:
        rank: rank of each sub-expert (small: the paper's sub-experts are fine-grained).
        alpha: each sub-expert's delta is scaled by ``alpha / rank`` (then by its gate).
        top_k: sub-experts per token.
        initial_experts: sub-experts the first task opens in every pool.
        new_per_task: sub-experts each later task opens (its budget); with ``new_per_task <
            initial_experts`` capacity grows sub-linearly, later tasks reusing frozen ones.
        key_block: the block (a fraction of them) whose output, pooled over the prompt with the
            adapters off, keys task inference.
        dropout: dropout on the sub-experts' input.
        target_modules: projections to adapt (``None``: the family's q and v, i.e. attention).
    """

    rank: int = 2
    alpha: float = 8.0
    top_k: int = 2
    initial_experts: int = 4
    new_per_task: int = 2
    key_block: float = 0.5
    dropout: float = 0.0
    target_modules: list[str] | None = field(default=None)

    def __post_init__(self) -> None:
        if self.rank < 1 or self.top_k < 1 or self.new_per_task < 0:
            raise ValueError("rank and top_k must be at least 1, new_per_task at least 0")
        if self.initial_experts < self.top_k:
            raise ValueError(
                f"initial_experts={self.initial_experts} < top_k={self.top_k}: the first task could not route"
            )
        if not 0.0 < self.key_block <= 1.0:
            raise ValueError(f"key_block is a fraction of the blocks in (0, 1], got {self.key_block}")

    def experts_after(self, task_index: int) -> int:
        """Pool size once task ``task_index`` (0-based) has opened its sub-experts."""
        return self.initial_experts + self.new_per_task * task_index

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Stop(Exception):
    def __init__(self, hidden: torch.Tensor):
        self.hidden = hidden


class MoSEsModel(AdapterModel):
    """A causal LM with MoSEs adapters. Call :meth:`add_task` before training each task.

    Routing needs a task per example: ``given_task`` (TIL: every example routed as that task),
    ``task_ids=`` to :meth:`forward` (training: each example's own task), or, with
    ``infer_tasks = True``, the nearest task key to the prompt (TaIL, in :meth:`generate`).
    """

    FORMAT = "moecl.moses"
    CONFIG = MoSEsConfig
    CONFIG_KEY = "moses"

    def __init__(self, base_model: PreTrainedModel, config: MoSEsConfig | None = None):
        self.adapter_config = config or MoSEsConfig()
        super().__init__(base_model, self.adapter_config.target_modules)
        cfg = self.adapter_config
        self.routing = TaskRouting()
        self.given_task: int | None = None
        self.infer_tasks = False
        device = base_model.get_input_embeddings().weight.device
        self.prototypes = TaskPrototypes(hidden_size(base_model), device)
        self.key_block = max(1, round(cfg.key_block * self.num_blocks))
        self.wrap_targets(
            lambda index, layer: LoRAExpertBank(
                layer,
                cfg.rank,
                cfg.alpha,
                TopKRouter(linear_features(layer)[0], cfg.top_k, self.routing, device),
                cfg.dropout,
            )
        )

    def banks(self) -> list[LoRAExpertBank]:
        return [m for m in self.base_model.modules() if isinstance(m, LoRAExpertBank)]

    @property
    def num_tasks(self) -> int:
        return self.prototypes.keys.shape[0]

    def add_task(self) -> int:
        """Open task ``t``'s sub-experts (its budget) and routing row in every pool; freeze task
        ``t-1``'s. Returns ``t``."""
        count = self.adapter_config.initial_experts if self.num_tasks == 0 else self.adapter_config.new_per_task
        for bank in self.banks():
            bank.add_expert(count)
            bank.gate.add_task(count)
        self.prototypes.add_task()
        return self.num_tasks - 1

    def capacity(self) -> list[int]:
        """Adapter elements held after each task: sub-experts (A, B, routing key), the task's
        bias rows, its prototype key (the paper's "model capacity" curve)."""
        sizes = []
        for t in range(self.num_tasks):
            pool = self.adapter_config.experts_after(t)
            rows = sum(self.adapter_config.experts_after(s) for s in range(t + 1))
            per_bank = [
                pool * (self.adapter_config.rank * (b.in_features + b.out_features) + b.in_features) + rows
                for b in self.banks()
            ]
            sizes.append(sum(per_bank) + (t + 1) * self.prototypes.keys.shape[1])
        return sizes

    # -- routing -------------------------------------------------------------------------------

    @torch.no_grad()
    def pooled_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Mean over the prompt's tokens of block ``key_block``'s output with the adapters off,
        ``(batch, hidden)``; the blocks after it are not run."""

        def stop(module, args, output):
            raise _Stop(output[0] if isinstance(output, tuple) else output)

        handle = self.blocks[self.key_block - 1].register_forward_hook(stop)
        self.routing.bypass = True
        try:
            super().forward(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            raise RuntimeError("the key block did not run")
        except _Stop as caught:
            hidden = caught.hidden
        finally:
            handle.remove()
            self.routing.bypass = False
        mask = attention_mask[..., None].to(hidden.dtype)
        return ((hidden * mask).sum(1) / mask.sum(1)).float()

    @torch.no_grad()
    def infer_task_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """TaIL: the task whose key is nearest to each prompt, ``(batch,)``."""
        return self.prototypes.nearest(self.pooled_hidden(input_ids, attention_mask))

    def _set_routing(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, task_ids) -> None:
        batch = input_ids.shape[0]
        if task_ids is not None:
            ids = torch.as_tensor(task_ids, device=input_ids.device).reshape(batch)
        elif self.infer_tasks:
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            ids = self.infer_task_ids(input_ids, attention_mask)
        elif self.given_task is not None:
            ids = torch.full((batch,), self.given_task, device=input_ids.device)
        else:
            raise ValueError("MoSEs routes by task: set given_task, set infer_tasks = True, or pass task_ids=")
        if int(ids.max()) >= self.num_tasks:
            raise ValueError(f"task id {int(ids.max())} has no routing: the model has {self.num_tasks} tasks")
        self.routing.task_ids = ids.long()

    def forward(self, input_ids=None, attention_mask=None, task_ids: torch.Tensor | None = None, **kwargs: Any):
        """The base model's forward; ``task_ids (batch,)`` route each example as its task (else
        ``given_task`` or inference). Decoding steps with a cache keep the prompt's routing."""
        if kwargs.get("past_key_values") is None or task_ids is not None:
            self._set_routing(input_ids, attention_mask, task_ids)
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any):
        """Greedy/sampled generation, every example routed as one task for all its tokens: given,
        passed as ``task_ids=``, or inferred from the prompt once."""
        self._set_routing(input_ids, attention_mask, kwargs.pop("task_ids", None))
        return self.base_model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    @torch.no_grad()
    def learn_task_key(self, task_index: int, batches: list[dict[str, torch.Tensor]]) -> None:
        """Set task ``task_index``'s key to the mean pooled hidden state of its training prompts."""
        pooled = [self.pooled_hidden(b["input_ids"], b["attention_mask"]) for b in batches]
        self.prototypes.set(task_index, torch.cat(pooled).mean(0))
