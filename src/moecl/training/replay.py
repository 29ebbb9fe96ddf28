"""The replay memory (PMoE, arXiv 2407.21571): a fixed share of every finished task's training data."""

from __future__ import annotations

import math
import random

from moecl.data.trace import Example


class ReplayMemory:
    """Examples kept from past tasks, each with its task index.

    Args:
        fraction: share of a task's training set kept (at least one example when positive).
        seed: the sample of task ``t`` depends only on ``(seed, t)``.
    """

    def __init__(self, fraction: float, seed: int = 0):
        self.fraction = fraction
        self.seed = seed
        self.items: list[tuple[int, Example]] = []

    def add_task(self, task_index: int, examples: list[Example]) -> None:
        if self.fraction <= 0 or not examples:
            return
        k = min(len(examples), max(1, math.ceil(self.fraction * len(examples))))
        chosen = random.Random(f"replay:{self.seed}:{task_index}").sample(range(len(examples)), k)
        self.items += [(task_index, examples[i]) for i in sorted(chosen)]

    def tasks(self) -> set[int]:
        return {t for t, _ in self.items}

    def to_json(self) -> list[dict]:
        return [{"task": t, "prompt": e.prompt, "answer": e.answer} for t, e in self.items]

    @classmethod
    def from_json(cls, records: list[dict], fraction: float, seed: int) -> ReplayMemory:
        memory = cls(fraction, seed)
        memory.items = [(r["task"], Example(r["prompt"], r["answer"])) for r in records]
        return memory
