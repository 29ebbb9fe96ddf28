"""TRACE's on-disk format and its loader (arXiv 2310.06762).

A benchmark root holds one folder per task, each with ``train.json``, ``test.json`` and
optionally ``eval.json``: JSON lists of ``{"prompt": str, "answer": str}`` (each may be
gzip-compressed as ``<split>.json.gz``). Streams that moecl builds or ships (``smoke``,
``mini-trace``) are written in exactly this format plus a ``moecl_tasks.json`` at the root, the
stream's manifest: task order, each task's metric, the default selection, and per file its item
count and sha256 (of the JSON, uncompressed), with each task's source and licence and the build's
version. One loader reads them all, and real TRACE data drops in unchanged.

Every file is validated before anything trains: a bad file stops the run with a
:class:`DataError` that names the file, the record index and the field; a file whose sha256
differs from its manifest is named as damaged.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from moecl.data.names import check_task_name

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


def split_path(folder: Path, split: str) -> Path | None:
    """``folder/<split>.json``, else ``folder/<split>.json.gz``, else ``None``."""
    for path in (folder / f"{split}.json", folder / f"{split}.json.gz"):
        if path.is_file():
            return path
    return None


def read_bytes(path: Path) -> bytes:
    """The file's JSON bytes (decompressed if it ends in ``.gz``)."""
    if path.suffix != ".gz":
        return path.read_bytes()
    try:
        return gzip.decompress(path.read_bytes())
    except (OSError, EOFError) as err:
        raise DataError(f"{path}: damaged, not a complete gzip file ({err}); {REPAIR}") from err


REPAIR = (
    "restore the stream's files (`git checkout -- src/moecl/data/streams` in a clone of moecl, or reinstall it) "
    "or rebuild them with `moecl data build`"
)
"""What to do about a damaged file of a stream moecl ships."""


def read_split(path: Path, sha256: str | None = None) -> list[Example]:
    """Read and validate one split file; raise :class:`DataError` naming file, record and field.
    ``sha256``: the digest the manifest gives for the (uncompressed) JSON; a file that differs is
    named as damaged."""
    raw = read_bytes(path)
    if sha256 is not None and (found := hashlib.sha256(raw).hexdigest()) != sha256:
        raise DataError(f"{path}: damaged or altered, sha256 {found} differs from the manifest's {sha256}; {REPAIR}")
    try:
        text = raw.decode("utf-8")
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
    for key in ("order", "default"):
        for name in manifest.get(key) or []:
            try:
                check_task_name(name, f"{root / MANIFEST} field {key!r}")
            except ValueError as err:
                raise DataError(str(err)) from None
    if tasks == ["all"]:
        tasks = None
    elif not tasks and manifest.get("default"):
        tasks = manifest["default"]
    if tasks:
        for name in tasks:
            check_task_name(name, "--tasks")
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
    manifest = _manifest(root)
    metrics = {**TRACE_METRICS, **manifest.get("metrics", {})}
    files = manifest.get("files", {})
    loaded = []
    for name in task_order(root, tasks):
        folder = root / name
        splits = {}
        for split in ("train", "test", "eval"):
            path = split_path(folder, split)
            if path is None:
                if split == "eval" and f"{name}/eval.json" not in files:
                    splits[split] = []
                    continue
                raise DataError(f"{folder / split}.json: missing; every task folder needs train.json and test.json")
            splits[split] = read_split(path, files.get(f"{name}/{split}.json", {}).get("sha256"))
        cap = {"train": train_size, "test": test_size, "eval": eval_size}
        for split, n in cap.items():
            if n is not None and len(splits[split]) > n:
                splits[split] = random.Random(f"{seed}:{name}:{split}").sample(splits[split], n)
        loaded.append(Task(name, metrics.get(name, "accuracy"), splits["train"], splits["test"], splits["eval"]))
    return loaded


def verify_benchmark(root: Path) -> dict[str, dict]:
    """Check every file the manifest lists (sha256 and item count); return the manifest's
    ``files``. Raises :class:`DataError` naming the first damaged or missing file."""
    files = _manifest(root).get("files", {})
    for rel, entry in files.items():
        folder, split = root / rel.split("/")[0], rel.split("/")[1].removesuffix(".json")
        path = split_path(folder, split)
        if path is None:
            raise DataError(f"{root / rel}: missing (the manifest lists it); {REPAIR}")
        examples = read_split(path, entry["sha256"])
        if len(examples) != entry["items"]:
            raise DataError(f"{path}: {len(examples)} records, the manifest says {entry['items']}; {REPAIR}")
    return files


def write_benchmark(
    root: Path,
    tasks: list[Task],
    default: list[str] | None = None,
    sources: dict[str, dict[str, str]] | None = None,
    build: dict[str, object] | None = None,
    compress: bool = False,
) -> None:
    """Write tasks in TRACE's format plus the manifest, atomically per file.

    The manifest holds the order, metrics, the default selection of tasks a run takes when none
    are named, and per file (``<task>/<split>.json``) its item count and the sha256 of its JSON;
    ``sources`` (per task: dataset, where from, licence) and ``build`` (name, version, the command
    that rebuilds it) are recorded as given. ``compress`` writes ``<split>.json.gz`` (gzip with no
    time stamp, so the bytes depend on the items only).
    """
    from moecl.io import atomic_write_bytes

    files = {}
    for task in tasks:
        for split in ("train", "test", "eval"):
            examples = getattr(task, split)
            if examples or split != "eval":
                records = [{"prompt": e.prompt, "answer": e.answer} for e in examples]
                raw = (json.dumps(records, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
                path = root / task.name / f"{split}.json"
                if compress:
                    atomic_write_bytes(path.with_name(path.name + ".gz"), gzip.compress(raw, compresslevel=9, mtime=0))
                else:
                    atomic_write_bytes(path, raw)
                files[f"{task.name}/{split}.json"] = {"items": len(examples), "sha256": hashlib.sha256(raw).hexdigest()}
    manifest: dict[str, object] = {"order": [t.name for t in tasks], "metrics": {t.name: t.metric for t in tasks}}
    if default:
        manifest["default"] = default
    if build:
        manifest["build"] = build
    if sources:
        manifest["sources"] = sources
    manifest["files"] = files
    atomic_write_bytes(root / MANIFEST, (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
