"""Where a router sends each task (PMoE's Fig. 3-4, arXiv 2407.21571): allocation matrices, diagonal mass, entropy.

A run measures, after every task, the router's mean gate per (task seen, expert) on each task's
scored prompts. Expert ``k`` of a routed method is the one opened for task ``k``, so the
matrix's diagonal is the share each task gives its own expert ("diagonal mass"): 1 is a router
that sends every task to its expert, ``1/T`` one that does not tell tasks apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


def gate_summary(probs: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example, its mean gate and the mean per-token entropy of the gate (nats).

    Args:
        probs: ``(batch, seq, experts)``, each token's gate.
        attention_mask: ``(batch, seq)``; padding does not count.

    Returns:
        ``(batch, experts)`` mean gates and ``(batch,)`` mean entropies.
    """
    mask = attention_mask.to(probs.dtype)
    tokens = mask.sum(1)
    means = (probs * mask[..., None]).sum(1) / tokens[:, None]
    entropy = -torch.xlogy(probs, probs).sum(-1)  # (batch, seq); 0 log 0 = 0
    return means, (entropy * mask).sum(1) / tokens


@dataclass
class Allocation:
    """Accumulates gates task by task; :meth:`to_json` gives one phase's record."""

    matrix: list[list[float]] = field(default_factory=list)
    entropy: list[float] = field(default_factory=list)

    def add_task(self, summaries: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """One row from the :func:`gate_summary` of each batch of one task's prompts (an example
        weighs the same whatever its length)."""
        means = torch.cat([m for m, _ in summaries])
        entropy = torch.cat([e for _, e in summaries])
        self.matrix.append([round(float(x), 6) for x in means.mean(0)])
        self.entropy.append(round(float(entropy.mean()), 6))

    def to_json(self) -> dict[str, object]:
        return {"matrix": self.matrix, "entropy": self.entropy, "diagonal_mass": diagonal_mass(self.matrix)}


def diagonal_mass(matrix: list[list[float]]) -> float | None:
    """Mean over tasks ``k`` of row ``k``'s gate on expert ``k`` (tasks without an expert skipped);
    ``None`` when no task has one."""
    diagonal = [row[k] for k, row in enumerate(matrix) if k < len(row)]
    return round(sum(diagonal) / len(diagonal), 6) if diagonal else None


def own_expert_gates(phases: list[list[list[float]]]) -> dict[str, list[float]]:
    """Per task ``k`` (the first included), expert ``k``'s gate on task ``k`` right after task
    ``k`` (``after_own_task``: 1 for the first task, whose router has one column) and at the end
    of the stream (``at_end``), from the allocation matrix measured after each phase."""
    if not phases:
        return {"after_own_task": [], "at_end": []}
    tasks = min(len(phases), len(phases[-1]))
    return {
        "after_own_task": [phases[k][k][k] for k in range(tasks) if k < len(phases[k][k])],
        "at_end": [phases[-1][k][k] for k in range(tasks) if k < len(phases[-1][k])],
    }


def routing_results(phases: list[dict[str, Any]] | None) -> dict[str, Any]:
    """results.json's routing entries from the allocation measured after each phase (each phase's
    :meth:`Allocation.to_json`)."""
    if not phases:
        return {"router_allocation": None}
    return {
        "router_allocation": phases[-1]["matrix"],
        "router_allocation_phases": [p["matrix"] for p in phases],
        "router_entropy_phases": [p["entropy"] for p in phases],
        "diagonal_mass_phases": [p["diagonal_mass"] for p in phases],
        "own_expert_gate": own_expert_gates([p["matrix"] for p in phases]),
    }
