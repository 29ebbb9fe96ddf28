"""Performance and cost against one option (PMoE's Fig. 2 for tau), and the router's
allocation at the two ends of the sweep side by side (its Fig. 3)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from moecl.io import atomic_path, atomic_write_json
from moecl.reports.plots import plt


def sweep_points(name: str, columns: list[tuple[str, list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    """Per swept value: OP, BWT (mean and sd over seeds), training seconds per optimizer step and
    trainable parameters, from each run's results.json."""
    points = []
    for label, runs in columns:
        value = runs[0]["config_value"] if "config_value" in runs[0] else label.partition("=")[2]
        steps = [sum(t["steps"] for t in r["train"]) for r in runs]
        seconds = [sum(t.get("seconds", float("nan")) for t in r["train"]) for r in runs]
        ops = [r["OP"] for r in runs]
        bwts = [r["BWT"] for r in runs if r.get("BWT") is not None]
        points.append(
            {
                name: value,
                "OP": float(np.mean(ops)),
                "OP_sd": float(np.std(ops, ddof=1)) if len(ops) > 1 else 0.0,
                "BWT": float(np.mean(bwts)) if bwts else None,
                "BWT_sd": float(np.std(bwts, ddof=1)) if len(bwts) > 1 else 0.0,
                "seconds_per_step": float(np.mean([s / n for s, n in zip(seconds, steps, strict=True) if n])),
                "trainable_params": runs[0]["trainable_params"],
                "seeds": len(runs),
                "allocation": np.mean([r["router_allocation"] for r in runs], axis=0).tolist()
                if all(r.get("router_allocation") for r in runs)
                else None,
            }
        )
    return points


def plot_sweep(name: str, points: list[dict[str, Any]], tasks: list[str], path: Path) -> None:
    """OP and BWT (± sd over seeds), seconds per step and trainable parameters against the option,
    then the allocation matrices at its first and last value."""
    x = np.arange(len(points))
    labels = [str(p[name]) for p in points]
    ends = [p for p in (points[0], points[-1]) if p["allocation"] is not None] if len(points) > 1 else []
    fig, axes = plt.subplots(1, 3 + len(ends), figsize=(4.2 * (3 + len(ends)), 3.4), dpi=110)
    for ax, key in zip(axes[:2], ("OP", "BWT"), strict=True):
        values = [np.nan if p[key] is None else p[key] for p in points]
        ax.errorbar(x, values, yerr=[p[f"{key}_sd"] for p in points], marker="o", capsize=3)
        ax.set_title(key)
        ax.set_xticks(x, labels)
        ax.set_xlabel(name)
        ax.grid(alpha=0.4)
    cost = axes[2]
    cost.plot(x, [p["seconds_per_step"] for p in points], marker="o", color="tab:red")
    cost.set_ylabel("seconds per optimizer step", color="tab:red")
    cost.set_xticks(x, labels)
    cost.set_xlabel(name)
    twin = cost.twinx()
    twin.plot(x, [p["trainable_params"] / 1e6 for p in points], marker="s", color="tab:gray")
    twin.set_ylabel("trainable parameters (M)", color="tab:gray")
    # From zero, with headroom: a few percent of timing noise must not look like a trend.
    cost.set_ylim(0, 1.2 * max(p["seconds_per_step"] for p in points))
    twin.set_ylim(0, 1.2 * max(p["trainable_params"] / 1e6 for p in points))
    cost.set_title("training cost")
    for ax, point in zip(axes[3:], ends, strict=True):
        matrix = np.asarray(point["allocation"])
        ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
        for (i, j), v in np.ndenumerate(matrix):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v < 0.6 else "black")
        ax.set_xticks(range(matrix.shape[1]), [f"E{k + 1}" for k in range(matrix.shape[1])], fontsize=7)
        ax.set_yticks(range(matrix.shape[0]), tasks[: matrix.shape[0]], fontsize=7)
        ax.set_title(f"allocation, {name}={point[name]}", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)


def write_sweep(name: str, columns: list[tuple[str, list[dict[str, Any]]]], out: Path) -> list[dict[str, Any]]:
    """``sweep.json`` and ``sweep.png`` in ``out``."""
    points = sweep_points(name, columns)
    atomic_write_json(out / "sweep.json", {"option": name, "points": points})
    plot_sweep(name, points, columns[0][1][0]["tasks"], out / "sweep.png")
    return points
