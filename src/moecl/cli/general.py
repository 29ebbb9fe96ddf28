"""``moecl general``: general ability of a model, or of a finished run, through lm-evaluation-harness."""

from __future__ import annotations

import argparse
import time
from typing import Any

from rich.console import Console

from moecl.config import config_from_options
from moecl.training.folder import RunFolder


def general_command(args: argparse.Namespace, console: Console) -> int:
    import torch
    from rich.table import Table

    from moecl.evaluation.general import BENCHMARKS, base_scores, paired, score_suite, suite_note
    from moecl.io import atomic_write_json
    from moecl.methods import METHODS
    from moecl.models.loading import load_model, resolve_dtype
    from moecl.reports.console import general_table

    limit = args.limit or None
    note = suite_note(args.suite)
    if note:
        console.print(f"note: {note}", soft_wrap=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = run = None
    if args.run is not None:
        run = RunFolder(args.run).finished()
        config = config_from_options(run.options)
    model_name = config.model if config else args.model
    dtype = resolve_dtype(config.dtype if config else "auto", device)
    base, tokenizer = load_model(model_name, dtype=dtype)
    base.to(device)
    start = time.perf_counter()
    before = base_scores(model_name, base, tokenizer, args.suite, limit, dtype)  # cached per model + items
    seconds = time.perf_counter() - start
    record: dict[str, Any] = {"model": model_name, "suite": args.suite, "limit": limit, "note": note}
    if config is None:
        table = Table(title=f"{model_name} on the {args.suite} suite ({seconds:.0f} s, or cached)")
        for column in ("benchmark", "shots", "metric", "n", "score ± SE", "chance"):
            table.add_column(column, justify="left" if column in ("benchmark", "metric") else "right")
        for name, s in before.items():
            chance = BENCHMARKS[name].chance
            shown = "–" if chance is None else f"{100 * chance:.0f}"
            shots = str(BENCHMARKS[name].shots)
            table.add_row(name, shots, s.metric, str(s.n), f"{s.score:.1f} ± {s.se:.1f}", shown)
        console.print(table)
        record["scores"] = {n: s.to_json() for n, s in before.items()}
        record["seconds"] = round(seconds, 1)
    else:
        method = METHODS[config.method](config)
        model = method.load(base, run.final_checkpoint).to(device)
        tasks = run.results["tasks"]
        scored, note = method.general_model(model, len(tasks) - 1)
        start = time.perf_counter()
        after = score_suite(scored, base, tokenizer, args.suite, limit, args.batch_size)
        record.update(paired(before, after), general_scored_with=note, seconds=round(time.perf_counter() - start, 1))
        console.print(general_table(record, f"{args.run}: general ability ({args.suite} suite)"))
    if args.out:
        path = args.out if args.out.suffix == ".json" else args.out / "general.json"  # a folder, as elsewhere
        atomic_write_json(path, record)
        console.print(f"wrote {path}")
    return 0
