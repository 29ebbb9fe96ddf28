"""Curves over rounds as PNG: the mean over runs with a shaded band of one standard deviation."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_bands(
    series: dict[str, np.ndarray],
    ylabel: str,
    title: str,
    path: str | Path,
    xlabel: str = "round t",
    logy: bool = False,
) -> None:
    """One line per entry of ``series`` (label -> ``(runs, rounds)``), written to ``path``."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for label, values in series.items():
        values = np.asarray(values, dtype=float)
        x = np.arange(1, values.shape[1] + 1)
        mean = values.mean(axis=0)
        sd = values.std(axis=0, ddof=1) if values.shape[0] > 1 else np.zeros_like(mean)
        style = "--" if "no-termination" in label else "-"
        (line,) = ax.plot(x, mean, style, label=label, linewidth=1.6)
        ax.fill_between(x, mean - sd, mean + sd, color=line.get_color(), alpha=0.18, linewidth=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if logy:
        ax.set_yscale("log")
    ax.grid(True, linestyle="--", linewidth=0.5, alpha=0.6)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_allocation_phases(phases: list[list[list[float]]], tasks: list[str], path: str | Path) -> None:
    """One heat map per phase (PMoE's Fig. 3/4): rows the tasks seen so far, columns the experts,
    each cell the mean gate, with the value written in it."""
    fig, axes = plt.subplots(1, len(phases), figsize=(2.6 * len(phases) + 0.8, 2.9), dpi=120, squeeze=False)
    for t, (ax, matrix) in enumerate(zip(axes[0], phases, strict=True)):
        values = np.asarray(matrix, dtype=float)
        image = ax.imshow(values, vmin=0.0, vmax=1.0, cmap="viridis")
        for (i, j), v in np.ndenumerate(values):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v < 0.6 else "black")
        ax.set_xticks(range(values.shape[1]), [f"E{k + 1}" for k in range(values.shape[1])], fontsize=7)
        ax.set_yticks(range(values.shape[0]), tasks[: values.shape[0]], fontsize=7)
        ax.set_title(f"after task {t + 1}", fontsize=8)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="mean gate")
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
