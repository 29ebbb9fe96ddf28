"""Prompt + answer examples to token batches: loss on answer tokens only, left padding."""

from __future__ import annotations

from dataclasses import dataclass

import torch
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
