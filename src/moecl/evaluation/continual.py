"""The continual-learning matrix ``R`` and its summaries (TRACE, arXiv 2310.06762).

``R[t][i]`` is the score on task ``i`` after training task ``t`` (0-based here), ``None``
where it was not evaluated (task ``i > t`` unless all tasks are evaluated). With ``T`` tasks:

- ``OP = mean_{i} R[T-1][i]``: the average final score;
- ``BWT``, by convention:
  - ``"seed"`` (PMoE's paper, the default): ``(1/T) sum_{i<=T-1} (R[T-1][i] - R[i][i])``;
  - ``"lopez-paz"``: the mean over ``i < T-1`` of the same differences (divides by ``T-1``);
  - ``"forgetting"``: as ``lopez-paz`` with gains clipped at 0 (only losses count);
- ``FWT = mean_{i>=1} (R[i-1][i] - zero_shot[i])``: how much training on earlier tasks helps a
  task before it is trained, against the base model's zero-shot score; ``None`` unless every
  task was evaluated after every task and the base model before training.
"""

from __future__ import annotations

from typing import Literal

BWT_CONVENTIONS = ("seed", "lopez-paz", "forgetting")
BwtConvention = Literal["seed", "lopez-paz", "forgetting"]
Matrix = list[list[float | None]]


def overall_performance(R: Matrix, t: int | None = None) -> float:
    """``OP_t``: mean of row ``t`` over the tasks trained so far (default: the last row)."""
    t = len(R) - 1 if t is None else t
    return sum(R[t][i] for i in range(t + 1)) / (t + 1)


def backward_transfer(R: Matrix, convention: BwtConvention = "seed", t: int | None = None) -> float | None:
    """``BWT_t`` under ``convention``; ``None`` for the lopez-paz/forgetting forms after one task."""
    t = len(R) - 1 if t is None else t
    diffs = [R[t][i] - R[i][i] for i in range(t + 1)]
    if convention == "seed":
        return sum(diffs) / (t + 1)
    if convention not in BWT_CONVENTIONS:
        raise ValueError(f"unknown BWT convention {convention!r}; choose one of {', '.join(BWT_CONVENTIONS)}")
    if t == 0:
        return None
    past = diffs[:-1]
    if convention == "forgetting":
        past = [min(0.0, d) for d in past]
    return sum(past) / t


def forward_transfer(R: Matrix, zero_shot: list[float] | None) -> float | None:
    """``FWT`` against zero-shot scores; ``None`` where the needed entries were not evaluated."""
    if not zero_shot or len(R) < 2:
        return None
    gains = []
    for i in range(1, len(R)):
        before = R[i - 1][i] if i < len(R[i - 1]) else None
        if before is None:
            return None
        gains.append(before - zero_shot[i])
    return sum(gains) / len(gains)
