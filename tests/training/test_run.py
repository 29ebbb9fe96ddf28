"""End-to-end runs of `moecl run` in subprocesses (tiny random model, smoke stream)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from moecl.config import RunConfig
from moecl.data.trace import DataError
from moecl.training.run import run

FAST = ["run", "--preset", "smoke", "epochs=3", "train_size=24", "test_size=12"]


def _env(tmp_path: Path) -> dict:
    return {**os.environ, "MOECL_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}


def _moecl(args: list[str], env: dict, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "moecl.cli.main", *args], env=env, capture_output=True, text=True, timeout=300, **kw
    )


def _numbers(out: Path) -> dict:
    r = json.loads((out / "results.json").read_text())
    return {k: r[k] for k in ("R", "OP", "BWT", "router_allocation", "tasks", "trainable_params")}


def test_smoke_run_writes_the_contract_then_resumes_after_sigkill_to_the_same_numbers(tmp_path):
    env = _env(tmp_path)
    straight = tmp_path / "straight"
    done = _moecl([*FAST, "--out", str(straight)], env)
    assert done.returncode == 0, done.stderr
    results = json.loads((straight / "results.json").read_text())
    for key in (
        "method",
        "model",
        "benchmark",
        "tasks",
        "metrics",
        "R",
        "OP",
        "BWT",
        "FWT",
        "bwt_convention",
        "router_allocation",
        "seed",
        "trainable_params",
        "total_params",
        "wall_seconds",
    ):
        assert key in results
    assert len(results["R"]) == 4 and results["R"][0][1:] == [None, None, None]
    assert len(results["router_allocation"]) == 4 and len(results["router_allocation"][0]) == 4
    assert sorted(p.name for p in (straight / "checkpoints").iterdir()) == [f"task-{t}" for t in range(4)]
    row = json.loads((straight / "predictions" / "after-task-3" / "copy.jsonl").read_text().splitlines()[0])
    assert set(row) == {"prompt", "answer", "prediction", "score"}
    steps = [json.loads(line) for line in (straight / "log.jsonl").read_text().splitlines()]
    assert {s["task"] for s in steps} == {0, 1, 2, 3} and {"loss", "lr", "step"} <= set(steps[0])
    memory = json.loads((straight / "replay.json").read_text())
    assert {m["task"] for m in memory} == {0, 1, 2, 3}

    shown = _moecl(["show", str(straight)], env)
    assert shown.returncode == 0 and "OP" in shown.stdout

    # Kill the same command while it trains task 3, then run it again.
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "moecl.cli.main", *FAST, "--out", str(killed)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    state = killed / "state.json"
    deadline = time.time() + 240
    while time.time() < deadline and not (state.is_file() and json.loads(state.read_text())["completed"] >= 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "results.json").exists()
    resumed = _moecl([*FAST, "--out", str(killed)], env)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout
    assert _numbers(killed) == _numbers(straight)
    log = [json.loads(line) for line in (killed / "log.jsonl").read_text().splitlines()]
    assert [(s["task"], s["step"]) for s in log] == [(s["task"], s["step"]) for s in steps]

    # (lr may change on resume: moecl.training.folder.RESUMABLE; rank may not)
    refused = _moecl([*FAST, "rank=4", "--out", str(killed)], env)
    assert refused.returncode == 2 and "different config" in refused.stdout and "--force" in refused.stdout


def test_bad_data_stops_before_a_run_folder_exists(tmp_path):
    data = tmp_path / "trace" / "FOMC"
    data.mkdir(parents=True)
    (data / "train.json").write_text('[{"prompt": "p", "answer": "a"}]')
    (data / "test.json").write_text('[{"prompt": "p"}]')
    out = tmp_path / "run"
    with pytest.raises(DataError, match=r"FOMC/test.json: record 0: field 'answer' is missing"):
        run(RunConfig(benchmark="trace", data_dir=str(tmp_path / "trace"), model="tiny-random"), out)
    assert not out.exists()


def test_two_processes_give_the_numbers_of_one_at_the_same_effective_batch(tmp_path):
    """DDP over gloo with 2 processes x micro-batch 4 against 1 process accumulating 2 x 4: the
    same 8 examples per optimizer step, so the same losses (to float rounding) and scores. No
    replay, so every task has 6 micro-batches, a multiple of the process count (otherwise
    accelerate fills a task's last step with its first examples: that one step differs)."""
    env = _env(tmp_path)
    same = [*FAST, "epochs=8", "batch_size=8", "micro_batch_size=4", "replay=0"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "moecl.cli.main"]
    done = subprocess.run([*cmd, *same, "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-1500:] + done.stderr[-3000:]  # how far the run got, then why
    assert done.stdout.count("run folder:") == 1  # one process reports
    one = _moecl([*same, "--out", str(tmp_path / "one")], env)
    assert one.returncode == 0, one.stderr[-3000:]
    # Sharded data: each optimizer step sees 4 examples per process, so a 24-example task takes 3
    # steps an epoch.
    logs = {
        n: [json.loads(line) for line in (tmp_path / n / "log.jsonl").read_text().splitlines()] for n in ("one", "two")
    }
    assert max(s["step"] for s in logs["two"] if s["task"] == 0) == 3 * 8
    assert [(s["task"], s["step"]) for s in logs["one"]] == [(s["task"], s["step"]) for s in logs["two"]]
    for a, b in zip(logs["one"], logs["two"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-5), (a, b)
    two, one = _numbers(tmp_path / "two"), _numbers(tmp_path / "one")
    assert len(two["R"]) == 4 and two["R"] == one["R"] and two["OP"] == one["OP"]
    assert (
        max(v for row in two["R"] for v in row if v is not None) > 50
    )  # it learned something, so equal scores say something
    for a, b in zip(one["router_allocation"], two["router_allocation"], strict=True):
        assert a == pytest.approx(b, abs=1e-4)
    # The shipped FSDP config on CPU processes: Accelerate runs data parallelism instead, and the
    # run says so at start rather than pretending to shard.
    fsdp = ["--config_file", str(Path(__file__).parents[2] / "configs" / "accelerate" / "fsdp.yaml")]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *fsdp, "--num_processes", "2", "-m", "moecl.cli.main"]
    done = subprocess.run([*cmd, *same, "--out", str(tmp_path / "fsdp")], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-1500:] + done.stderr[-3000:]  # how far the run got, then why
    said = " ".join(done.stdout.split())  # rich wraps long lines
    assert "the launch asked for FSDP, but Accelerate runs this as MULTI_CPU over 2 process(es)" in said
    assert _numbers(tmp_path / "fsdp")["R"] == one["R"]


def test_mid_task_checkpoints_resume_after_sigkill_to_the_same_numbers(tmp_path):
    from safetensors.torch import load_file

    env = _env(tmp_path)
    args = [*FAST, "epochs=2", "save_every=2"]
    straight = tmp_path / "straight"
    assert _moecl([*args, "--out", str(straight)], env).returncode == 0
    assert not any("step" in p.name for p in (straight / "checkpoints").iterdir())  # removed once tasks end
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "moecl.cli.main", *args, "--out", str(killed)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    state = killed / "state.json"

    def inside_task_1() -> bool:
        if not state.is_file():
            return False
        partial = json.loads(state.read_text()).get("partial")
        return partial is not None and partial["task"] == 1 and partial["step"] >= 4

    deadline = time.time() + 240
    while time.time() < deadline and not inside_task_1():
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = json.loads(state.read_text())["partial"]
    assert partial["task"] == 1 and json.loads(state.read_text())["completed"] == 1
    resumed = _moecl([*args, "--out", str(killed)], env)
    assert resumed.returncode == 0, resumed.stderr
    assert f"after its optimizer step {partial['step']}" in resumed.stdout
    assert _numbers(killed) == _numbers(straight)
    for t in range(4):
        a = load_file(str(straight / "checkpoints" / f"task-{t}" / "moecl_adapter.safetensors"))
        b = load_file(str(killed / "checkpoints" / f"task-{t}" / "moecl_adapter.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log = [json.loads(line) for line in (killed / "log.jsonl").read_text().splitlines()]
    expected = [json.loads(line) for line in (straight / "log.jsonl").read_text().splitlines()]
    assert [(s["task"], s["step"], s["loss"]) for s in log] == [(s["task"], s["step"], s["loss"]) for s in expected]


def test_replay_extra_joins_every_task_after_the_first_and_bad_files_are_named(tmp_path, monkeypatch):
    from moecl.training import run as run_module
    from tests.conftest import tiny_run

    extra = tmp_path / "lima.json"
    extra.write_text(json.dumps([{"prompt": "Say hi.", "answer": "hi"}, {"prompt": "Say bye.", "answer": "bye"}]))
    seen = []
    real = run_module.train_task

    def spy(accelerator, method, model, collator, items, *args, **kw):
        seen.append([(t, e.prompt) for t, e in items if e.prompt.startswith("Say ")])
        return real(accelerator, method, model, collator, items, *args, **kw)

    monkeypatch.setattr(run_module, "train_task", spy)
    tiny_run(tmp_path, monkeypatch, "extra", method="seq-lora", replay_extra=str(extra))
    assert seen == [[], [(1, "Say hi."), (1, "Say bye.")], [(2, "Say hi."), (2, "Say bye.")]]
    extra.write_text(json.dumps([{"prompt": "Say hi."}]))
    with pytest.raises(DataError, match=r"lima.json: record 0: field 'answer' is missing"):
        tiny_run(tmp_path, monkeypatch, "bad", replay_extra=str(extra))
    assert not (tmp_path / "bad").exists()


def test_the_papers_recipe_parses_into_a_run_config():
    from moecl.config import config_from_options

    recipe = yaml.safe_load(
        (Path(__file__).parents[2] / "configs" / "recipes" / "pmoe-trace-llama2-7b.yaml").read_text()
    )
    config = config_from_options({**recipe, "data_dir": "/data/TRACE"})
    assert (config.rank, config.tau, config.lr, config.batch_size, config.train_size) == (4, 24, 3e-4, 128, 5000)
    assert config.tasks[0] == "C-STANCE" and config.tasks[-1] == "20Minuten" and config.replay == 0.01
