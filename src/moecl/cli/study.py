"""Commands that run many runs: ``moecl study`` (a YAML file of runs x seeds) and ``moecl sweep`` (one option)."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from moecl.cli.run import parse_overrides


def study_command(args: argparse.Namespace, console: Console) -> int:
    from moecl.study import load_study, run_study

    study = load_study(args.file, parse_overrides(args.overrides), args.seeds, args.only)
    out = args.out or Path("runs") / args.file.stem
    text = run_study(study, out, force=args.force, console=console)
    console.print(text, markup=False, highlight=False, soft_wrap=True)
    console.print(f"wrote {out}/compare.md, compare.csv, compare.json, r_matrices.png, study.json")
    return 0


def sweep_command(args: argparse.Namespace, console: Console) -> int:
    from moecl.reports.compare import load_results
    from moecl.reports.sweep import write_sweep
    from moecl.study import run_study, slug, sweep_study

    name, study = sweep_study(args.sweep, parse_overrides(args.overrides), args.seeds or [0])
    out = args.out or Path("runs") / slug(f"sweep-{name}")
    text = run_study(study, out, force=args.force, console=console)
    columns = [(e.label, [r for _, r in load_results(out / e.folder)]) for e in study.entries]
    write_sweep(name, columns, out)
    console.print(text, markup=False, highlight=False, soft_wrap=True)
    console.print(f"wrote {out}/sweep.png, sweep.json, compare.md")
    return 0
