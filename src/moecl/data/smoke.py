"""``smoke``: a small generated stream for tests and a quick try (builds in milliseconds).

Four tasks; two answer with option letters, as several TRACE tasks do, so they interfere:
``sentiment`` (A/B), ``parity`` (A/B), ``addition`` (``a + 1``, exact match) and ``copy``
(repeat a word list, ROUGE-L). Each is decided by a few characters of its prompt, so that even
``tiny-random`` (a 2-block random model) learns all four in seconds: the stream exists to show that
the mechanics work, learning and retention included.
"""

from __future__ import annotations

import random
from pathlib import Path

from moecl.data.trace import Example, Task, write_benchmark

VERSION = 2
"""The cache folder is ``smoke-v<VERSION>``; v2: ``addition`` is ``a + 1``, an ``eval.json`` split."""
POSITIVE = ["good", "great", "lovely", "fine", "happy", "superb", "nice", "tasty"]
NEGATIVE = ["bad", "awful", "sad", "poor", "rude", "cold", "dull", "nasty"]
WORDS = ["red", "blue", "cat", "dog", "sun", "moon", "tree", "fish", "bird", "star", "rain", "rock"]


def _sentiment(rng: random.Random) -> Example:
    label = rng.random() < 0.5
    words = rng.sample(POSITIVE if label else NEGATIVE, 2) + rng.sample(WORDS, 1)
    rng.shuffle(words)
    return Example(f"Review: {' '.join(words)}. Sentiment? (A) positive (B) negative\nAnswer:", " A" if label else " B")


def _parity(rng: random.Random) -> Example:
    n = rng.randrange(10, 99)
    return Example(f"Is {n} even? (A) yes (B) no\nAnswer:", " A" if n % 2 == 0 else " B")


def _addition(rng: random.Random) -> Example:
    a = rng.randrange(0, 9)
    return Example(f"{a} + 1 =", f" {a + 1}")


def _copy(rng: random.Random) -> Example:
    words = " ".join(rng.sample(WORDS, 3))
    return Example(f"Repeat: {words}\nAnswer:", f" {words}")


GENERATORS = {
    "sentiment": ("accuracy", _sentiment),
    "parity": ("accuracy", _parity),
    "addition": ("accuracy", _addition),
    "copy": ("rouge_l", _copy),
}


def build_smoke(root: Path, seed: int = 0, train: int = 48, test: int = 24, held: int = 24) -> Path:
    """Write the smoke stream under ``root`` (TRACE format, ``eval.json`` included) and return
    ``root``. Splits are independent draws, so a task with few distinct prompts (``addition`` has
    nine) repeats prompts across them: a stream for mechanics, not for measurement."""
    tasks = []
    for name, (metric, make) in GENERATORS.items():
        rng = random.Random(f"smoke:{seed}:{name}")
        splits = [[make(rng) for _ in range(n)] for n in (train, test, held)]
        tasks.append(Task(name, metric, *splits))
    write_benchmark(root, tasks)
    return root
