"""``moecl run`` and ``moecl show``: options generated from :class:`RunConfig`, so ``--help``
documents every field with its default.

Precedence, lowest first: defaults < ``--preset`` < ``--config FILE.yaml`` < ``key=value``
overrides < explicit ``--option`` flags.
"""

from __future__ import annotations

import argparse
import textwrap
import time
from dataclasses import MISSING, fields, replace
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from moecl.io import read_json
from moecl.training.config import PRESETS, RunConfig, config_from_options, converter
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


def compare_command(args: argparse.Namespace, console: Console) -> int:
    from moecl.reports.compare import write_comparison

    labels = [x.strip() for x in args.labels.split(",")] if args.labels else None
    text = write_comparison(args.run_dirs, args.out, labels, args.reference)
    console.print(text, markup=False, highlight=False, soft_wrap=True)
    console.print(f"wrote {args.out}/compare.md, compare.csv, compare.json, r_matrices.png")
    return 0


def show_command(args: argparse.Namespace, console: Console) -> int:
    from moecl.data.trace import Task
    from moecl.training.run import allocation_table, r_table

    path = args.run_dir / "results.json"
    if not path.is_file():
        state = args.run_dir / "state.json"
        if not state.is_file():
            raise ValueError(f"{args.run_dir} has neither results.json nor state.json: not a moecl run folder")
        raise ValueError(
            f"{args.run_dir} is unfinished ({read_json(state)['completed']} tasks done); "
            "re-run its command to resume it"
        )
    results = read_json(path)
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
        from moecl.training.run import general_table

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


def study_command(args: argparse.Namespace, console: Console) -> int:
    from moecl.study import load_study, run_study

    study = load_study(args.file, parse_overrides(args.overrides), args.seeds, args.only)
    out = args.out or Path("runs") / args.file.stem
    text = run_study(study, out, force=args.force, console=console)
    console.print(text, markup=False, highlight=False, soft_wrap=True)
    console.print(f"wrote {out}/compare.md, compare.csv, compare.json, r_matrices.png, study.json")
    return 0


def general_command(args: argparse.Namespace, console: Console) -> int:
    import torch
    from rich.table import Table

    from moecl.evaluation.general import BENCHMARKS, base_scores, paired, score_suite, suite_note
    from moecl.io import atomic_write_json
    from moecl.methods import METHODS
    from moecl.models.loading import load_model, resolve_dtype
    from moecl.training.run import general_table

    limit = args.limit or None
    note = suite_note(args.suite)
    if note:
        console.print(f"note: {note}", soft_wrap=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = None
    if args.run is not None:
        state_path = args.run / "state.json"
        if not (args.run / "results.json").is_file() or not state_path.is_file():
            raise ValueError(f"{args.run} is not a finished moecl run folder (no results.json); finish it first")
        config = config_from_options(read_json(args.run / "config.json"))
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
        done = read_json(args.run / "state.json")["completed"]
        model = method.load(base, args.run / "checkpoints" / f"task-{done - 1}").to(device)
        tasks = read_json(args.run / "results.json")["tasks"]
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


def export_command(args: argparse.Namespace, console: Console) -> int:
    import torch

    from moecl.methods import METHODS
    from moecl.models.export import export_peft, merge_into_base, parse_gate
    from moecl.models.loading import load_model

    results_path = args.run_dir / "results.json"
    if not results_path.is_file():
        raise ValueError(f"{args.run_dir} is not a finished moecl run folder (no results.json)")
    if args.out.exists() and any(args.out.iterdir()) and not args.force:
        raise ValueError(f"--out {args.out} is not empty; choose a new folder, or pass --force to write into it")
    config = config_from_options(read_json(args.run_dir / "config.json"))
    if config.method != "pmoe":
        raise ValueError(f"{args.run_dir} is a {config.method} run; export takes PMoE runs (their experts)")
    results = read_json(results_path)
    done = read_json(args.run_dir / "state.json")["completed"]
    base, tokenizer = load_model(config.model, dtype=torch.float32)
    model = METHODS["pmoe"](config).load(base, args.run_dir / "checkpoints" / f"task-{done - 1}")
    n = model.num_experts
    if args.expert is not None:
        if not 1 <= args.expert <= n:
            raise ValueError(f"--expert {args.expert}: the run has experts 1..{n}")
        gate, what = torch.nn.functional.one_hot(torch.tensor(args.expert - 1), n).float(), f"expert {args.expert}"
    elif args.task is not None:
        if args.task not in results["tasks"]:
            raise ValueError(f"--task {args.task!r} is not one of the run's tasks {results['tasks']}")
        row = results["router_allocation"][results["tasks"].index(args.task)]
        shares = ", ".join(f"{g:.2f}" for g in row)
        gate, what = torch.tensor(row) / sum(row), f"the router's mean gate on {args.task} ({shares})"
    else:
        gate, what = parse_gate(args.gate, n), f"the gate {args.gate}"
    if args.merged:
        merged = merge_into_base(model, gate)
        merged.save_pretrained(args.out)
        tokenizer.save_pretrained(args.out)
        console.print(f"wrote {args.out}: {config.model} with the shallow LoRA and {what} merged into its weights")
    else:
        export_peft(model, gate, args.out, base_name=config.model)
        tokenizer.save_pretrained(args.out)
        console.print(
            f"wrote {args.out}: a PEFT LoRA adapter (shallow LoRA + {what}); load it with "
            f"peft.PeftModel.from_pretrained(<{config.model}>, '{args.out}')"
        )
    return 0


def route_command(args: argparse.Namespace, console: Console) -> int:
    import torch

    from moecl.io import atomic_write_text
    from moecl.methods import METHODS
    from moecl.models.loading import load_model
    from moecl.reports.route import route_html, route_text, token_routes

    if not (args.run_dir / "results.json").is_file():
        raise ValueError(f"{args.run_dir} is not a finished moecl run folder (no results.json)")
    config = config_from_options(read_json(args.run_dir / "config.json"))
    if config.method != "pmoe":
        raise ValueError(f"{args.run_dir} is a {config.method} run; the route view needs PMoE's router")
    text = args.text if args.text is not None else args.file.read_text(encoding="utf-8")
    tasks = read_json(args.run_dir / "results.json")["tasks"]
    done = read_json(args.run_dir / "state.json")["completed"]
    base, tokenizer = load_model(config.model, dtype=torch.float32)
    model = METHODS["pmoe"](config).load(base, args.run_dir / "checkpoints" / f"task-{done - 1}").eval()
    pieces, probs = token_routes(model, tokenizer, text)
    console.print(route_text(pieces, probs, tasks[: probs.shape[-1]]))
    out = args.out or args.run_dir / "route.html"
    title = f"Routing of {config.method} on {config.model}, seed {config.seed} ({args.run_dir})"
    atomic_write_text(out, route_html(pieces, probs, tasks[: probs.shape[-1]], title))
    console.print(f"\nwrote {out}")
    return 0


def report_command(args: argparse.Namespace, console: Console) -> int:
    from moecl.reports.report import write_report

    out = write_report(args.run_dir, args.out)
    console.print(f"wrote {out}")
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
