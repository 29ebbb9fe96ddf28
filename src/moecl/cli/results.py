"""Commands that read finished run folders: ``moecl show``, ``compare``, ``report`` and ``route``."""

from __future__ import annotations

import argparse

from rich.console import Console

from moecl.cli.run import summary_line
from moecl.config import config_from_options
from moecl.training.folder import RunFolder


def show_command(args: argparse.Namespace, console: Console) -> int:
    from moecl.data.trace import Task
    from moecl.reports.console import allocation_table, r_table

    results = RunFolder(args.run_dir).finished().results
    tasks = [Task(n, results["metrics"][n], [], []) for n in results["tasks"]]
    console.print(f"{results['method']} on {results['model']}, {results['benchmark']}, seed {results['seed']}")
    title = f"R (score on task, after training task; {results.get('eval_split', 'test')} split)"
    console.print(r_table(tasks, results["R"], title, results.get("phases"), results.get("floors")))
    if results.get("router_allocation_phases"):
        for t, matrix in enumerate(results["router_allocation_phases"]):
            allocation = {
                "matrix": matrix,
                "entropy": results["router_entropy_phases"][t],
                "diagonal_mass": results["diagonal_mass_phases"][t],
            }
            console.print(allocation_table(tasks, allocation, f"router allocation after phase {t + 1}"))
        from moecl.evaluation.routing import own_expert_gates

        gates = own_expert_gates(results["router_allocation_phases"])
        console.print(
            "own-expert gate per task (right after its own task -> at the end): "
            + ", ".join(
                f"{n} {a:.2f} -> {b:.2f}"
                for n, a, b in zip(results["tasks"], gates["after_own_task"], gates["at_end"], strict=False)
            )
        )
    elif results.get("router_allocation"):  # runs made before per-phase allocation
        console.print("router allocation (task x expert): ")
        for name, row in zip(results["tasks"], results["router_allocation"], strict=True):
            console.print(f"  {name:<16} " + " ".join(f"{x:.2f}" for x in row))
    if results.get("general"):
        from moecl.reports.console import general_table

        console.print(general_table(results, f"general ability ({results.get('general_suite')} suite)"))
    if results.get("capacity"):  # MoSEs
        console.print("adapter elements after each task: " + ", ".join(f"{c:,}" for c in results["capacity"]))
        accuracy = results["task_inference"]["accuracy"]
        console.print(
            "task inferred correctly: "
            + ", ".join(f"{n} {a:.0%}" for n, a in zip(results["tasks"], accuracy, strict=True))
        )
    console.print(summary_line(results))
    return 0


def compare_command(args: argparse.Namespace, console: Console) -> int:
    from moecl.reports.compare import write_comparison

    labels = [x.strip() for x in args.labels.split(",")] if args.labels else None
    text = write_comparison(args.run_dirs, args.out, labels, args.reference)
    console.print(text, markup=False, highlight=False, soft_wrap=True)
    console.print(f"wrote {args.out}/compare.md, compare.csv, compare.json, r_matrices.png")
    return 0


def report_command(args: argparse.Namespace, console: Console) -> int:
    from moecl.reports.report import write_report

    out = write_report(args.run_dir, args.out)
    console.print(f"wrote {out}")
    return 0


def route_command(args: argparse.Namespace, console: Console) -> int:
    import torch

    from moecl.io import atomic_write_text
    from moecl.methods import METHODS
    from moecl.models.loading import load_model
    from moecl.reports.route import route_html, route_text, token_routes

    run = RunFolder(args.run_dir).finished()
    config = config_from_options(run.options)
    if config.method != "pmoe":
        raise ValueError(f"{args.run_dir} is a {config.method} run; the route view needs PMoE's router")
    text = args.text if args.text is not None else args.file.read_text(encoding="utf-8")
    tasks = run.results["tasks"]
    base, tokenizer = load_model(config.model, dtype=torch.float32)
    model = METHODS["pmoe"](config).load(base, run.final_checkpoint).eval()
    pieces, probs = token_routes(model, tokenizer, text)
    console.print(route_text(pieces, probs, tasks[: probs.shape[-1]]))
    out = args.out or args.run_dir / "route.html"
    title = f"Routing of {config.method} on {config.model}, seed {config.seed} ({args.run_dir})"
    atomic_write_text(out, route_html(pieces, probs, tasks[: probs.shape[-1]], title))
    console.print(f"\nwrote {out}")
    return 0
