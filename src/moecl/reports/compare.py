"""Method comparison laid out like PMoE's Table 1 (arXiv 2407.21571), and the R matrices side by side.

A run folder holds ``results.json`` (one seed) or ``seed-<s>/results.json`` subfolders
(``moecl run --seeds``); each becomes one column, reported as mean ± the half-width of a 95%
confidence interval over its seeds (Student's t). The floors of every task (majority class,
base model zero-shot) stand beside the methods, and ``reference`` adds each column's paired
difference in OP and BWT against one column, with a bootstrap interval over (seed, test item)
(:mod:`moecl.reports.stats`).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moecl.config import DEFAULT_REPLAY
from moecl.evaluation.routing import own_expert_gates
from moecl.io import atomic_path, atomic_write_json, atomic_write_text, read_json
from moecl.reports.stats import ItemScores, general_item_scores, item_scores, mean_ci, paired_bootstrap
from moecl.reports.tables import markdown_table


@dataclass
class MethodRuns:
    """The runs (seeds) of one configuration: one column of the comparison."""

    label: str
    results: list[dict[str, Any]]
    folders: list[Path] = field(default_factory=list)

    @property
    def tasks(self) -> list[str]:
        return self.results[0]["tasks"]

    def final(self, task: str) -> list[float]:
        """Score on ``task`` at the end of the stream, per seed."""
        i = self.tasks.index(task)
        return [r["R"][-1][i] for r in self.results]

    def values(self, key: str) -> list[float]:
        return [r[key] for r in self.results if r.get(key) is not None]

    def floors(self, kind: str) -> list[list[float]]:
        """Per task, the ``kind`` floor ("majority" or "zero_shot") over the seeds that recorded it."""
        return [
            [r["floors"][task][kind] for r in self.results if r.get("floors") and r["floors"][task][kind] is not None]
            for task in self.tasks
        ]

    def item_scores(self) -> dict[int, ItemScores]:
        """Per seed, the per-item scores the paired bootstrap resamples."""
        return {r["seed"]: item_scores(folder, r) for folder, r in zip(self.folders, self.results, strict=True)}

    def general_item_scores(self) -> dict[int, ItemScores] | None:
        """Per seed, the per-item general-ability changes; ``None`` unless every seed has them."""
        scores = {r["seed"]: general_item_scores(folder) for folder, r in zip(self.folders, self.results, strict=True)}
        return None if any(v is None for v in scores.values()) else scores

    def routing(self) -> tuple[list[float], list[float], list[list[float]]]:
        """Per seed (routed runs only): the diagonal mass at the end of the stream; the mean over
        every task ``k`` (the first included) of expert ``k``'s gate on task ``k`` right after
        task ``k``; and per task that gate at the end of the stream."""
        diagonal, own, at_end = [], [], []
        for r in self.results:
            phases = r.get("router_allocation_phases")
            if not phases or len(phases) < 2:
                continue
            gates = own_expert_gates(phases)
            diagonal.append(r["diagonal_mass_phases"][-1])
            own.append(float(np.mean(gates["after_own_task"])))
            at_end.append(gates["at_end"])
        return diagonal, own, at_end

    def mean_R(self) -> np.ndarray:
        """``R`` averaged over seeds, NaN where not evaluated: ``(rows, tasks)``."""
        stack = np.array([[[np.nan if v is None else v for v in row] for row in r["R"]] for r in self.results])
        return stack.mean(axis=0)


def load_results(run_dir: Path) -> list[tuple[Path, dict[str, Any]]]:
    """``(folder, results.json)`` of a run folder, or of every ``seed-*`` subfolder of a multi-seed one."""
    if (run_dir / "results.json").is_file():
        return [(run_dir, read_json(run_dir / "results.json"))]
    seeds = sorted(run_dir.glob("seed-*/results.json"), key=lambda p: int(p.parent.name.split("-", 1)[1]))
    if not seeds:
        raise ValueError(
            f"{run_dir} holds no results.json nor seed-*/results.json: not a finished `moecl run` folder "
            "(an unfinished one resumes when its command is run again)"
        )
    return [(p.parent, read_json(p)) for p in seeds]


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
        loaded = load_results(run_dir)
        results = [r for _, r in loaded]
        config_path = next(iter(sorted(run_dir.glob("config.json")) + sorted(run_dir.glob("seed-*/config.json"))), None)
        config = read_json(config_path) if config_path else None
        label = labels[i] if labels else default_label(results[0], config)
        columns.append(MethodRuns(label, results, [f for f, _ in loaded]))
    names = [c.label for c in columns]
    if len(set(names)) != len(names):
        raise ValueError(f"two columns are both called {max(names, key=names.count)!r}: name them with --labels")
    first = columns[0]
    for column in columns[1:]:
        if column.tasks != first.tasks:
            raise ValueError(
                f"{column.label!r} ran tasks {column.tasks}, {first.label!r} ran {first.tasks}: "
                "compare runs over the same stream"
            )
    return columns


def _cell(values: list[float], digits: int = 1) -> str:
    """``mean ± h``, ``h`` the half-width of the 95% interval over seeds (the mean alone for one seed)."""
    if not values:
        return "–"
    mean, half = mean_ci(values)
    return f"{mean:.{digits}f}" if half is None else f"{mean:.{digits}f} ± {half:.{digits}f}"


def floor_rows(columns: list[MethodRuns]) -> dict[str, dict[str, float | None]]:
    """The floors beside the table, per row name: the majority and zero-shot scores of every task
    and their mean beside OP (means over the first column's seeds; the floors are the stream's,
    not the method's); beside a general-ability row, the base model's score as its zero-shot."""
    out: dict[str, dict[str, float | None]] = {}
    for kind in ("majority", "zero_shot"):
        per_task = [float(np.mean(v)) if v else None for v in columns[0].floors(kind)]
        known = [v for v in per_task if v is not None]
        op = sum(known) / len(known) if len(known) == len(per_task) else None
        out[kind] = {**dict(zip(columns[0].tasks, per_task, strict=True)), "OP": op}
    for r in (r for c in columns for r in c.results if r.get("general")):
        for bench, g in r["general"].items():
            out["zero_shot"].setdefault(f"{bench} (general)", g["before"])  # the same items for every run
    return out


def table_rows(columns: list[MethodRuns]) -> list[tuple[str, list[list[float]]]]:
    """``(row name, per column the values over seeds)``: general ability after the stream and
    Delta R^G when runs scored it (Table 1's upper half), then tasks, OP, BWT, the costs (trainable
    share, wall time), and the routing rows of routed methods."""
    rows = []
    benchmarks = sorted({b for c in columns for r in c.results for b in (r.get("general") or {})})
    for bench in benchmarks:
        rows.append(
            (
                f"{bench} (general)",
                [[r["general"][bench]["after"] for r in c.results if r.get("general")] for c in columns],
            )
        )
    if benchmarks:
        rows.append(("Δ R^G", [[r["delta_RG"] for r in c.results if r.get("general")] for c in columns]))
    rows += [(task, [c.final(task) for c in columns]) for task in columns[0].tasks]
    rows.append(("OP", [c.values("OP") for c in columns]))
    rows.append(("BWT", [c.values("BWT") for c in columns]))
    share = [[100 * r["trainable_params"] / r["total_params"] for r in c.results] for c in columns]
    rows.append(("trainable %", share))
    rows.append(("wall minutes", [[r["wall_seconds"] / 60 for r in c.results] for c in columns]))
    routing = [c.routing() for c in columns]
    if any(diagonal for diagonal, _, _ in routing):
        rows.append(("diagonal mass", [diagonal for diagonal, _, _ in routing]))
        rows.append(("own expert after own task", [own for _, own, _ in routing]))
        for k, task in enumerate(columns[0].tasks):
            rows.append(
                (f"own expert at end: {task}", [[seed[k] for seed in end if k < len(seed)] for *_, end in routing])
            )
    return rows


def markdown(columns: list[MethodRuns], paired: dict[str, Any] | None = None) -> str:
    """Table 1: rows tasks, OP, BWT, trainable share, wall time, seeds; the floors, then one column per run;
    cells are mean ± 95% CI over seeds. With ``paired``, a second table of differences."""
    floors = floor_rows(columns)
    rows = []
    for name, values in table_rows(columns):
        floor_cells = [
            "–" if floors[k].get(name) is None else f"{floors[k][name]:.1f}" for k in ("majority", "zero_shot")
        ]
        digits = (
            2
            if name.startswith("own expert")
            else {"trainable %": 3, "OP": 2, "BWT": 2, "diagonal mass": 2}.get(name, 1)
        )
        rows.append([name, *floor_cells, *(_cell(v, digits) for v in values)])
    rows.append(["seeds", "", "", *(str(len(c.results)) for c in columns)])
    text = markdown_table(["task", "majority", "zero-shot", *(c.label for c in columns)], rows)
    text += (
        "\nCells: mean ± half-width of the 95% confidence interval over seeds (Student's t); one seed: the "
        "mean alone. majority / zero-shot: the floors (always the most frequent training answer; the base "
        "model without training) on the same items. Routed methods: diagonal mass = mean over tasks of the "
        "gate on their own expert at the end; own expert after own task = expert k's gate on task k right "
        "after task k, mean over every task (the first included, whose gate is 1 while it is the only expert); "
        "own expert at end: each task's gate on its own expert once the stream is done. wall minutes: each "
        "run's wall time as measured (on a shared or paused machine it is an upper bound). General rows (when "
        "runs scored general ability): the score after the stream, the base model's beside it as zero-shot, "
        "and Delta R^G (Eq. 6).\n"
    )
    if paired:
        text += "\n" + paired_markdown(paired)
    return text


def reference_label(columns: list[MethodRuns], run_dirs: list[Path], reference: str) -> str:
    """The column ``--reference`` names: a column label, or a run folder as given or by its name."""
    if reference in [c.label for c in columns]:
        return reference
    for column, run_dir in zip(columns, run_dirs, strict=True):
        if reference in (str(run_dir), run_dir.name, str(run_dir).rstrip("/")):
            return column.label
    return reference  # refused by paired_differences, which lists the columns


def paired_differences(columns: list[MethodRuns], reference: str, samples: int = 10_000) -> dict[str, Any]:
    """Every column's paired difference against ``reference`` in OP and BWT (bootstrap 95% CI),
    and in Delta R^G where both columns scored general ability."""
    labels = [c.label for c in columns]
    if reference not in labels:
        raise ValueError(
            f"--reference {reference!r} is neither a column nor a run folder; columns: {', '.join(labels)}"
        )
    ref = columns[labels.index(reference)]
    convention = ref.results[0].get("bwt_convention", "seed")
    ref_items, ref_general = ref.item_scores(), ref.general_item_scores()
    differences = {}
    for c in columns:
        if c.label == reference:
            continue
        differences[c.label] = paired_bootstrap(c.item_scores(), ref_items, convention, samples)
        general = c.general_item_scores()
        if general is not None and ref_general is not None:
            differences[c.label]["delta_RG"] = paired_bootstrap(general, ref_general, samples=samples)["OP"]
    return {"reference": reference, "bootstrap_samples": samples, "differences": differences}


def paired_markdown(paired: dict[str, Any]) -> str:
    def cell(d: dict[str, Any] | None) -> str:
        if d is None:
            return "–"
        mark = " *" if d["excludes_zero"] else ""
        return f"{d['diff']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]{mark}"

    general = any("delta_RG" in d for d in paired["differences"].values())
    rows = [
        [label, cell(d["OP"]), cell(d["BWT"]), *([cell(d.get("delta_RG"))] if general else []), str(d["OP"]["seeds"])]
        for label, d in paired["differences"].items()
    ]
    header = ["vs " + paired["reference"], "Δ OP [95% CI]", "Δ BWT [95% CI]"]
    header += ["Δ Delta R^G [95% CI]"] if general else []
    note = " (Delta R^G: over seed and general-ability item)" if general else ""
    return (
        markdown_table([*header, "paired seeds"], rows)
        + "\nPaired over (seed, test item), bootstrap with "
        + f"{paired['bootstrap_samples']:,} replicates{note}; * the interval excludes 0 (the difference is resolved).\n"
    )


def csv_text(columns: list[MethodRuns]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(
        ["row", "majority", "zero_shot", *(f"{c.label} {part}" for c in columns for part in ("mean", "ci95", "n"))]
    )
    floors = floor_rows(columns)
    for name, values in table_rows(columns):
        cells = ["" if floors[k].get(name) is None else f"{floors[k][name]:.4f}" for k in ("majority", "zero_shot")]
        for v in values:
            mean, half = mean_ci(v) if v else (None, None)
            cells += ["" if mean is None else f"{mean:.4f}", "" if half is None else f"{half:.4f}", len(v)]
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


def write_comparison(
    run_dirs: list[Path], out: Path, labels: list[str] | None = None, reference: str | None = None
) -> str:
    """Write ``compare.md``, ``compare.csv``, ``compare.json`` and ``r_matrices.png`` to ``out``."""
    columns = collect(run_dirs, labels)
    paired = paired_differences(columns, reference_label(columns, run_dirs, reference)) if reference else None
    text = markdown(columns, paired)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "compare.md", text)
    atomic_write_text(out / "compare.csv", csv_text(columns))
    atomic_write_json(
        out / "compare.json",
        {
            "runs": [str(p) for p in run_dirs],
            "columns": [c.label for c in columns],
            "rows": {name: dict(zip([c.label for c in columns], v, strict=True)) for name, v in table_rows(columns)},
            "ci95": {
                name: {c.label: (mean_ci(v)[1] if v else None) for c, v in zip(columns, values, strict=True)}
                for name, values in table_rows(columns)
            },
            "floors": dict(zip(["majority", "zero_shot"], floor_rows(columns).values(), strict=True)),
            "paired": paired,
        },
    )
    plot_r_matrices(columns, out / "r_matrices.png")
    return text


def seed_summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean, sd and 95% CI half-width over seeds of OP, BWT, FWT and every task's final score
    (``seeds.json``)."""
    column = MethodRuns(results[0]["method"], results)  # no folders: summaries only

    def stats(values: list[float]) -> dict[str, float | None]:
        if not values:
            return {"mean": None, "sd": None, "ci95": None}
        arr = np.array(values, dtype=float)
        sd = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
        return {"mean": float(arr.mean()), "sd": sd, "ci95": mean_ci(values)[1]}

    return {
        "method": column.label,
        "seeds": [r["seed"] for r in results],
        "OP": stats(column.values("OP")),
        "BWT": stats(column.values("BWT")),
        "FWT": stats(column.values("FWT")),
        "final": {task: stats(column.final(task)) for task in column.tasks},
    }
