"""The seams of the training template where a continual-learning method plugs in.

The template (``moecl.training.run``) calls, for every task ``t`` of the stream:
``before_task`` -> per batch ``loss`` (and per optimizer step ``before_step``) -> ``after_task``; it trains exactly
``trainable_parameters``, and checkpoints through ``save``/``load``. Before scoring task ``i``
it calls ``before_eval`` and lets ``eval_prompts`` rewrite the prompts. A method changes what
it must and inherits the rest; ``joint`` methods see the whole stream in one phase and
``trains = False`` ones are never trained.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from moecl.config import RunConfig
from moecl.data.batches import Collator
from moecl.data.trace import Example, Task


@dataclass
class ReportContext:
    """What a method's :meth:`Method.report` may use of the run, and no more.

    Attributes:
        tasks: the stream, in order.
        score: ``score(model, task, label)``, the model's mean score on the task's scored split
            (generation and metric as every other score of the run; ``label`` names it in progress).
        main: whether this process writes files (one of several under ``accelerate launch``).
        out: the run folder, for the files a method documents as its own (``transfer.json``).
    """

    tasks: list[Task]
    score: Callable[[nn.Module, Task, str], float]
    main: bool
    out: Path


class Method:
    """Base class: plain fine-tuning of whatever ``wrap`` returns."""

    name = "base"
    joint = False
    """Train once on every task's data together (one phase), instead of task after task."""
    trains = True
    """``False``: the template never builds an optimizer or runs a backward pass."""

    def __init__(self, config: RunConfig):
        self.config = config

    def wrap(self, base_model: PreTrainedModel) -> nn.Module:
        """The model to train and evaluate, built around a fresh base model."""
        return base_model

    def before_task(self, model: nn.Module, task_index: int, examples: list[Example], collator: Collator) -> None:
        """Called before training task ``task_index`` (0-based; the single phase 0 if ``joint``) on
        ``examples`` (its own training data, no replay), also when a run resumes at that task."""

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad]

    def parameter_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """The optimizer's parameter groups: one on ``lr`` unless a method sets its own rates."""
        return [{"params": self.trainable_parameters(model)}]

    def parameter_counts(self, model: nn.Module) -> tuple[int, int]:
        """``(trainable, total)`` element counts as reported in ``results.json``."""
        return sum(p.numel() for p in self.trainable_parameters(model)), sum(p.numel() for p in model.parameters())

    def forward_kwargs(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Extra keyword arguments of the model's forward in training (e.g. the task ids)."""
        return {}

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], lm_loss: torch.Tensor) -> torch.Tensor:
        """Training loss of one batch: the answer-token LM loss plus the method's own terms.
        ``model`` is unwrapped (no DDP) and has just run the batch's forward."""
        return lm_loss

    def before_step(self, model: nn.Module) -> None:
        """Called once the gradients of an optimizer step are complete (accumulated and, across
        processes, averaged), just before the step: a method may rewrite them (A-GEM projects)."""

    def step_log(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """The method's own entries of a training step's ``log.jsonl`` line (after ``loss``)."""
        return {}

    def after_task(
        self,
        model: nn.Module,
        task_index: int,
        examples: list[Example],
        collator: Collator,
        replay: Sequence[tuple[int, Example]] = (),
    ) -> None:
        """Called after training task ``task_index`` on ``examples`` (its own training data),
        before it is evaluated; ``replay`` is the replay memory it trained beside, ``(task index,
        example)`` pairs of the earlier tasks (empty without replay)."""

    def before_eval(self, model: nn.Module, task_index: int) -> None:
        """Called before scoring task ``task_index`` (a method given the task id sets it here)."""

    def general_model(self, model: nn.Module, last_task: int) -> tuple[nn.Module, str | None]:
        """The model general ability is scored on once the stream is done, and, for methods that
        need a task id at inference, which task's adapter that is (said beside the scores)."""
        self.before_eval(model, last_task)
        return model, None

    def prompt_tokens(self) -> int:
        """Prompts are cut from the left to this many tokens at evaluation."""
        return self.config.max_prompt_tokens

    def eval_prompts(self, task: Task, prompts: list[str], tokenizer: PreTrainedTokenizerBase) -> list[str]:
        """The prompts the model is asked at evaluation of ``task``."""
        return prompts

    def save(self, model: nn.Module, directory: Path) -> None:
        raise NotImplementedError(f"method {self.name!r} does not define how to checkpoint itself")

    def load(self, base_model: PreTrainedModel, directory: Path) -> nn.Module:
        raise NotImplementedError(f"method {self.name!r} does not define how to resume itself")

    def report(self, context: ReportContext, model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
        """The method's own entries of ``results.json``, computed once the stream is done."""
        return {}

    def recording_gates(self, model: nn.Module) -> contextlib.AbstractContextManager[Callable[[], Any] | None]:
        """While evaluating: ``take()`` after each generation batch returns the router's gate on
        its prompt tokens, ``(batch, seq, experts)``, expert ``k`` trained on task ``k``; ``None``
        (no ``take``) for methods without a router."""
        return contextlib.nullcontext()
