"""Prompt + answer examples to token batches: loss on answer tokens only, left padding."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

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
        prompt = self.tokenizer(example.prompt, add_special_tokens=False)["input_ids"][-self.max_prompt_tokens :]
        answer = self.tokenizer(example.answer, add_special_tokens=False)["input_ids"][: self.max_answer_tokens]
        return prompt, answer + [self.tokenizer.eos_token_id]

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
