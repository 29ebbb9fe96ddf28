"""PMoE (*Progressive Mixture of Experts with Asymmetric Transformer*, arXiv 2407.21571) as a
method: a new expert per task, optional router loss (Eq. 7) and routing distillation on the
replay memory (after SAPT)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from moecl.data.batches import Collator
from moecl.data.trace import Example
from moecl.io import atomic_write_json
from moecl.methods.base import Method
from moecl.models.pmoe import PMoEModel
from moecl.models.pmoe_config import PMoEConfig

PROBE_EXAMPLES = 32
"""Training examples of a new task whose gate decides copy/share growth (one forward pass)."""
TARGET_EXAMPLES = 64
"""Training examples of a finished task whose mean gate becomes its distillation target."""
REFIT_EXAMPLES = 32
"""Training examples of a finished task that join the replay memory in the router's refit."""
REFIT_LR = 1e-2
"""Adam's learning rate in the router's refit (full batch; columns act on RMS-normalised h_tau)."""
ROUTE_TARGETS = "route_targets.json"


class PMoEMethod(Method):
    name = "pmoe"
    gate = "router"

    def __init__(self, config) -> None:
        super().__init__(config)
        self.route_targets: list[list[float]] = []
        """Row ``k``: task ``k``'s mean gate over the experts that existed when it finished."""

    def adapter_config(self) -> PMoEConfig:
        """The adapters this method puts on the base model (subclasses change tau and the gate)."""
        c = self.config
        growth = (
            dict(
                expert_init=c.expert_init,
                router_init=c.router_init,
                router_share=c.router_share,
                freeze_router=c.freeze_router,
                router_align=c.router_align,
                router_detach=c.router_detach,
            )
            if self.gate == "router"
            else {}
        )
        return PMoEConfig(
            tau=c.tau,
            rank=c.rank,
            alpha=c.alpha,
            dropout=c.lora_dropout,
            target_modules=c.target_modules,
            router_norm=c.router_norm,
            gate=self.gate,
            **growth,
        )

    def wrap(self, base_model: PreTrainedModel) -> PMoEModel:
        return PMoEModel(base_model, self.adapter_config())

    def before_task(self, model: PMoEModel, task_index: int, examples: list[Example], collator: Collator) -> None:
        probe = None
        if examples and model.router is not None:
            device = next(model.parameters()).device
            batch = collator([(task_index, e) for e in examples[:PROBE_EXAMPLES]])
            probe = {k: batch[k].to(device) for k in ("input_ids", "attention_mask")}
        while model.num_experts <= task_index:  # one expert per task; idempotent on resume
            model.add_task(probe)

    def after_task(
        self,
        model: PMoEModel,
        task_index: int,
        examples: list[Example],
        collator: Collator,
        replay: Sequence[tuple[int, Example]] = (),
    ) -> None:
        model.end_task()
        if self.config.router_refit_steps > 0 and model.router is not None and model.num_experts > 1:
            mine = [(task_index, e) for e in examples[:REFIT_EXAMPLES]]
            refit_router(
                model, collator, mine + list(replay), self.config.micro_batch_size, self.config.router_refit_steps
            )
        if self.config.lambda_route_distill > 0 and model.router is not None:
            del self.route_targets[task_index:]
            target = mean_gates(model, collator, task_index, examples[:TARGET_EXAMPLES], self.config.micro_batch_size)
            self.route_targets.append([float(x) for x in target.mean(0)])

    def trainable_parameters(self, model: PMoEModel) -> list[torch.nn.Parameter]:
        return model.trainable_parameters()

    def parameter_groups(self, model: PMoEModel) -> list[dict[str, Any]]:
        """The router on its own learning rate when ``router_lr`` is set (its gradients are small
        next to the adapters'); everything else on ``lr``."""
        if self.config.router_lr is None or model.router is None:
            return super().parameter_groups(model)
        router = {id(p) for p in model.router.parameters()}
        params = self.trainable_parameters(model)
        return [
            {"params": [p for p in params if id(p) not in router]},
            {"params": [p for p in params if id(p) in router], "lr": self.config.router_lr},
        ]

    def parameter_counts(self, model: PMoEModel) -> tuple[int, int]:
        return model.parameter_counts()

    def loss(self, model: PMoEModel, batch: dict[str, torch.Tensor], lm_loss: torch.Tensor) -> torch.Tensor:
        loss = lm_loss
        c = self.config
        if c.lambda_route > 0:
            loss = loss + c.lambda_route * router_loss(
                model.gate.probs, batch["task_ids"], batch["attention_mask"], balance=c.route_balance
            )
        if c.lambda_route_distill > 0 and self.route_targets:
            targets = padded_targets(self.route_targets, model.num_experts, model.gate.probs)
            loss = loss + c.lambda_route_distill * route_distill_loss(
                model.gate.probs, batch["task_ids"], batch["attention_mask"], targets
            )
        return loss

    @torch.no_grad()
    def step_log(self, model: PMoEModel, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """The newest expert's mean gate on this batch's tokens, over all of them and over the
        current task's (without the replayed examples)."""
        if model.router is None or model.gate.probs is None:
            return {}
        newest = model.gate.probs[..., -1]  # (batch, seq)
        mask = batch["attention_mask"].to(newest.dtype)
        own = (batch["task_ids"] == model.num_experts - 1).to(mask.dtype)[:, None] * mask
        record = {"gate_newest": round(float((newest * mask).sum() / mask.sum()), 4)}
        if own.sum() > 0:
            record["gate_newest_own"] = round(float((newest * own).sum() / own.sum()), 4)
        return record

    def save(self, model: PMoEModel, directory: Path) -> None:
        model.save_pretrained(directory)
        if self.route_targets:
            atomic_write_json(directory / ROUTE_TARGETS, self.route_targets)

    def load(self, base_model: PreTrainedModel, directory: Path) -> PMoEModel:
        path = directory / ROUTE_TARGETS
        self.route_targets = json.loads(path.read_text()) if path.is_file() else []
        return PMoEModel.from_pretrained(base_model, directory)

    def recording_gates(self, model: PMoEModel):
        return model.recording_gates() if model.router is not None else contextlib.nullcontext()


@torch.no_grad()
def mean_gates(
    model: PMoEModel, collator: Collator, task_index: int, examples: list[Example], batch_size: int
) -> torch.Tensor:
    """Each example's gate averaged over its tokens, ``(examples, experts)`` in ``examples``' order.

    The examples go through the router in batches of ``batch_size`` neighbours in length, so
    that a batch pads to its own longest example rather than to the longest of all: on
    multiemo's 64 target examples that computes about half the tokens of one padded batch."""
    device = next(model.parameters()).device
    order, batches = length_batches(collator, [(task_index, e) for e in examples], batch_size)
    parts = []
    for batch in batches:
        mask = batch["attention_mask"].to(device)
        parts.append(masked_token_mean(model.router_probs(batch["input_ids"].to(device), mask), mask))
    return torch.cat(parts)[torch.tensor(order, device=device).argsort()]  # back to examples' order


def length_batches(
    collator: Collator, items: list[tuple[int, Example]], batch_size: int
) -> tuple[list[int], Iterator[dict[str, torch.Tensor]]]:
    """``items`` sorted by token length and collated ``batch_size`` at a time: the order (indices
    into ``items``) and the batches, made lazily. A batch of neighbours in length pads to its own
    longest example rather than to the longest of all."""
    order = sorted(range(len(items)), key=lambda i: collator.length(items[i][1]))
    batches = (collator([items[i] for i in order[s : s + batch_size]]) for s in range(0, len(order), batch_size))
    return order, batches


def masked_token_mean(probs: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``probs (batch, seq, experts)`` averaged over each example's real tokens -> ``(batch, experts)``."""
    mask = attention_mask[..., None].to(probs.dtype)
    return (probs * mask).sum(1) / mask.sum(1)


def router_loss(
    probs: torch.Tensor, task_ids: torch.Tensor, attention_mask: torch.Tensor, balance: bool = False
) -> torch.Tensor:
    """Eq. 7: ``-log G_k(x)`` for each example's task ``k``, averaged over its tokens, then the batch.

    Args:
        probs: router output ``(batch, seq, experts)``.
        task_ids: ``(batch,)``, the expert each example should go to.
        attention_mask: ``(batch, seq)``; padding does not count.
        balance: average over the examples of each task in the batch first, then over those
            tasks, so that one replayed example weighs as much as the current task's seven.
    """
    idx = task_ids[:, None, None].expand(-1, probs.shape[1], 1)
    nll = -torch.log(probs.gather(-1, idx).squeeze(-1).clamp_min(1e-9))  # (batch, seq)
    mask = attention_mask.to(nll.dtype)
    per_example = (nll * mask).sum(1) / mask.sum(1)  # (batch,)
    if not balance:
        return per_example.mean()
    tasks, which = task_ids.unique(return_inverse=True)
    total = per_example.new_zeros(len(tasks)).index_add(0, which, per_example)
    return (total / torch.bincount(which, minlength=len(tasks)).to(total.dtype)).mean()


@torch.no_grad()
def refit_router(
    model: PMoEModel, collator: Collator, items: list[tuple[int, Example]], batch_size: int, steps: int
) -> None:
    """Fit every router column on the tokens of ``items`` (``(task index, example)``: a sample of
    the task just trained and the replay memory), each task weighing the same whatever its
    number of tokens. Task ``k``'s tokens are labelled expert ``k``.

    The columns trained during the task saw the replay memory in few batches and the old ones
    are frozen, so an old task's inputs, moved by the shallow adapter's training, drift to the
    newest expert; this pass puts them back on the router's current ``h_tau``."""
    device = next(model.parameters()).device
    hidden, labels = [], []
    for batch in length_batches(collator, items, batch_size)[1]:
        mask = batch["attention_mask"].to(device).bool()
        h = model.hidden_tau(batch["input_ids"].to(device), batch["attention_mask"].to(device))
        hidden.append(h[mask].float())  # (tokens, hidden)
        labels.append(batch["task_ids"].to(device)[:, None].expand_as(mask)[mask])
    x, y = torch.cat(hidden), torch.cat(labels)
    counts = torch.bincount(y, minlength=model.num_experts).to(x.dtype)
    weights = 1.0 / counts[y] / int((counts > 0).sum())  # every present task sums to the same share
    model.router.refit(x, y, weights, steps, REFIT_LR)


def padded_targets(rows: list[list[float]], num_experts: int, like: torch.Tensor) -> torch.Tensor:
    """Stored per-task gates ``(tasks, experts then)`` padded with zeros to ``(tasks, num_experts)``:
    an old task's target puts no mass on the experts added after it."""
    out = torch.zeros(len(rows), num_experts, dtype=like.dtype, device=like.device)
    for k, row in enumerate(rows):
        out[k, : len(row)] = torch.tensor(row, dtype=like.dtype)
    return out


def route_distill_loss(
    probs: torch.Tensor, task_ids: torch.Tensor, attention_mask: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """Routing distillation (after SAPT): ``KL(target_k || mean gate of x)`` for every example ``x``
    of an old task ``k`` in the batch (the replayed ones), averaged over them; 0 without any.

    Args:
        probs: router output ``(batch, seq, experts)``.
        task_ids: ``(batch,)``; rows with ``task_id < len(targets)`` are distilled.
        attention_mask: ``(batch, seq)``; the example's gate is its mean over real tokens.
        targets: ``(tasks, experts)``, task ``k``'s stored mean gate (zero on newer experts).
    """
    old = task_ids < targets.shape[0]
    if not bool(old.any()):
        return probs.sum() * 0.0  # keeps the graph (and the loss's device and dtype)
    q = masked_token_mean(probs[old], attention_mask[old])  # (n_old, experts)
    p = targets[task_ids[old]]
    kl = torch.xlogy(p, p) - p * torch.log(q.clamp_min(1e-9))
    return kl.sum(-1).mean()
