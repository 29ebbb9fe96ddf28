"""TRACE's on-disk format and its loader (SPEC §5).

A benchmark root holds one folder per task, each with ``train.json``, ``test.json`` and
optionally ``eval.json``: JSON lists of ``{"prompt": str, "answer": str}``. Streams that moecl
builds (``smoke``, ``mini-trace``) are written in exactly this format plus a ``moecl_tasks.json``
at the root that names the task order and each task's metric, so one loader reads them all and
real TRACE data drops in unchanged.

Every file is validated before anything trains: a bad file stops the run with a
:class:`DataError` that names the file, the record index and the field.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

TRACE_ORDER = [
    "C-STANCE",
    "FOMC",
    "MeetingBank",
    "Py150",
    "ScienceQA",
    "NumGLUE-cm",
    "NumGLUE-ds",
    "20Minuten",
]
TRACE_METRICS = {
    "C-STANCE": "accuracy",
    "FOMC": "accuracy",
    "MeetingBank": "rouge_l",
    "Py150": "edit_similarity",
    "ScienceQA": "first_char",
    "NumGLUE-cm": "accuracy",
    "NumGLUE-ds": "accuracy",
    "20Minuten": "sari",
}
MANIFEST = "moecl_tasks.json"


class DataError(ValueError):
    """A benchmark file that cannot be used; the message says where and what to fix."""


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str


@dataclass
class Task:
    """One task of the stream: its metric and its splits (``eval`` may be empty)."""

    name: str
    metric: str
    train: list[Example]
    test: list[Example]
    eval: list[Example] = field(default_factory=list)

    def split(self, name: str) -> list[Example]:
        """``train``, ``eval`` or ``test`` by name (``RunConfig.eval_split`` names the scored one)."""
        if name not in ("train", "eval", "test"):
            raise ValueError(f"no split {name!r}; splits are train, eval, test")
        return getattr(self, name)


def read_split(path: Path) -> list[Example]:
    """Read and validate one split file; raise :class:`DataError` naming file, record and field."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 (byte {err.start}); re-save the file as UTF-8") from err
    try:
        records = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from err
    if not isinstance(records, list):
        raise DataError(
            f'{path}: expected a JSON list of {{"prompt", "answer"}} records, got a {type(records).__name__}'
        )
    if not records:
        raise DataError(f"{path}: the split is empty; every task needs at least one record")
    examples = []
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise DataError(
                f"{path}: record {i} is a {type(record).__name__}, expected an object with "
                "string fields 'prompt' and 'answer'"
            )
        for key in ("prompt", "answer"):
            if key not in record:
                raise DataError(
                    f"{path}: record {i}: field '{key}' is missing; every record needs string "
                    "fields 'prompt' and 'answer'"
                )
            if not isinstance(record[key], str):
                raise DataError(
                    f"{path}: record {i}: field '{key}' is a {type(record[key]).__name__}, expected a string"
                )
        examples.append(Example(record["prompt"], record["answer"]))
    return examples


def _manifest(root: Path) -> dict:
    path = root / MANIFEST
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: invalid JSON at line {err.lineno}: {err.msg}") from err


def task_order(root: Path, tasks: list[str] | None = None) -> list[str]:
    """The tasks to run, in order: ``tasks`` if given; else the manifest's default selection; else
    (and for ``tasks=["all"]``) the manifest's full order, else TRACE's, else sorted."""
    if not root.is_dir():
        raise DataError(
            f"benchmark directory {root} does not exist; pass --data-dir pointing at a folder "
            "of <Task>/{train,test}.json"
        )
    present = sorted(p.name for p in root.iterdir() if p.is_dir())
    manifest = _manifest(root)
    if tasks == ["all"]:
        tasks = None
    elif not tasks and manifest.get("default"):
        tasks = manifest["default"]
    if tasks:
        missing = [t for t in tasks if t not in present]
        if missing:
            raise DataError(f"{root}: no task folder for {', '.join(missing)}; tasks there: {', '.join(present)}")
        return list(tasks)
    if manifest.get("order"):
        return list(manifest["order"])
    trace = [t for t in TRACE_ORDER if t in present]
    return trace or present


def load_benchmark(
    root: str | Path,
    tasks: list[str] | None = None,
    train_size: int | None = None,
    test_size: int | None = None,
    seed: int = 0,
    eval_size: int | None = None,
) -> list[Task]:
    """Load and validate every task of a benchmark root, in stream order.

    ``train_size``/``test_size``/``eval_size`` cap each split by a seeded sample (same seed, same
    subset).
    """
    root = Path(root)
    metrics = {**TRACE_METRICS, **_manifest(root).get("metrics", {})}
    loaded = []
    for name in task_order(root, tasks):
        folder = root / name
        splits = {}
        for split in ("train", "test", "eval"):
            path = folder / f"{split}.json"
            if not path.is_file():
                if split == "eval":
                    splits[split] = []
                    continue
                raise DataError(f"{path}: missing; every task folder needs train.json and test.json")
            splits[split] = read_split(path)
        cap = {"train": train_size, "test": test_size, "eval": eval_size}
        for split, n in cap.items():
            if n is not None and len(splits[split]) > n:
                splits[split] = random.Random(f"{seed}:{name}:{split}").sample(splits[split], n)
        loaded.append(Task(name, metrics.get(name, "accuracy"), splits["train"], splits["test"], splits["eval"]))
    return loaded


def write_benchmark(root: Path, tasks: list[Task], default: list[str] | None = None) -> None:
    """Write tasks in TRACE's format plus the manifest (order, metrics, the default selection of
    tasks a run takes when none are named), atomically per file."""
    from moecl.io import atomic_write_json

    for task in tasks:
        for split in ("train", "test", "eval"):
            examples = getattr(task, split)
            if examples or split != "eval":
                atomic_write_json(
                    root / task.name / f"{split}.json",
                    [{"prompt": e.prompt, "answer": e.answer} for e in examples],
                )
    manifest = {"order": [t.name for t in tasks], "metrics": {t.name: t.metric for t in tasks}}
    if default:
        manifest["default"] = default
    atomic_write_json(root / MANIFEST, manifest)
