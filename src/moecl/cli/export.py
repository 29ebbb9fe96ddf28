"""``moecl export``: a finished run's adapters as a standard PEFT LoRA folder."""

from __future__ import annotations

import argparse

from rich.console import Console

from moecl.config import config_from_options
from moecl.training.folder import RunFolder


def export_command(args: argparse.Namespace, console: Console) -> int:
    import torch

    from moecl.methods import METHODS
    from moecl.models.export import export_peft, merge_into_base, parse_gate
    from moecl.models.loading import load_model

    run = RunFolder(args.run_dir).finished()
    if args.out.exists() and any(args.out.iterdir()) and not args.force:
        raise ValueError(f"--out {args.out} is not empty; choose a new folder, or pass --force to write into it")
    config = config_from_options(run.options)
    if config.method != "pmoe":
        raise ValueError(f"{args.run_dir} is a {config.method} run; export takes PMoE runs (their experts)")
    results = run.results
    base, tokenizer = load_model(config.model, dtype=torch.float32)
    model = METHODS["pmoe"](config).load(base, run.final_checkpoint)
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
