"""Progress a person can follow: rich's live bars on a terminal, plain timestamped lines in a log
file or a batch job (``nohup``, a scheduler), where a live bar would print nothing for minutes."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.progress import Progress, ProgressColumn


def make_progress(console: Console, *columns: ProgressColumn | str, **kwargs: Any) -> Progress | LineProgress:
    """rich's :class:`~rich.progress.Progress` with ``columns`` when ``console`` is a terminal,
    else a :class:`LineProgress` on it (``disable`` is honoured by both)."""
    if console.is_terminal:
        return Progress(*columns, console=console, **kwargs)
    return LineProgress(console, disable=kwargs.get("disable", False))


class _Bar:
    def __init__(self, description: str, total: float | None, fields: dict[str, Any]):
        self.description, self.total, self.fields = description, total, dict(fields)
        self.completed = 0.0
        self.started = self.last_line = time.monotonic()


class LineProgress:
    """The part of rich's ``Progress`` interface moecl uses, written as lines: one when a bar
    starts, then at most one every ``every`` seconds while it advances (done/total, the fields
    set with :meth:`update` such as the loss, elapsed time and ETA), and one when it is removed."""

    def __init__(self, console: Console, every: float = 30.0, disable: bool = False):
        self.console, self.every, self.disable = console, every, disable
        self._bars: dict[int, _Bar] = {}
        self._next = 0

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def add_task(self, description: str, total: float | None = None, **fields: Any) -> int:
        task_id, self._next = self._next, self._next + 1
        self._bars[task_id] = _Bar(description, total, fields)
        self._say(f"{description}: started" + (f" ({total:g})" if total else ""))
        return task_id

    def advance(self, task_id: int, advance: float = 1) -> None:
        bar = self._bars[task_id]
        bar.completed += advance
        self._maybe_say(bar)

    def update(
        self,
        task_id: int,
        *,
        total: float | None = None,
        completed: float | None = None,
        description: str | None = None,
        **fields: Any,
    ) -> None:
        bar = self._bars[task_id]
        if total is not None:
            bar.total = total
        if completed is not None:
            bar.completed = completed
        if description is not None:
            bar.description = description
        bar.fields.update(fields)
        self._maybe_say(bar)

    def remove_task(self, task_id: int) -> None:
        bar = self._bars.pop(task_id)
        self._say(f"{bar.description}: done, {_count(bar)}{_fields(bar)}, {_duration(time.monotonic() - bar.started)}")

    def _maybe_say(self, bar: _Bar) -> None:
        now = time.monotonic()
        if now - bar.last_line < self.every:
            return
        bar.last_line = now
        elapsed = now - bar.started
        eta = ""
        if bar.total and bar.completed:
            eta = f", ETA {_duration(elapsed / bar.completed * max(0.0, bar.total - bar.completed))}"
        self._say(f"{bar.description}: {_count(bar)}{_fields(bar)}, {_duration(elapsed)} elapsed{eta}")

    def _say(self, text: str) -> None:
        if not self.disable:
            self.console.print(f"{time.strftime('%H:%M:%S')} {text}", markup=False, highlight=False, soft_wrap=True)


def _count(bar: _Bar) -> str:
    done = f"{bar.completed:g}"
    if not bar.total:
        return done
    return f"{done}/{bar.total:g} ({100 * bar.completed / bar.total:.0f}%)"


def _fields(bar: _Bar) -> str:
    names = {"tokens_per_s": "tokens/s"}
    return "".join(f", {names.get(k, k.replace('_', ' '))} {v}" for k, v in bar.fields.items() if v is not None)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"
