"""One self-contained HTML page per run: everything ``results.json`` and ``log.jsonl`` say, with
the figures a reader would rather look at than read (images inlined, no scripts, no network)."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from moecl.evaluation.routing import own_expert_gates
from moecl.io import read_json
from moecl.reports.plots import plot_allocation_phases, plt

STYLE = (
    "body{font-family:sans-serif;max-width:64em;margin:2em auto;color:#222}"
    "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
    "th:first-child,td:first-child{text-align:left}.floor{color:#888}img{max-width:100%}"
    "pre{background:#f6f6f6;padding:1em;overflow-x:auto}"
)


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight", dpi=110)
    plt.close(fig)
    return f'<img alt="figure" src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def _table(header: list[str], rows: list[list[Any]], classes: list[str] | None = None) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join(
        f"<tr class='{(classes or [''] * len(rows))[i]}'>"
        + "".join(f"<td>{html.escape(str(c))}</td>" for c in row)
        + "</tr>"
        for i, row in enumerate(rows)
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def r_section(results: dict[str, Any]) -> str:
    tasks = results["tasks"]
    rows = [[f"after {t + 1}", *(_fmt(v) for v in row)] for t, row in enumerate(results["R"])]
    classes = [""] * len(rows)
    for kind in ("majority", "zero_shot"):
        floors = results.get("floors") or {}
        if floors:
            rows.append([f"floor: {kind.replace('_', '-')}", *(_fmt(floors[t][kind]) for t in tasks)])
            classes.append("floor")
    summary = f"OP {_fmt(results['OP'], 2)} · BWT {_fmt(results.get('BWT'), 2)} ({results.get('bwt_convention')})"
    split = results.get("eval_split", "test")
    return f"<h2>R ({split} split)</h2>{_table(['', *tasks], rows, classes)}<p><b>{summary}</b></p>"


def loss_section(run_dir: Path) -> str:
    path = run_dir / "log.jsonl"
    if not path.is_file():
        return ""
    steps = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not steps:
        return ""
    fig, ax = plt.subplots(figsize=(7, 3))
    x, offset = 0, 0
    for task in sorted({s["task"] for s in steps}):
        losses = [s["loss"] for s in steps if s["task"] == task]
        ax.plot(range(offset, offset + len(losses)), losses, label=f"task {task + 1}", linewidth=1)
        offset += len(losses)
        x = offset
    ax.set_xlabel(f"optimizer step (all tasks, {x})")
    ax.set_ylabel("training loss")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.4)
    section = f"<h2>Training loss</h2>{_png(fig)}"
    if any("gate_newest" in s for s in steps):
        fig, ax = plt.subplots(figsize=(7, 2.4))
        ax.plot([s.get("gate_newest_own", float("nan")) for s in steps], linewidth=1)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("newest expert's gate")
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.4)
        section += f"<h3>The newest expert's gate on its own task while it trains</h3>{_png(fig)}"
    return section


def routing_section(results: dict[str, Any]) -> str:
    phases = results.get("router_allocation_phases")
    if not phases:
        return ""
    buffer = io.BytesIO()
    plot_allocation_phases(phases, results["tasks"], buffer)
    image = base64.b64encode(buffer.getvalue()).decode()
    mass = ", ".join(_fmt(m, 2) for m in results["diagonal_mass_phases"])
    gates = own_expert_gates(phases)
    own = ", ".join(
        f"{html.escape(n)} {_fmt(a, 2)} &rarr; {_fmt(b, 2)}"
        for n, a, b in zip(results["tasks"], gates["after_own_task"], gates["at_end"], strict=False)
    )
    return (
        f"<h2>Router allocation after each task</h2><img alt='allocation' src='data:image/png;base64,{image}'>"
        f"<p>Diagonal mass after each task: {mass}</p>"
        f"<p>Each task's gate on its own expert, right after its own task &rarr; at the end: {own}</p>"
    )


def general_section(results: dict[str, Any]) -> str:
    general = results.get("general")
    if not general:
        return ""
    rows = [
        [
            name,
            g["n"],
            f"{g['before']:.1f} ± {g['se_before']:.1f}",
            f"{g['after']:.1f} ± {g['se_after']:.1f}",
            f"{g['delta']:+.1f} ({g['se_delta']:.1f})",
        ]
        for name, g in general.items()
    ]
    rows.append(["Δ R^G", "", "", "", f"{results['delta_RG']:+.2f} ({results['delta_RG_se']:.2f})"])
    note = results.get("general_scored_with")
    return (
        f"<h2>General ability ({html.escape(str(results.get('general_suite')))} suite)</h2>"
        + _table(["benchmark", "n", "before", "after", "Δ (paired SE)"], rows)
        + (f"<p>Scored with {html.escape(note)}.</p>" if note else "")
    )


def moses_section(results: dict[str, Any], run_dir: Path) -> str:
    if not results.get("capacity"):
        return ""
    text = "<h2>MoSEs</h2><p>Adapter elements after each task: " + ", ".join(f"{c:,}" for c in results["capacity"])
    text += "</p>"
    transfer = run_dir / "transfer.png"
    if transfer.is_file():
        text += f"<img alt='transfer' src='data:image/png;base64,{base64.b64encode(transfer.read_bytes()).decode()}'>"
    return text


def write_report(run_dir: Path, out: Path | None = None) -> Path:
    """Write ``RUN_DIR/report.html`` (or ``out``) for a finished run."""
    path = run_dir / "results.json"
    if not path.is_file():
        raise ValueError(f"{run_dir} has no results.json: not a finished moecl run folder")
    results = read_json(path)
    config = read_json(run_dir / "config.json") if (run_dir / "config.json").is_file() else {}
    title = f"{results['method']} on {results['model']}, {results['benchmark']}, seed {results['seed']}"
    body = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p>{results['trainable_params']:,} trainable of {results['total_params']:,} parameters · "
        f"{results['wall_seconds']:.0f} s</p>",
        r_section(results),
        general_section(results),
        routing_section(results),
        loss_section(run_dir),
        moses_section(results, run_dir),
        f"<h2>Configuration</h2><pre>{html.escape(json.dumps(config, indent=1))}</pre>",
    ]
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>"
    )
    out = out or run_dir / "report.html"
    out.write_text(page, encoding="utf-8")
    return out
