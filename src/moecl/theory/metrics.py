"""Forgetting ``F_t`` and generalisation error ``G_t`` of a continual learner (arXiv 2406.16437).

Both are read off two per-task error records: ``current[tau]``, the error on past task ``tau``
of the expert that learned it, as that expert is *now* (after round ``t``), and
``at_train[tau]``, the same error right after round ``tau``.

``metrics="paper"`` (default): errors are squared distances ``||w - w*||^2`` and
``F_t = mean_{tau<t} (current - at_train)``, ``G_t = mean_{tau<=t} current``.
``metrics="code"`` (the official code's variant): errors are un-squared distances and
``F_t = mean_{tau<t} |current - at_train|``. The official code also shifts the averaging
windows by one task (it sums ``tau <= t-2`` and divides by ``t``); we do not copy that slip.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

Metrics = Literal["paper", "code"]


def task_error(distance: np.ndarray, metrics: Metrics) -> np.ndarray:
    """Per-task error from a Euclidean distance: squared in the paper, as is in the code."""
    if metrics == "paper":
        return distance**2
    if metrics == "code":
        return distance
    raise ValueError(f"metrics must be 'paper' or 'code', got {metrics!r}")


def forgetting_and_error(current: np.ndarray, at_train: np.ndarray, metrics: Metrics) -> tuple[np.ndarray, np.ndarray]:
    """``(F_t, G_t)`` for each run, from ``current`` and ``at_train`` of shape ``(runs, t)``.

    The last column is the task of round ``t`` itself: it counts in ``G_t`` but not in ``F_t``
    (a task cannot be forgotten in the round it is learned); ``F_1 = 0``.
    """
    t = current.shape[-1]
    g = current.mean(axis=-1)
    if t == 1:
        return np.zeros_like(g), g
    diff = current[..., :-1] - at_train[..., :-1]
    f = (np.abs(diff) if metrics == "code" else diff).mean(axis=-1)
    return f, g


def past_task_errors(errors: np.ndarray, routed: np.ndarray, task: np.ndarray) -> np.ndarray:
    """Pick, for each past round, the error of its expert on its task.

    Args:
        errors: ``(runs, M, N)``, every expert's current error on every task kind.
        routed, task: ``(runs, t)``, the expert and task kind of rounds ``1..t``.

    Returns:
        ``(runs, t)``: ``errors[r, routed[r, tau], task[r, tau]]``.
    """
    runs, _, n = errors.shape
    return np.take_along_axis(errors.reshape(runs, -1), routed * n + task, axis=1)
