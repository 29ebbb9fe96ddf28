"""``moecl run``: options generated from :class:`RunConfig`, so ``--help`` documents every
field with its default.

Precedence, lowest first: defaults < ``--preset`` < ``--config FILE.yaml`` < ``key=value``
overrides < explicit ``--option`` flags.
"""

from __future__ import annotations

import argparse
import textwrap
from dataclasses import MISSING, fields, replace
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from moecl.config import PRESETS, RunConfig, config_from_options, converter
from moecl.training.folder import RESUMABLE

_RUN_INTRO = """\
Train a method over a stream of tasks, evaluating after every task, and write the run folder
(config.json, results.json with the R matrix, OP, BWT, FWT, the floors (majority class and
base-model zero-shot) and router allocation, predictions/, checkpoints/, log.jsonl). Re-running
the same command resumes after the last completed task. With no options: PMoE on
SmolLM2-135M-Instruct over mini-trace's default stream (sst2, med-subject, arithmetic), scored
on the test split; every default was chosen on the validation split (--eval-split eval)."""

_RESUMING = textwrap.fill(
    "Resuming: the same command resumes an interrupted run (after a crash, Ctrl-C or a NaN stop). These "
    "options may change on resume, acting on the training still to come; each task's values are recorded "
    f"in results.json (train[t].options): {', '.join(RESUMABLE)}. Any other change is refused; --force "
    "starts the run over. After a NaN stop, lower --lr and run again.",
    width=95,
)

_RUN_EXAMPLES = """\
examples:
  moecl run                                   # the default job
  moecl run --preset smoke --out runs/smoke   # ~20 s, tiny random model, generated stream
  moecl run --eval-split eval --out runs/val  # score the validation split (choose settings there)
  moecl run --method seq-lora --replay 0.01     # a baseline: sequential LoRA with replay (LoRA-RE)
  moecl run --method moses --task-id inferred   # MoSEs, task inferred from the prompt (TaIL)
  moecl run --seeds 0,1,2 --out runs/pmoe       # one folder per seed + seeds.json (mean, sd)
  moecl run --config my.yaml lr=3e-4 replay=0.02
  moecl run --benchmark trace --data-dir TRACE/ --tasks C-STANCE,FOMC,ScienceQA
  accelerate launch --multi_gpu --num_processes 2 -m moecl.cli.main run --preset smoke micro_batch_size=4
      # data-parallel; on a CPU-only machine this starts 2 gloo processes
"""

RUN_DESCRIPTION = f"{_RUN_INTRO}\n\n{_RESUMING}\n\n{_RUN_EXAMPLES}"


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    for f in fields(RunConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else None
        help_text = f"{f.metadata['help']} (default: {default})".replace("%", "%%")  # argparse formats help
        if f.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(
                flag,
                type=converter(f.type),
                default=None,
                choices=[c for c in f.metadata["choices"] if c is not None] if "choices" in f.metadata else None,
                metavar=f.name.upper(),
                help=help_text,
            )
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="a named set of options: "
        + "; ".join(f"{k}: {', '.join(f'{a}={b}' for a, b in v.items())}" for k, v in PRESETS.items()),
    )
    parser.add_argument("--config", type=Path, help="YAML file of options (keys as in config.json)")
    parser.add_argument("--out", type=Path, help="run folder (default: runs/<method>-<model>-<benchmark>-s<seed>)")
    parser.add_argument(
        "--force",
        action="store_true",
        help="start over a run folder made with other options: removes only the files moecl wrote there (a folder "
        "that is not a moecl run is never written into)",
    )
    parser.add_argument(
        "--seeds",
        type=seed_list,
        metavar="S,S,...",
        help="run once per seed into OUT/seed-<s>/ and write OUT/seeds.json (mean and sd of OP, BWT, FWT and "
        "each task's final score); overrides --seed",
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="option overrides, YAML-typed values")


def resolve_config(args: argparse.Namespace) -> RunConfig:
    names = {f.name for f in fields(RunConfig)}
    values: dict[str, Any] = {"preset": args.preset} if args.preset else {}  # expanded first, lowest
    if args.config:
        try:
            loaded = yaml.safe_load(args.config.read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise ValueError(f"cannot read config file {args.config}: {err}") from err
        if not isinstance(loaded, dict):
            raise ValueError(f"{args.config}: expected a mapping of option: value")
        values.update(loaded)
    values.update(parse_overrides(args.overrides))
    values.update({n: getattr(args, n) for n in names if getattr(args, n, None) is not None})
    return config_from_options(values)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``key=value`` words (values YAML-typed) as a mapping; dashes in keys read as underscores."""
    values = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not key=value")
        try:
            values[key.strip().replace("-", "_")] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            problem = str(getattr(err, "problem", None) or err).splitlines()[0]
            raise ValueError(f"override {item!r}: the value is not valid YAML ({problem}); quote text values") from None
    return values


def seed_list(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--seeds takes comma-separated integers such as 0,1,2, got {text!r}") from err
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"--seeds needs distinct integers, got {text!r}")
    return seeds


def default_out(config: RunConfig, seeds: list[int] | None = None) -> Path:
    model = Path(config.model).name if "/" in config.model else config.model
    stem = f"{config.method}-{model}-{config.benchmark}"
    return Path("runs") / (stem if seeds else f"{stem}-s{config.seed}")


def run_command(args: argparse.Namespace, console: Console) -> int:
    from accelerate import PartialState

    from moecl.training.run import run  # imported here so `moecl --help` stays fast

    config = resolve_config(args)
    out = args.out or default_out(config, args.seeds)
    # Under `accelerate launch` one process reports. PartialState is asked only after a run has
    # set up the process group (Accelerator(cpu=True)); asked first, it would make each process
    # run alone.
    if not args.seeds:
        results = run(config, out, force=args.force, console=console)
        if PartialState().is_main_process:
            console.print(summary_line(results))
            console.print(f"run folder: {out}")
        return 0
    from moecl.io import atomic_write_json
    from moecl.reports.compare import seed_summary

    per_seed = []
    for seed in args.seeds:
        console.rule(f"seed {seed}")
        per_seed.append(run(replace(config, seed=seed), out / f"seed-{seed}", force=args.force, console=console))
        if PartialState().is_main_process:
            console.print(summary_line(per_seed[-1]))
    if PartialState().is_main_process:
        summary = seed_summary(per_seed)
        atomic_write_json(out / "seeds.json", summary)
        op, bwt = summary["OP"], summary["BWT"]
        bwt_text = "n/a" if bwt["mean"] is None else f"{bwt['mean']:.2f} ± {bwt['sd']:.2f}"
        console.print(f"over seeds {args.seeds}: OP {op['mean']:.2f} ± {op['sd']:.2f}  BWT {bwt_text}")
        console.print(f"run folders: {out}/seed-*; summary: {out / 'seeds.json'}")
    return 0


def summary_line(results: dict[str, Any]) -> str:
    def fmt(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.2f}"

    return (
        f"OP {results['OP']:.2f}  BWT {fmt(results['BWT'])} ({results['bwt_convention']})  "
        f"FWT {fmt(results.get('FWT'))}  trainable {results['trainable_params']:,} of "
        f"{results['total_params']:,}  {results['wall_seconds']:.0f} s"
    )
