"""The run folder (``--out``): what moecl writes there, how a folder is recognised as a run, and
how its files are read back, every fault named with the file and what to do.

A run folder holds ``moecl-run.json`` (the marker, written first), then::

    config.json          the fully resolved RunConfig
    state.json           progress: tasks completed, R rows so far (written last after each task)
    results.json         method, model, benchmark, tasks, metrics, R, OP, BWT, FWT, floors, ...
    predictions/after-task-<t>/<task>.jsonl   prompt, answer, prediction, score per example
    checkpoints/task-<t>/                     the method's weights after task t (safetensors)
    replay.json          the replay memory
    log.jsonl            loss, lr, step, task per optimizer step
    general.json, router_allocation.png, transfer.json, transfer.png   (where the run makes them)
    .lock                the writer's pid and host while a run holds the folder (training/lock.py)

moecl writes only into an empty folder or one holding its marker, and ``--force`` removes only
the entries named above: never a file moecl did not write. Folders made before the marker
existed (a ``config.json`` of a run beside ``state.json`` or ``results.json``) are recognised
and get the marker.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moecl import io
from moecl.io import atomic_write_json, atomic_write_text
from moecl.training.lock import LOCK_NAME

MARKER = "moecl-run.json"
OWN_ENTRIES = (
    MARKER,
    "config.json",
    "state.json",
    "results.json",
    "replay.json",
    "log.jsonl",
    "general.json",
    "router_allocation.png",
    "transfer.json",
    "transfer.png",
    "predictions",
    "checkpoints",
)
_TEMPORARY = re.compile(r"^\..+\.tmp\d+(\.\w+)?$")  # moecl.io.atomic_path's names, left by a crash

RESUMABLE = (
    "lr",
    "router_lr",
    "weight_decay",
    "warmup_ratio",
    "epochs",
    "lambda_route",
    "lambda_route_distill",
    "lambda_orth",
    "lambda_l2",
    "save_every",
    "gradient_checkpointing",
    "kernels",
)
"""Options that may change when a run resumes: they act on training still to come, never on
what the finished tasks learned (a way forward after a NaN stop: a lower ``lr``). Each task's
values are recorded in results.json (``train[t]["options"]``)."""

START_OVER = "pass --force to start the run over (it removes only the files moecl wrote there)"


class RunFolderError(ValueError):
    """A run folder that cannot be used as it is; the message names the file and what to do."""


def read_json(path: Path, fix: str) -> Any:
    """``path``'s JSON, or :class:`RunFolderError` naming the file, the fault and ``fix``."""
    try:
        return io.read_json(path, fix)
    except ValueError as err:
        raise RunFolderError(str(err)) from err


def finite(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by its name as text, so the JSON stays
    JSON (``json.dumps`` would write the bare words ``NaN``/``Infinity``)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


@dataclass
class FinishedRun:
    """A finished run read back: ``options`` (config.json), ``results`` (results.json) and the
    folder of the last task's checkpoint, whose model is the run's final one."""

    options: dict[str, Any]
    results: dict[str, Any]
    final_checkpoint: Path


class RunFolder:
    """One run folder: its paths, whether it is a run, and its state and log read back safely."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.marker = self.path / MARKER
        self.config = self.path / "config.json"
        self.state = self.path / "state.json"
        self.results = self.path / "results.json"
        self.replay = self.path / "replay.json"
        self.log = self.path / "log.jsonl"
        self.general = self.path / "general.json"
        self.predictions = self.path / "predictions"
        self.checkpoints = self.path / "checkpoints"

    def checkpoint(self, name: str) -> Path:
        return self.checkpoints / name

    # -- is it a run? -------------------------------------------------------------------------

    def is_run(self) -> bool:
        """Whether the folder holds moecl's marker, or is a run made before the marker existed."""
        if self.marker.is_file():
            return True
        if not self.config.is_file() or not (self.state.is_file() or self.results.is_file()):
            return False
        try:
            saved = json.loads(self.config.read_text(encoding="utf-8"))
        except (ValueError, OSError):
            return False
        return isinstance(saved, dict) and {"method", "model", "benchmark", "seed"} <= set(saved)

    def check_usable(self) -> None:
        """Refuse, before anything is written, a folder that is neither empty nor a moecl run."""
        if not self.path.exists() or self.is_run():
            return
        if not self.path.is_dir():
            raise RunFolderError(f"--out {self.path} is a file, not a folder; choose a folder for the run")
        entries = [e.name for e in self.path.iterdir() if e.name != LOCK_NAME and not _TEMPORARY.match(e.name)]
        if entries and not self.is_run():  # asked again: the marker may have appeared while listing
            shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
            raise RunFolderError(
                f"--out {self.path} is not empty ({shown}) and is not a moecl run folder (no {MARKER}); moecl "
                "never writes into or deletes from another folder: choose a new or empty --out"
            )

    # -- starting, resuming, starting over ----------------------------------------------------

    def prepare(
        self, config: dict[str, Any], force: bool, defaults: dict[str, Any] | None = None
    ) -> dict[str, Any] | None:
        """Make the folder ready for a run with ``config`` (called under the folder's lock).

        A new folder gets the marker and ``config.json``. A run's folder with the same config is
        resumed; one that differs only in :data:`RESUMABLE` options is resumed with the new ones
        (returned as ``{option: [old, new]}`` for the caller to record); any other difference is
        refused unless ``force``, which removes moecl's own entries (never another file) and
        starts over. An option newer than the saved config counts as its value in ``defaults``.
        """
        self.check_usable()
        changes = None
        if self.state.is_file() and not self.config.is_file():
            if not force:
                raise RunFolderError(
                    f"{self.state} exists but {self.config} is missing: the options that trained this run are "
                    f"unknown, so it cannot resume; restore config.json, or {START_OVER}"
                )
            self.remove_own()
        elif self.config.is_file():
            saved = read_json(self.config, f"restore it, or {START_OVER}")
            saved = {**{k: v for k, v in (defaults or {}).items() if k not in saved}, **saved}
            differ = sorted(k for k in set(saved) | set(config) if saved.get(k) != config.get(k))
            fixed = [k for k in differ if k not in RESUMABLE]
            if force and differ:
                self.remove_own()
            elif fixed:
                raise RunFolderError(
                    f"{self.path} holds a run made with a different config (differs in: {', '.join(fixed)}); "
                    "re-run with the same options to resume it (only "
                    f"{', '.join(RESUMABLE)} may change on resume), choose another --out, or {START_OVER}"
                )
            elif differ:
                if self.results.is_file():
                    raise RunFolderError(
                        f"{self.path} holds a finished run; changing {', '.join(differ)} would change nothing "
                        f"in it: choose another --out, or {START_OVER}"
                    )
                changes = {k: [saved.get(k), config.get(k)] for k in differ}
        self.path.mkdir(parents=True, exist_ok=True)
        if not self.marker.is_file():
            atomic_write_json(self.marker, {"moecl_run": 1, "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
        atomic_write_json(self.config, config)
        return changes

    def remove_own(self) -> None:
        """Delete the entries moecl writes (and its temporary files), never any other."""
        for entry in self.path.iterdir():
            if entry.name in OWN_ENTRIES or _TEMPORARY.match(entry.name):
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()

    # -- a finished run, read back ----------------------------------------------------------

    def finished(self) -> FinishedRun:
        """The options, results and final checkpoint of a finished run; an unfinished or foreign
        folder is named with what to do (``moecl show``, ``general --run``, ``route``, ``export``)."""
        if not self.results.is_file():
            if self.state.is_file():
                done = read_json(self.state, f"restore it, or {START_OVER}").get("completed")
                raise RunFolderError(
                    f"{self.path} is unfinished ({done} tasks done): run its command again to resume it"
                )
            raise RunFolderError(f"{self.path} has neither results.json nor state.json: not a moecl run folder")
        results = read_json(self.results, f"restore it from a copy, or {START_OVER}")
        options = read_json(self.config, f"restore it, or {START_OVER}")
        done = read_json(self.state, f"restore it, or {START_OVER}")["completed"]
        return FinishedRun(options, results, self.checkpoint(f"task-{done - 1}"))

    def read_state(self) -> dict[str, Any] | None:
        if not self.state.is_file():
            return None
        return read_json(self.state, f"it is rewritten after every task; {START_OVER}")

    # -- the training log -----------------------------------------------------------------------

    def append_log(self, record: dict[str, Any]) -> None:
        """One line of ``log.jsonl`` (non-finite numbers written as text, so every line is JSON)."""
        with open(self.log, "a", encoding="utf-8") as f:
            f.write(json.dumps(finite(record)) + "\n")

    def trim_log(self, completed: int, partial: dict[str, Any] | None) -> list[str]:
        """Keep the log lines of completed tasks and of the interrupted one up to its mid-task
        checkpoint; lines that are not JSON records (a last line cut by a crash or a full disk)
        are dropped. Returns what was dropped, to be said aloud."""
        if not self.log.is_file():
            return []
        keep, dropped = [], []
        lines = self.log.read_text(encoding="utf-8", errors="replace").splitlines()
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                task, step = record["task"], record["step"]
            except (ValueError, KeyError, TypeError):
                dropped.append(f"{self.log} line {number}: not a complete log record, dropped")
                continue
            if task < completed or (partial is not None and task == partial["task"] and step <= partial["step"]):
                keep.append(line)
        atomic_write_text(self.log, "".join(line + "\n" for line in keep))
        return dropped
