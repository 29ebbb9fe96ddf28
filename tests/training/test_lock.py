"""One writer per run folder, and a diverging run that stops clearly (issue 15, points 4-5)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from moecl.methods.pmoe import PMoEMethod
from moecl.training.lock import LOCK_NAME, RunFolderLocked, RunLock
from moecl.training.trainer import NonFiniteLoss
from tests.conftest import tiny_run

HOLD = """import sys, time
from moecl.training.lock import RunLock
with RunLock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_second_writer_is_refused_naming_the_holder_and_a_dead_holders_lock_is_taken_over(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        refused = pytest.raises(RunFolderLocked, match=f"being written by pid {holder.pid} on .*choose another --out")
        with refused, RunLock(tmp_path):
            pass
    finally:
        holder.kill()  # SIGKILL: no clean-up runs, the lock file stays behind naming it
        holder.wait()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == holder.pid
    with RunLock(tmp_path) as lock:
        assert lock.previous["pid"] == holder.pid
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    with RunLock(tmp_path) as lock:  # a clean exit leaves no holder behind
        assert lock.previous is None


def test_a_run_refuses_a_folder_another_process_is_writing(tmp_path, monkeypatch):
    out = tmp_path / "pmoe"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunFolderLocked):
            tiny_run(tmp_path, monkeypatch, "pmoe")
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing written
    finally:
        holder.kill()
        holder.wait()


def test_a_nan_loss_stops_the_run_naming_task_and_step_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    real = PMoEMethod.loss

    def poisoned(self, model, batch, lm_loss):
        loss = real(self, model, batch, lm_loss)
        return loss * float("nan") if model.num_experts == 2 else loss

    monkeypatch.setattr(PMoEMethod, "loss", poisoned)
    with pytest.raises(NonFiniteLoss, match=r"training parity \(phase 2 of 3\), optimizer step 1: the loss is nan"):
        tiny_run(tmp_path, monkeypatch, "pmoe")
    out = tmp_path / "pmoe"
    assert json.loads((out / "state.json").read_text())["completed"] == 1
    monkeypatch.setattr(PMoEMethod, "loss", real)
    results, _ = tiny_run(tmp_path, monkeypatch, "pmoe")  # the same command resumes from task 1's checkpoint
    assert len(results["R"]) == 3 and torch.isfinite(torch.tensor(results["OP"]))
