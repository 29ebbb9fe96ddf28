"""The tables a run prints to the console (and ``moecl show`` prints again from results.json):
``R`` with its floors, the router's allocation after a phase, and general ability."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from moecl.data.trace import Task


def r_table(
    tasks: list[Task],
    R: list[list[float | None]],
    title: str,
    phases: list[list[int]] | None = None,
    floors: dict[str, dict[str, float | None]] | None = None,
) -> Table:
    """The R matrix so far as a rich table: rows = after task t (or phase), columns = tasks, then OP
    over the tasks trained so far; ``floors`` adds the majority-class and zero-shot rows below."""
    table = Table(title=title, show_lines=False)
    table.add_column("after \\ on")
    for task in tasks:
        table.add_column(task.name, justify="right")
    table.add_column("OP", justify="right")
    phases = phases or [[i] for i in range(len(tasks))]
    for t, row in enumerate(R):
        cells = ["-" if v is None else f"{v:.1f}" for v in row]
        seen = [v for v in row[: phases[t][-1] + 1] if v is not None]
        label = f"{t + 1}. {tasks[phases[t][0]].name}" if len(phases[t]) == 1 else f"{t + 1}. all tasks jointly"
        table.add_row(label, *cells, f"{sum(seen) / len(seen):.1f}")
    for kind, label in (("majority", "floor: majority"), ("zero_shot", "floor: zero-shot")):
        values = [(floors or {}).get(t.name, {}).get(kind) for t in tasks]
        if floors and all(v is not None for v in values):
            table.add_row(
                f"[dim]{label}[/]", *(f"[dim]{v:.1f}[/]" for v in values), f"[dim]{sum(values) / len(values):.1f}[/]"
            )
    return table


def general_table(general: dict[str, Any], title: str) -> Table:
    """Before / after / difference per benchmark with standard errors, and Delta R^G (Eq. 6)."""
    table = Table(
        title=title,
        caption=f"scored with {general['general_scored_with']}" if general.get("general_scored_with") else None,
    )
    for column in ("benchmark", "n", "before", "after", "Δ (paired SE)"):
        table.add_column(column, justify="left" if column == "benchmark" else "right")
    for name, g in general["general"].items():
        table.add_row(
            f"{name} ({g['metric']})",
            str(g["n"]),
            f"{g['before']:.1f} ± {g['se_before']:.1f}",
            f"{g['after']:.1f} ± {g['se_after']:.1f}",
            f"{g['delta']:+.1f} ({g['se_delta']:.1f})",
        )
    table.add_row("Δ R^G", "", "", "", f"{general['delta_RG']:+.2f} ({general['delta_RG_se']:.2f})")
    return table


def allocation_table(tasks: list[Task], allocation: dict[str, Any], title: str) -> Table:
    """One phase's allocation matrix (task x expert), its per-token gate entropy and diagonal mass."""
    matrix = allocation["matrix"]
    table = Table(title=title, caption=f"diagonal mass {allocation['diagonal_mass']:.2f}")
    table.add_column("task \\ expert")
    for k in range(len(matrix[-1])):
        table.add_column(f"E{k + 1}", justify="right")
    table.add_column("entropy", justify="right")
    for k, (row, entropy) in enumerate(zip(matrix, allocation["entropy"], strict=True)):
        cells = [f"[bold]{v:.2f}[/]" if j == k else f"{v:.2f}" for j, v in enumerate(row)]
        table.add_row(tasks[k].name, *cells, f"{entropy:.2f}")
    return table
