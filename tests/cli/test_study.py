"""`moecl study`: methods x seeds from a YAML file, resumable after SIGKILL, one comparison table."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from moecl.study import load_study

STUDY = """\
seeds: [0, 1]
reference: LoRA
common: {preset: smoke, tasks: "sentiment,parity", train_size: 8, test_size: 6, epochs: 2,
         batch_size: 4, micro_batch_size: 4}
runs:
  - {label: PMoE, options: {method: pmoe}}
  - {label: LoRA, options: {method: seq-lora}}
"""


def _study(args, env, **kw):
    cmd = [sys.executable, "-m", "moecl.cli.main", "study", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, **kw)


def _scores(table: str) -> str:
    """compare.md without its wall-minutes row: a measured cost, not a result a rerun repeats
    (a smoke run takes 0.0 or 0.1 minutes as the machine is idle or busy)."""
    return "".join(line for line in table.splitlines(keepends=True) if not line.startswith("| wall minutes |"))


def test_killed_study_resumes_to_the_same_table(tmp_path):
    env = {**os.environ, "MOECL_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    spec = tmp_path / "study.yaml"
    spec.write_text(STUDY)
    straight = tmp_path / "straight"
    done = _study([str(spec), "--out", str(straight)], env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(p.name for p in (straight / "pmoe").iterdir()) == ["seed-0", "seed-1", "seeds.json"]
    table = _scores((straight / "compare.md").read_text())
    assert "| vs LoRA |" in table and "| OP |" in table
    assert "| wall minutes |" in (straight / "compare.md").read_text()
    walls = json.loads((straight / "study.json").read_text())["wall_seconds"]
    assert sorted(walls) == ["lora/seed-0", "lora/seed-1", "pmoe/seed-0", "pmoe/seed-1"]

    # Kill the study while its third run (LoRA seed 0) is between tasks, then run it again.
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "moecl.cli.main", "study", str(spec), "--out", str(killed)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    state = killed / "lora" / "seed-0" / "state.json"
    deadline = time.time() + 240
    while time.time() < deadline and not (state.is_file() and json.loads(state.read_text())["completed"] >= 1):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "lora" / "seed-0" / "results.json").exists()
    resumed = _study([str(spec), "--out", str(killed)], env)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert resumed.stdout.count("finished earlier, skipped") == 2 and "resuming" in resumed.stdout
    assert _scores((killed / "compare.md").read_text()) == table
    assert (
        json.loads((killed / "compare.json").read_text())["paired"]
        == json.loads((straight / "compare.json").read_text())["paired"]
    )


@pytest.mark.parametrize(
    "text, message",
    [
        ("runs: []", "non-empty list `runs:`"),
        ("runs:\n  - {options: {method: pmoe}}", r"runs\[0\]: each entry needs a `label`"),
        ("runs:\n  - {label: A, options: {lr: fast}}", r"runs\[0\] \(A\): option lr: 'fast' is not a number"),
        ("runs:\n  - {label: A, options: {nope: 1}}", r"runs\[0\] \(A\): unknown option\(s\) nope"),
        ("runs:\n  - {label: A, options: {seed: 1}}", "set seeds with the study's `seeds:`"),
        ("reference: B\nruns:\n  - {label: A}", "reference 'B' is not one of the labels"),
        ("runs:\n  - {label: A}\n  - {label: a}", "two entries share a label"),
    ],
)
def test_bad_study_files_name_the_entry_and_field(tmp_path, text, message):
    path = tmp_path / "s.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_study(path)


def test_shipped_table1_study_resolves(tmp_path):
    from pathlib import Path

    study = load_study(Path(__file__).parents[2] / "studies" / "table1.yaml")
    methods = {e.label: e.config.method for e in study.entries}
    assert {"PMoE", "LoRA-RE", "LoRA", "O-LoRA", "Full-ft-RE", "MoSEs TaIL", "MTL"} <= set(methods)
    lora_re = next(e.config for e in study.entries if e.label == "LoRA-RE")
    assert lora_re.method == "seq-lora" and lora_re.replay == 0.01
    assert study.reference == "LoRA-RE" and len(study.seeds) >= 3
    assert all(e.config.general == "small" for e in study.entries)  # Table 1's upper half too


def test_only_keeps_the_named_entries_in_file_order(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(STUDY)
    study = load_study(path, only=["LoRA", "PMoE"])
    assert [e.label for e in study.entries] == ["PMoE", "LoRA"] and study.reference == "LoRA"
    assert load_study(path, only=["PMoE"]).reference is None  # no reference column without it
    with pytest.raises(ValueError, match=r"--only names \['MoE'\], not labels"):
        load_study(path, only=["MoE"])


@pytest.mark.parametrize(
    "command", ["run", "show", "compare", "study", "general", "sweep", "report", "route", "export", "theory"]
)
def test_every_commands_help_prints(command, capsys):
    from moecl.cli.main import main

    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0 and "usage: moecl" in capsys.readouterr().out
