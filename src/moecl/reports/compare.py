"""Method comparison laid out like seed 001's Table 1, and the R matrices side by side.

A run folder holds ``results.json`` (one seed) or ``seed-<s>/results.json`` subfolders
(``moecl run --seeds``); each becomes one column, reported as mean ± sd over its seeds.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moecl.io import atomic_path, atomic_write_json, atomic_write_text
from moecl.reports.tables import markdown_table
from moecl.training.config import DEFAULT_REPLAY


@dataclass
class MethodRuns:
    """The runs (seeds) of one configuration: one column of the comparison."""

    label: str
    results: list[dict[str, Any]]

    @property
    def tasks(self) -> list[str]:
        return self.results[0]["tasks"]

    def final(self, task: str) -> list[float]:
        """Score on ``task`` at the end of the stream, per seed."""
        i = self.tasks.index(task)
        return [r["R"][-1][i] for r in self.results]

    def values(self, key: str) -> list[float]:
        return [r[key] for r in self.results if r.get(key) is not None]

    def mean_R(self) -> np.ndarray:
        """``R`` averaged over seeds, NaN where not evaluated: ``(rows, tasks)``."""
        stack = np.array([[[np.nan if v is None else v for v in row] for row in r["R"]] for r in self.results])
        return stack.mean(axis=0)


def load_results(run_dir: Path) -> list[dict[str, Any]]:
    """``results.json`` of a run folder, or of every ``seed-*`` subfolder of a multi-seed one."""
    if (run_dir / "results.json").is_file():
        return [json.loads((run_dir / "results.json").read_text())]
    seeds = sorted(run_dir.glob("seed-*/results.json"))
    if not seeds:
        raise ValueError(
            f"{run_dir} holds no results.json nor seed-*/results.json: not a finished `moecl run` folder "
            "(an unfinished one resumes when its command is run again)"
        )
    return [json.loads(p.read_text()) for p in seeds]


def default_label(results: dict[str, Any], config: dict[str, Any] | None) -> str:
    """The method's name, with its replay share when it differs from the method's default."""
    method = results["method"]
    replay = (config or {}).get("replay")
    if replay is None or replay == DEFAULT_REPLAY.get(method, 0.0):
        return method
    return f"{method} replay={replay:g}" if replay else f"{method} no replay"


def collect(run_dirs: list[Path], labels: list[str] | None = None) -> list[MethodRuns]:
    if labels is not None and len(labels) != len(run_dirs):
        raise ValueError(f"--labels names {len(labels)} columns for {len(run_dirs)} run folders")
    columns = []
    for i, run_dir in enumerate(run_dirs):
        results = load_results(run_dir)
        config_path = next(iter(sorted(run_dir.glob("config.json")) + sorted(run_dir.glob("seed-*/config.json"))), None)
        config = json.loads(config_path.read_text()) if config_path else None
        columns.append(MethodRuns(labels[i] if labels else default_label(results[0], config), results))
    first = columns[0]
    for column in columns[1:]:
        if column.tasks != first.tasks:
            raise ValueError(
                f"{column.label!r} ran tasks {column.tasks}, {first.label!r} ran {first.tasks}: "
                "compare runs over the same stream"
            )
    return columns


def _cell(values: list[float], digits: int = 1) -> str:
    if not values:
        return "–"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def table_rows(columns: list[MethodRuns]) -> list[tuple[str, list[list[float]]]]:
    """``(row name, per column the values over seeds)``: tasks, then OP, BWT, trainable share."""
    rows = [(task, [c.final(task) for c in columns]) for task in columns[0].tasks]
    rows.append(("OP", [c.values("OP") for c in columns]))
    rows.append(("BWT", [c.values("BWT") for c in columns]))
    share = [[100 * r["trainable_params"] / r["total_params"] for r in c.results] for c in columns]
    rows.append(("trainable %", share))
    return rows


def markdown(columns: list[MethodRuns]) -> str:
    rows = [
        [name, *(_cell(v, {"trainable %": 3, "OP": 2, "BWT": 2}.get(name, 1)) for v in values)]
        for name, values in table_rows(columns)
    ]
    rows.append(["seeds", *(str(len(c.results)) for c in columns)])
    return markdown_table(["task", *(c.label for c in columns)], rows)


def csv_text(columns: list[MethodRuns]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["row", *(f"{c.label} {part}" for c in columns for part in ("mean", "sd", "n"))])
    for name, values in table_rows(columns):
        cells = []
        for v in values:
            arr = np.array(v, dtype=float)
            cells += [
                f"{arr.mean():.4f}" if arr.size else "",
                f"{arr.std(ddof=1):.4f}" if arr.size > 1 else "",
                arr.size,
            ]
        writer.writerow([name, *cells])
    return buffer.getvalue()


def plot_r_matrices(columns: list[MethodRuns], path: Path) -> None:
    """One heat map per column: score on task (x) after training task (y), mean over seeds."""
    from moecl.reports.plots import plt

    tasks = columns[0].tasks
    fig, axes = plt.subplots(1, len(columns), figsize=(2.2 + 2.0 * len(columns), 2.9), dpi=120, squeeze=False)
    for ax, column in zip(axes[0], columns, strict=True):
        matrix = column.mean_R()
        image = ax.imshow(matrix, vmin=0, vmax=100, cmap="viridis", aspect="auto")
        for (y, x), value in np.ndenumerate(matrix):
            if not np.isnan(value):
                ax.text(x, y, f"{value:.0f}", ha="center", va="center", fontsize=7, color="w" if value < 60 else "k")
        ax.set_title(column.label, fontsize=8)
        ax.set_xticks(range(len(tasks)), [t[:10] for t in tasks], rotation=60, fontsize=6)
        rows = len(matrix)
        ax.set_yticks(range(rows), ["all"] if rows == 1 and len(tasks) > 1 else [str(t + 1) for t in range(rows)])
        ax.tick_params(axis="y", labelsize=7)
    axes[0][0].set_ylabel("after training task", fontsize=8)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="score")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, bbox_inches="tight")
    plt.close(fig)


def write_comparison(run_dirs: list[Path], out: Path, labels: list[str] | None = None) -> str:
    """Write ``compare.md``, ``compare.csv``, ``compare.json`` and ``r_matrices.png`` to ``out``."""
    columns = collect(run_dirs, labels)
    text = markdown(columns)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "compare.md", text)
    atomic_write_text(out / "compare.csv", csv_text(columns))
    atomic_write_json(
        out / "compare.json",
        {
            "runs": [str(p) for p in run_dirs],
            "columns": [c.label for c in columns],
            "rows": {name: dict(zip([c.label for c in columns], v, strict=True)) for name, v in table_rows(columns)},
        },
    )
    plot_r_matrices(columns, out / "r_matrices.png")
    return text


def seed_summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and sd over seeds of OP, BWT, FWT and every task's final score (``seeds.json``)."""
    column = MethodRuns(results[0]["method"], results)

    def stats(values: list[float]) -> dict[str, float | None]:
        if not values:
            return {"mean": None, "sd": None}
        arr = np.array(values, dtype=float)
        return {"mean": float(arr.mean()), "sd": float(arr.std(ddof=1)) if arr.size > 1 else 0.0}

    return {
        "method": column.label,
        "seeds": [r["seed"] for r in results],
        "OP": stats(column.values("OP")),
        "BWT": stats(column.values("BWT")),
        "FWT": stats(column.values("FWT")),
        "final": {task: stats(column.final(task)) for task in column.tasks},
    }
