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
