"""A score's floors: what always answering the majority class gets, and what the
untrained base model gets zero-shot. A task counts as learned only when it beats both clearly.

The zero-shot floor costs one evaluation pass of the base model, so it is cached under
``$MOECL_CACHE/floors/`` keyed by the model, the task's metric, the exact items of the scored
split (order-free) and the generation settings: every seed and method of a study over the same
stream reads the same file.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

from moecl.data.trace import Example, Task
from moecl.evaluation.metrics import score
from moecl.io import atomic_write_json


def majority_answer(task: Task) -> str:
    """The most frequent training answer (ties: the one seen first), with its leading space."""
    counts = Counter(e.answer.strip() for e in task.train)
    return " " + counts.most_common(1)[0][0]


def majority_score(task: Task, examples: list[Example]) -> float:
    """Mean score of answering :func:`majority_answer` to every example (0-100)."""
    answer = majority_answer(task)
    return sum(score(task.metric, e.prompt, e.answer, answer.strip()) for e in examples) / len(examples)


def zero_shot_key(model: str, task: Task, examples: list[Example], settings: dict) -> str:
    """A digest naming one zero-shot score: same model, items (in any order), metric and settings."""
    items = sorted((e.prompt, e.answer) for e in examples)
    blob = json.dumps({"model": model, "task": task.name, "metric": task.metric, "items": items, **settings})
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:20]


class ZeroShotCache:
    """``<root>/<key>.json`` holding ``{"task", "model", "score", "n"}``; written atomically."""

    def __init__(self, root: Path):
        self.root = root

    def get(self, key: str) -> float | None:
        path = self.root / f"{key}.json"
        if not path.is_file():
            return None
        return float(json.loads(path.read_text())["score"])

    def put(self, key: str, model: str, task: str, value: float, n: int) -> None:
        atomic_write_json(self.root / f"{key}.json", {"task": task, "model": model, "score": value, "n": n})
