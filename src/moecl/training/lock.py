"""One writer per run folder: an advisory lock on ``<out>/.lock`` held for the whole run.

Two processes training into one folder would interleave ``log.jsonl`` and overwrite each
other's checkpoints, and both would "succeed". The lock is the kernel's (``flock``), so it
disappears with its process however that process ends (SIGKILL included): a lock file left by
a dead run is simply taken over. The file names the holder (pid, host, start time) so the
refusal can say who holds it.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import IO

LOCK_NAME = ".lock"


class RunFolderLocked(ValueError):
    """Another live process is writing this run folder."""


class RunLock:
    """``with RunLock(out):`` holds ``out``'s lock or raises :class:`RunFolderLocked`.

    ``previous`` is the holder a stale lock file named (``None`` if there was none), so a caller
    can say it took the folder over.
    """

    def __init__(self, out: Path):
        self.path = Path(out) / LOCK_NAME
        self.previous: dict | None = None
        self._file: IO[str] | None = None

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 (held open for the lock's lifetime)
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(f)
            f.close()
            who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}" if holder else "another process"
            since = f", since {holder['started']}" if holder and "started" in holder else ""
            raise RunFolderLocked(
                f"{self.path.parent} is being written by {who}{since}; wait for that run to finish or stop "
                "it (it resumes where it stopped when run again), or choose another --out"
            ) from None
        self.previous = _read(f)
        f.seek(0)
        f.truncate()
        started = time.strftime("%Y-%m-%dT%H:%M:%S")
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started}))
        f.flush()
        self._file = f
        return self

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            self._file.truncate(0)  # a clean exit leaves no holder to report as gone
            self._file.flush()
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None


def _read(f: IO[str]) -> dict | None:
    f.seek(0)
    try:
        return json.loads(f.read() or "null")
    except json.JSONDecodeError:
        return None
