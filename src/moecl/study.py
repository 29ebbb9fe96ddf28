"""A study: several methods (each a set of run options) x seeds, one table (``moecl study``).

A study file is YAML::

    seeds: [0, 1, 2]              # every entry runs once per seed
    reference: LoRA-RE            # optional: paired differences against this entry's label
    common: {eval_split: test}    # optional: options every entry shares
    runs:
      - label: PMoE               # the column's name, and its folder's (slugged)
        options: {method: pmoe}   # `moecl run` options (keys as in config.json; `preset` too)
      - label: LoRA-RE
        options: {method: seq-lora, replay: 0.01}

Each (entry, seed) runs into ``OUT/<slug>/seed-<s>/`` through :func:`moecl.training.run.run`, so
a killed study run again skips finished runs (their ``results.json`` is there) and the
interrupted one resumes after its last completed task. When all are done the study writes
``OUT/<slug>/seeds.json`` per entry, ``OUT/study.json`` (the resolved file, wall time per run)
and the comparison (``compare.md``, ``compare.csv``, ``compare.json``, ``r_matrices.png``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from moecl.config import RunConfig, config_from_options
from moecl.io import atomic_write_json
from moecl.reports.progress import make_progress


@dataclass
class StudyEntry:
    label: str
    config: RunConfig

    @property
    def folder(self) -> str:
        return slug(self.label)


@dataclass
class Study:
    entries: list[StudyEntry]
    seeds: list[int]
    reference: str | None = None

    def runs(self) -> list[tuple[StudyEntry, int]]:
        return [(entry, seed) for entry in self.entries for seed in self.seeds]


def slug(label: str) -> str:
    """A folder name for a label: lower case, runs of other characters as one ``-``."""
    return re.sub(r"[^a-z0-9.+]+", "-", label.lower()).strip("-") or "run"


def load_study(
    path: Path,
    overrides: dict[str, Any] | None = None,
    seeds: list[int] | None = None,
    only: list[str] | None = None,
) -> Study:
    """Read and validate a study file; errors name the file, the entry and the field.

    ``overrides`` (options given on the command line) win over the file's; ``seeds`` over its seeds.
    ``only`` keeps these labels (in the file's order): part of a long study now, the rest later
    into the same folder; the reference's paired differences need the reference among them.
    """
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"cannot read study file {path}: {err}") from err
    if not isinstance(spec, dict) or not isinstance(spec.get("runs"), list) or not spec["runs"]:
        raise ValueError(f"{path}: expected a mapping with a non-empty list `runs:` of {{label, options}} entries")
    unknown = sorted(set(spec) - {"seeds", "reference", "common", "runs"})
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {', '.join(unknown)}; a study has seeds, reference, common, runs")
    seeds = seeds or spec.get("seeds") or [0]
    if not isinstance(seeds, list) or not all(isinstance(s, int) for s in seeds) or len(set(seeds)) != len(seeds):
        raise ValueError(f"{path}: `seeds` must be a list of distinct integers, got {seeds!r}")
    common = spec.get("common") or {}
    if not isinstance(common, dict):
        raise ValueError(f"{path}: `common` must be a mapping of option: value")
    entries = []
    for i, raw in enumerate(spec["runs"]):
        where = f"{path}: runs[{i}]"
        if not isinstance(raw, dict) or not isinstance(raw.get("label"), str) or not raw["label"].strip():
            raise ValueError(f"{where}: each entry needs a `label` (text) and `options` (a mapping)")
        options = raw.get("options") or {}
        if not isinstance(options, dict):
            raise ValueError(f"{where} ({raw['label']}): `options` must be a mapping of option: value")
        if "seed" in {**common, **options}:
            raise ValueError(f"{where} ({raw['label']}): set seeds with the study's `seeds:`, not an option")
        try:
            config = config_from_options({**common, **options, **(overrides or {})})
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where} ({raw['label']}): {err}") from err
        entries.append(StudyEntry(raw["label"].strip(), config))
    labels = [e.label for e in entries]
    folders = [e.folder for e in entries]
    if len(set(folders)) != len(folders):
        raise ValueError(f"{path}: two entries share a label (or its folder name): {labels}")
    reference = spec.get("reference")
    if reference is not None and reference not in labels:
        raise ValueError(f"{path}: reference {reference!r} is not one of the labels {labels}")
    if only:
        missing = [label for label in only if label not in labels]
        if missing:
            raise ValueError(f"{path}: --only names {missing}, not labels of this study; its labels are {labels}")
        entries = [e for e in entries if e.label in only]
        reference = reference if reference in only else None
    return Study(entries, list(seeds), reference)


def run_study(study: Study, out: Path, force: bool = False, console: Console | None = None) -> str:
    """Run every (entry, seed) not finished yet, then write the summaries and the comparison;
    returns the comparison's Markdown."""
    from moecl.reports.compare import load_results, seed_summary, write_comparison
    from moecl.training.run import run

    console = console or Console()
    out.mkdir(parents=True, exist_ok=True)
    walls: dict[str, float] = {}
    columns = (
        TextColumn("{task.description:<36}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with make_progress(console, *columns) as progress:
        overall = progress.add_task("study", total=len(study.runs()))
        for entry, seed in study.runs():
            folder = out / entry.folder / f"seed-{seed}"
            name = f"{entry.label} seed {seed}"
            if (folder / "results.json").is_file() and not force:
                results = load_results(folder)[0][1]
                console.print(f"[dim]{name}: finished earlier, skipped[/]")
            else:
                progress.update(overall, description=f"study: {name}")
                results = run(replace(entry.config, seed=seed), folder, force=force, console=console, progress=progress)
                console.print(f"{name}: OP {results['OP']:.2f}, {results['wall_seconds']:.0f} s")
            walls[f"{entry.folder}/seed-{seed}"] = results["wall_seconds"]
            progress.advance(overall)
    for entry in study.entries:
        per_seed = [r for _, r in load_results(out / entry.folder)]
        atomic_write_json(out / entry.folder / "seeds.json", {**seed_summary(per_seed), "label": entry.label})
    atomic_write_json(
        out / "study.json",
        {
            "seeds": study.seeds,
            "reference": study.reference,
            "runs": [{"label": e.label, "folder": e.folder, "config": e.config.to_dict()} for e in study.entries],
            "wall_seconds": walls,
            "total_wall_seconds": round(sum(walls.values()), 1),
        },
    )
    return write_comparison(
        [out / e.folder for e in study.entries], out, [e.label for e in study.entries], study.reference
    )


def sweep_study(spec: str, overrides: dict[str, Any], seeds: list[int]) -> tuple[str, Study]:
    """``"tau=0.25,0.5"`` -> the option's name and a study of one entry per value (labels
    ``tau=0.25``...), every other option from ``overrides``."""
    name, sep, values = spec.partition("=")
    name = name.strip().replace("-", "_")
    if not sep or not values.strip():
        raise ValueError(f"sweep {spec!r}: write OPTION=V1,V2,... (e.g. tau=0.25,0.5,0.75,0.9)")
    entries = []
    for value in (v.strip() for v in values.split(",") if v.strip()):
        try:
            config = config_from_options({**overrides, name: value})
        except (TypeError, ValueError) as err:
            raise ValueError(f"sweep {spec!r}: {name}={value}: {err}") from err
        entries.append(StudyEntry(f"{name}={value}", config))
    return name, Study(entries, seeds)
