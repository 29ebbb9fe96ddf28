"""Progress in a log file: plain lines with counts, the loss, elapsed time and ETA."""

import io

from rich.console import Console

from moecl.config import RunConfig
from moecl.reports.progress import LineProgress, make_progress
from moecl.training import run as run_module
from tests.conftest import TINY_RUN


def _console() -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, force_terminal=False, width=200), buffer


def test_lines_say_start_progress_with_eta_and_end():
    console, buffer = _console()
    progress = make_progress(console, disable=False)
    assert isinstance(progress, LineProgress)
    progress.every = 0.0  # a line on every update
    bar = progress.add_task("train sst2 (1/3), steps", total=None)
    progress.update(bar, total=120, completed=30, loss="0.5000", tokens_per_s="812")
    progress.remove_task(bar)
    lines = buffer.getvalue().splitlines()
    assert lines[0].endswith("train sst2 (1/3), steps: started")
    assert "30/120 (25%), loss 0.5000, tokens/s 812," in lines[1] and "elapsed, ETA" in lines[1]
    assert "train sst2 (1/3), steps: done, 30/120 (25%)" in lines[2]
    quiet, silent = _console()
    hidden = make_progress(quiet, disable=True)
    hidden.remove_task(hidden.add_task("eval", total=3))
    assert silent.getvalue() == ""


def test_a_run_in_a_log_file_reports_each_phase_and_evaluation(tmp_path, monkeypatch):
    monkeypatch.setenv("MOECL_CACHE", str(tmp_path / "cache"))
    console, buffer = _console()
    run_module.run(RunConfig(**{**TINY_RUN, "tasks": ["sentiment", "parity"]}), tmp_path / "run", console=console)
    text = buffer.getvalue()
    for phase in ("train sentiment (1/2), steps: done, 2/2 (100%), loss", "train parity (2/2), steps: started"):
        assert phase in text
    assert "eval parity after-task-1: done, 6/6 (100%)" in text
