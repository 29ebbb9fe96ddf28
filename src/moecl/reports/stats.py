"""Error bars for a comparison: a 95% confidence interval over seeds per cell, and the
paired bootstrap of a difference between two methods over (seed, test example).

Two runs of the same stream and seed score the same test items in the same order, so a
difference between methods can be paired item by item: the bootstrap resamples seeds, then
within each drawn seed every task's test items (the same indices for both methods), and
recomputes OP and BWT of both from the resampled per-item scores. A difference is *resolved*
when its 95% interval excludes 0.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats as scipy_stats

from moecl.evaluation.continual import BWT_CONVENTIONS


def mean_ci(values: list[float], level: float = 0.95) -> tuple[float, float | None]:
    """``(mean, half-width)`` of Student's t interval over ``values``; half-width ``None`` for one value."""
    arr = np.asarray(values, dtype=float)
    mean = float(arr.mean())
    if arr.size < 2:
        return mean, None
    sem = float(arr.std(ddof=1)) / math.sqrt(arr.size)
    return mean, float(scipy_stats.t.ppf(0.5 + level / 2, arr.size - 1)) * sem


@dataclass
class ItemScores:
    """One run's per-item scores: ``final[i]`` on task ``i`` at the end of the stream and
    ``diag[i]`` right after training task ``i`` (``None`` for joint methods); each ``(n_i,)``."""

    prompts: list[list[str]]
    final: list[np.ndarray]
    diag: list[np.ndarray] | None


def _scores(path: Path) -> tuple[list[str], np.ndarray]:
    if not path.is_file():
        raise ValueError(f"{path} is missing: the paired bootstrap needs the run's per-item predictions")
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r["prompt"] for r in records], np.array([r["score"] for r in records], dtype=float)


def item_scores(run_dir: Path, results: dict[str, Any]) -> ItemScores:
    """Read ``predictions/after-task-<t>/<task>.jsonl`` of a finished run."""
    last = len(results["R"]) - 1
    tasks = results["tasks"]
    finals = [_scores(run_dir / "predictions" / f"after-task-{last}" / f"{name}.jsonl") for name in tasks]
    joint = len(results.get("phases") or [[i] for i in range(len(tasks))]) == 1 and len(tasks) > 1
    diag = None
    if not joint:
        diag = [_scores(run_dir / "predictions" / f"after-task-{i}" / f"{t}.jsonl")[1] for i, t in enumerate(tasks)]
    return ItemScores([p for p, _ in finals], [s for _, s in finals], diag)


def general_item_scores(run_dir: Path) -> ItemScores | None:
    """A run's general-ability change per item, ``after - before`` (``general.json``), one
    benchmark per "task", so that :func:`paired_bootstrap`'s OP difference of two runs is their
    difference in Delta R^G (Eq. 6: the mean over benchmarks of the mean change), resampled over
    (seed, item). ``None`` when the run scored no general ability."""
    path = run_dir / "general.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    names = sorted(data["after"])
    # items are 1/0 per manifest item; scores and Delta R^G are in points
    change = [
        100.0 * (np.array(data["after"][n]["items"], float) - np.array(data["before"][n]["items"], float))
        for n in names
    ]
    return ItemScores(
        [[f"{n} item {i}" for i in range(len(c))] for n, c in zip(names, change, strict=True)], change, None
    )


def bwt_from_means(final: np.ndarray, diag: np.ndarray, convention: str) -> np.ndarray:
    """BWT from per-task mean scores ``(..., T)`` under a convention of :mod:`moecl.evaluation.continual`."""
    diffs = final - diag
    if convention == "seed":
        return diffs.mean(-1)
    if convention not in BWT_CONVENTIONS:
        raise ValueError(f"unknown BWT convention {convention!r}")
    past = diffs[..., :-1]
    if convention == "forgetting":
        past = np.minimum(past, 0.0)
    return past.mean(-1)


def paired_bootstrap(
    a: dict[int, ItemScores],
    b: dict[int, ItemScores],
    convention: str = "seed",
    samples: int = 10_000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, dict[str, float | bool | None]]:
    """Difference ``a - b`` in OP and BWT with a bootstrap interval over (seed, test item).

    ``a``, ``b``: per seed, the two runs' item scores over the same items. Returns, for ``"OP"``
    and ``"BWT"``, ``{"diff", "low", "high", "excludes_zero", "seeds"}``; BWT is ``None`` when
    either run is joint (no score right after each task).
    """
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise ValueError("the two columns share no seed: a paired difference needs runs of the same seeds")
    for s in seeds:
        if a[s].prompts != b[s].prompts:
            raise ValueError(f"seed {s}: the two runs scored different test items, so they cannot be paired")
    tasks = len(a[seeds[0]].final)
    rng = np.random.default_rng(seed)
    drawn = rng.integers(0, len(seeds), size=(samples, len(seeds)))  # seeds resampled per replicate
    with_bwt = all(a[s].diag is not None and b[s].diag is not None for s in seeds)
    stacks = {}
    for key in ("final", "diag") if with_bwt else ("final",):
        for name, side in (("a", a), ("b", b)):
            stacks[name, key] = [[getattr(side[s], key)[i] for s in seeds] for i in range(tasks)]
    op = np.zeros(samples)
    bwt = np.zeros(samples)
    for k in range(len(seeds)):  # position k of each replicate's drawn seeds
        means = {key: np.zeros((samples, tasks)) for key in stacks}
        for j in range(len(seeds)):
            rows = np.nonzero(drawn[:, k] == j)[0]  # the replicates that drew seed j there
            if rows.size == 0:
                continue
            for i in range(tasks):
                n = len(stacks["a", "final"][i][j])
                idx = rng.integers(0, n, size=(rows.size, n))  # the same items for both methods
                for key, per_task in stacks.items():
                    means[key][rows, i] = per_task[i][j][idx].mean(-1)
        op += (means["a", "final"] - means["b", "final"]).mean(-1)
        if with_bwt:
            bwt += bwt_from_means(means["a", "final"], means["a", "diag"], convention) - bwt_from_means(
                means["b", "final"], means["b", "diag"], convention
            )
    op /= len(seeds)
    bwt /= len(seeds)

    def observed(kind: str) -> float:
        values = []
        for s in seeds:
            fa = np.array([x.mean() for x in a[s].final])
            fb = np.array([x.mean() for x in b[s].final])
            if kind == "OP":
                values.append(fa.mean() - fb.mean())
            else:
                da = np.array([x.mean() for x in a[s].diag])
                db = np.array([x.mean() for x in b[s].diag])
                values.append(float(bwt_from_means(fa, da, convention) - bwt_from_means(fb, db, convention)))
        return float(np.mean(values))

    def summary(kind: str, replicates: np.ndarray) -> dict[str, float | bool | None]:
        low, high = np.quantile(replicates, [(1 - level) / 2, (1 + level) / 2])
        return {
            "diff": observed(kind),
            "low": float(low),
            "high": float(high),
            "excludes_zero": bool(low > 0 or high < 0),
            "seeds": len(seeds),
        }

    return {"OP": summary("OP", op), "BWT": summary("BWT", bwt) if with_bwt else None}
