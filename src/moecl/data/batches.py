"""Prompt + answer examples to token batches: loss on answer tokens only, left padding; the
order in which a task's examples are batched (shuffled, and grouped by length)."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Sampler
from transformers import PreTrainedTokenizerBase

from moecl.data.tokens import first_tokens, last_tokens
from moecl.data.trace import Example


@dataclass
class Collator:
    """Turns ``(task_index, Example)`` pairs into a batch.

    The prompt is truncated from the left to ``max_prompt_tokens`` (the end of a prompt, where the
    question sits, matters most); the answer, followed by EOS so the model learns to stop, is cut
    to ``max_answer_tokens``. Labels are ``-100`` on prompt and padding tokens.
    """

    tokenizer: PreTrainedTokenizerBase
    max_prompt_tokens: int
    max_answer_tokens: int

    def encode(self, example: Example) -> tuple[list[int], list[int]]:
        prompt = last_tokens(self.tokenizer, example.prompt, self.max_prompt_tokens)
        answer = first_tokens(self.tokenizer, example.answer, self.max_answer_tokens)
        return prompt, answer + [self.tokenizer.eos_token_id]

    def length(self, example: Example) -> int:
        """Tokens the example takes in a batch (prompt, answer and EOS, after truncation)."""
        prompt, answer = self.encode(example)
        return len(prompt) + len(answer)

    def __call__(self, items: list[tuple[int, Example]]) -> dict[str, torch.Tensor]:
        encoded = [self.encode(e) for _, e in items]
        width = max(len(p) + len(a) for p, a in encoded)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(items), width), pad, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        labels = torch.full((len(items), width), -100, dtype=torch.long)
        for row, (prompt, answer) in enumerate(encoded):
            seq = prompt + answer
            start = width - len(seq)
            ids[row, start:] = torch.tensor(seq)
            mask[row, start:] = 1
            labels[row, start + len(prompt) :] = torch.tensor(answer)
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": labels,
            "task_ids": torch.tensor([t for t, _ in items], dtype=torch.long),
        }


class LengthGroupedBatches(Sampler[list[int]]):
    """Micro-batches of examples of similar length: each epoch every example once, little padding.

    One epoch: a seeded permutation of all examples is cut into windows of ``window`` micro-batches;
    each window is sorted by length and cut into micro-batches of ``batch_size``; the micro-batches
    of the whole epoch are then shuffled, so long and short ones alternate through training. Like
    ``DataLoader(shuffle=True)``, an epoch holds every example exactly once (the last micro-batch
    of a window may be smaller) and the order is a pure function of the generator's seed: a
    resumed run that replays the loader from the task's start sees the same batches.

    Sorting inside windows, not the whole epoch, keeps the batches random (which examples meet
    depends on the permutation) while removing most padding: left padding costs every padded
    position a full forward and backward pass.

    Args:
        lengths: each example's length in tokens (:meth:`Collator.length`).
        batch_size: examples per micro-batch.
        generator: the seeded generator the permutations are drawn from.
        window: micro-batches per sorted window; 1 gives plain shuffled batches.
    """

    def __init__(self, lengths: list[int], batch_size: int, generator: torch.Generator, window: int = 8):
        self.lengths, self.batch_size, self.generator, self.window = lengths, batch_size, generator, window

    def __len__(self) -> int:
        span = self.batch_size * self.window
        full, rest = divmod(len(self.lengths), span)
        return full * self.window + -(-rest // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(len(self.lengths), generator=self.generator).tolist()
        span = self.batch_size * self.window
        batches = []
        for start in range(0, len(order), span):
            window = sorted(order[start : start + span], key=lambda i: self.lengths[i])
            batches += [window[i : i + self.batch_size] for i in range(0, len(window), self.batch_size)]
        shuffled = torch.randperm(len(batches), generator=self.generator).tolist()
        return iter([batches[i] for i in shuffled])


def answer_loss(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    logits_to_keep: bool = True,
    forward_kwargs: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Mean next-token cross-entropy over answer tokens (labels != -100), as ``labels=`` would give.

    With left padding every answer ends at the last column, so only the last ``k`` positions need
    logits; asking the model for just those (``logits_to_keep``) skips the vocabulary projection
    of every prompt token, the largest single cost of a step on a small LM with a big vocabulary.
    ``forward_kwargs`` are a method's own extra arguments (MoSEs: each example's task id).
    """
    labels = batch["labels"]
    first = int((labels != -100).int().argmax(-1).min()) if logits_to_keep else 1
    keep = labels.shape[1] - first + 1  # logits at positions first-1 .. end predict labels first .. end
    kwargs = {"logits_to_keep": keep} if logits_to_keep else {}
    kwargs.update(forward_kwargs or {})
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs).logits
    logits = logits[:, -keep:-1] if logits_to_keep else logits[:, :-1]
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), labels[:, -logits.shape[1] :].reshape(-1), ignore_index=-100
    )


def keeps_logits(model: nn.Module) -> bool:
    """Whether the Hugging Face model inside ``model`` accepts ``logits_to_keep`` (so that
    :func:`answer_loss` can skip the vocabulary projection of prompt tokens)."""
    inner = getattr(model, "base_model", model)
    return "logits_to_keep" in inspect.signature(inner.forward).parameters
