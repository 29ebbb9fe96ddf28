"""Bad input and faults, each as a user meets it: refused before anything is written, never a
user's file lost, one ``error:`` line naming the file and what to do, and a way forward."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import yaml

from moecl.cli.main import main
from moecl.methods.pmoe import PMoEMethod
from moecl.training import run as run_module
from moecl.training.folder import MARKER, RunFolder, RunFolderError
from tests.conftest import TINY_RUN, tiny_run


@pytest.fixture
def cli(tmp_path, monkeypatch, capsys):
    """``cli(*args, out=...)`` runs ``moecl run`` in-process on the tiny set-up: (exit code, output)."""
    monkeypatch.setenv("MOECL_CACHE", str(tmp_path / "cache"))
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY_RUN))

    def call(*args: str, out: Path) -> tuple[int, str]:
        code = main(["run", "--config", str(config), "--out", str(out), *args])
        captured = capsys.readouterr()
        return code, captured.out + captured.err

    return call


def _error_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, text
    assert "Traceback" not in text
    return lines[0]


def _saved_model(folder: Path) -> dict[str, bytes]:
    folder.mkdir(parents=True)
    files = {"config.json": b'{"model_type": "llama"}', "model.safetensors": b"weights", "tokenizer.json": b"{}"}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return files


# -- 1. data loss ----------------------------------------------------------------------------


@pytest.mark.parametrize("force", [False, True])
def test_a_folder_that_is_not_a_run_is_refused_and_never_emptied(cli, tmp_path, force):
    model = tmp_path / "my-model"
    files = _saved_model(model)
    code, text = cli(*(["--force"] if force else []), out=model)
    assert code == 2 and "is not a moecl run folder" in _error_line(text)
    assert {p.name: p.read_bytes() for p in model.iterdir()} == files  # not even a lock file


def test_a_non_empty_folder_without_config_is_refused(cli, tmp_path):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "results.json").write_text('{"mine": 1}')
    (out / "log.jsonl").write_text('{"epoch": 1}\n')
    code, text = cli(out=out)
    assert code == 2 and "no moecl-run.json" in _error_line(text)
    assert (out / "results.json").read_text() == '{"mine": 1}'


def test_force_removes_only_what_moecl_wrote(cli, tmp_path):
    out = tmp_path / "run"
    assert cli("epochs=1", out=out)[0] == 0
    (out / "my-notes.txt").write_text("keep me")
    (out / "plots").mkdir()
    (out / "plots" / "a.png").write_bytes(b"png")
    code, text = cli("rank=4", out=out)
    assert code == 2 and "differs in: rank" in _error_line(text)
    code, _ = cli("rank=4", "--force", out=out)
    assert code == 0
    assert (out / "my-notes.txt").read_text() == "keep me" and (out / "plots" / "a.png").is_file()
    assert json.loads((out / "config.json").read_text())["rank"] == 4 and (out / MARKER).is_file()


def test_a_run_folder_made_before_the_marker_is_still_resumed(tmp_path, monkeypatch):
    results, out = tiny_run(tmp_path, monkeypatch, "old")
    (out / MARKER).unlink()
    again, _ = tiny_run(tmp_path, monkeypatch, "old")  # recognised by its config and state
    assert again["R"] == results["R"] and (out / MARKER).is_file()


def test_a_marker_written_while_the_folder_is_listed_is_not_taken_for_a_foreign_folder(tmp_path, monkeypatch):
    """Another process (a helper rank, a resumed run) can write the marker between the check for
    it and the listing; the listing then shows only the marker, which is moecl's own."""
    folder = RunFolder(tmp_path / "run")
    folder.path.mkdir()
    listing = Path.iterdir

    def marker_appears(path: Path):
        if path == folder.path and not folder.marker.exists():
            folder.marker.write_text("{}")
        return listing(path)

    monkeypatch.setattr(Path, "iterdir", marker_appears)
    folder.check_usable()  # no RunFolderError
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "model.safetensors").write_text("")
    with pytest.raises(RunFolderError, match="is not a moecl run folder"):
        RunFolder(tmp_path / "other").check_usable()


# -- 2. path traversal -----------------------------------------------------------------------


def _trace_root(root: Path, order: list[str]) -> Path:
    for name in ("A", "B"):
        (root / name).mkdir(parents=True)
        for split in ("train", "test"):
            (root / name / f"{split}.json").write_text(json.dumps([{"prompt": "1+1=", "answer": "2"}] * 4))
    (root / "moecl_tasks.json").write_text(json.dumps({"order": order}))
    return root


@pytest.mark.parametrize("name", ["../esc", "/tmp/esc", "A/../B", ".hidden", ""])
def test_task_names_from_a_manifest_are_plain_folder_names(cli, tmp_path, name):
    data = _trace_root(tmp_path / "deep" / "data", ["A", name])
    (tmp_path / "deep" / "esc").mkdir()  # what "../esc" would reach
    for split in ("train", "test"):
        (tmp_path / "deep" / "esc" / f"{split}.json").write_text(json.dumps([{"prompt": "x", "answer": "y"}]))
    out = tmp_path / "run"
    code, text = cli("benchmark=trace", f"data_dir={data}", "tasks=null", out=out)
    assert code == 2 and "not a plain folder name" in _error_line(text) and "moecl_tasks.json" in text
    assert not out.exists() and not (tmp_path / "deep" / "esc.jsonl").exists()


def test_task_names_given_on_the_command_line_are_checked_too(cli, tmp_path):
    code, text = cli("tasks=sentiment,../x", out=tmp_path / "run")
    assert code == 2 and "not a plain folder name" in _error_line(text)


# -- 3. validation before anything is written ----------------------------------------------


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["rank=0"], "rank must be at least 1"),
        (["lr=-0.003"], "lr must be a positive number"),
        (["tau=1.5"], "is a fraction outside"),
        (["tau=-0.5"], "is a fraction outside"),
        (["tau=1.0"], "ambiguous"),
        (["tau=half"], "'half' is not a number"),
        (["batch_size=8", "micro_batch_size=3"], "not a multiple of micro_batch_size"),
        (["model=no-such-model"], "no such folder"),
        (["epochs=2.5"], "epochs=2.5 is not of type int"),
        (["test_size=0"], "test_size must be at least 1"),
        (["train_size=-5"], "train_size must be at least 1"),
        (["eval_batch_size=0"], "eval_batch_size must be at least 1"),
        (["lr=.inf"], "give a finite number"),
        (["tasks=sentiment,sentiment"], "more than once"),
        (["lr=[0.1"], "is not valid YAML"),
        (["replay=1.5"], "replay must lie in [0, 1]"),
    ],
)
def test_bad_options_are_refused_before_the_folder_exists(cli, tmp_path, args, words):
    out = tmp_path / "run"
    code, text = cli(*args, out=out)
    assert code == 2 and words in _error_line(text)
    assert not out.exists()


def test_a_refused_command_leaves_nothing_so_the_corrected_one_runs(cli, tmp_path):
    out = tmp_path / "run"
    assert cli("rank=0", out=out)[0] == 2
    assert cli("epochs=1", out=out)[0] == 0


# -- 4. faults -------------------------------------------------------------------------------


def test_a_full_disk_during_a_checkpoint_names_the_folder_and_the_run_resumes(cli, tmp_path, monkeypatch):
    from safetensors import SafetensorError

    from moecl.models import persistence

    real = persistence.save_file
    calls = {"n": 0}

    def full_disk(tensors, path, metadata=None):
        calls["n"] += 1
        if calls["n"] == 2:  # the second task's checkpoint
            raise SafetensorError("Error while serializing: IoError(No space left on device (os error 28))")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(persistence, "save_file", full_disk)
    out = tmp_path / "run"
    code, text = cli(out=out)
    line = _error_line(text)
    assert code == 2 and "task-1" in line and "No space left" in line and "resumes" in line
    monkeypatch.setattr(persistence, "save_file", real)
    code, text = cli(out=out)
    assert code == 0 and "resuming" in text


def test_a_read_only_folder_ends_in_one_line(cli, tmp_path, monkeypatch):
    from moecl.training import folder as folder_module

    def read_only(path, data):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(folder_module, "atomic_write_json", read_only)
    code, text = cli(out=tmp_path / "run")
    line = _error_line(text)
    assert code == 1 and "moecl-run.json: Read-only file system" in line and "not writable" in line


def test_a_log_line_cut_by_a_crash_is_dropped_on_resume(cli, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real = PMoEMethod.after_task

    def crash_after_task_2(self, model, t, own, collator, replay=()):
        if t == 1:
            with open(out / "log.jsonl", "a") as f:
                f.write('{"task": 1, "step": 3, "lo')  # the disk filled mid-record
            raise OSError(errno.ENOSPC, "No space left on device", str(out / "log.jsonl"))
        return real(self, model, t, own, collator, replay)

    monkeypatch.setattr(PMoEMethod, "after_task", crash_after_task_2)
    code, text = cli(out=out)
    assert code == 1 and "free space" in _error_line(text)
    monkeypatch.setattr(PMoEMethod, "after_task", real)
    code, text = cli(out=out)
    assert code == 0 and "not a complete log record, dropped" in text
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert {r["task"] for r in records} == {0, 1, 2}


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before_with_the_same_numbers(tmp_path, monkeypatch):
    straight, _ = tiny_run(tmp_path, monkeypatch, "straight")
    _, out = tiny_run(tmp_path, monkeypatch, "damaged")
    weights = out / "checkpoints" / "task-2" / "moecl_adapter.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    (out / "results.json").unlink()
    lines = []
    monkeypatch.setattr(run_module.Run, "say", lambda self, text: lines.append(text))
    results, _ = tiny_run(tmp_path, monkeypatch, "damaged")
    assert any("task-2" in line and "damaged" in line for line in lines), lines
    assert results["R"] == straight["R"] and results["router_allocation"] == straight["router_allocation"]


def test_a_damaged_mid_task_checkpoint_restarts_its_task(tmp_path, monkeypatch):
    straight, _ = tiny_run(tmp_path, monkeypatch, "straight", save_every=1)
    real = PMoEMethod.after_task

    def stop(self, model, t, own, collator, replay=()):
        if t == 1:
            raise KeyboardInterrupt
        return real(self, model, t, own, collator, replay)

    monkeypatch.setattr(PMoEMethod, "after_task", stop)
    with pytest.raises(KeyboardInterrupt):
        tiny_run(tmp_path, monkeypatch, "cut", save_every=1)
    monkeypatch.setattr(PMoEMethod, "after_task", real)
    out = tmp_path / "cut"
    partial = json.loads((out / "state.json").read_text())["partial"]
    (out / "checkpoints" / partial["dir"] / "trainer_state.pt").write_bytes(b"\x80\x02}q")  # truncated
    lines = []
    monkeypatch.setattr(run_module.Run, "say", lambda self, text: lines.append(text))
    results, _ = tiny_run(tmp_path, monkeypatch, "cut", save_every=1)
    assert any("starts again from its beginning" in line for line in lines), lines
    assert results["R"] == straight["R"]


def test_a_damaged_state_file_is_named(cli, tmp_path):
    out = tmp_path / "run"
    assert cli("epochs=1", out=out)[0] == 0
    (out / "state.json").write_text('{"completed": 1, "R": [[')
    code, text = cli("epochs=1", out=out)
    line = _error_line(text)
    assert code == 2 and "state.json: damaged, invalid JSON" in line and "--force" in line


def test_ctrl_c_ends_in_one_line_saying_the_same_command_resumes(cli, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module, "train_task", interrupted)
    code, text = cli(out=tmp_path / "run")
    assert code == 130 and "interrupted" in text and "same command" in text and "Traceback" not in text


# -- 5. a way forward after NaN ------------------------------------------------------------


def test_after_a_nan_stop_a_lower_lr_resumes_and_is_recorded_per_task(cli, tmp_path, monkeypatch):
    real = PMoEMethod.loss

    def diverges_at_high_lr(self, model, batch, lm_loss):
        loss = real(self, model, batch, lm_loss)
        return loss * float("nan") if model.num_experts == 2 and self.config.lr > 5e-3 else loss

    monkeypatch.setattr(PMoEMethod, "loss", diverges_at_high_lr)
    out = tmp_path / "run"
    code, text = cli(out=out)
    assert code == 2 and "Lower --lr" in _error_line(text)
    code, text = cli(out=out)  # the same command meets the same NaN
    assert code == 2
    code, text = cli("lr=0.001", out=out)
    assert code == 0 and "resuming with lr 0.01 -> 0.001" in text
    results = json.loads((out / "results.json").read_text())
    assert [t["options"]["lr"] for t in results["train"]] == [0.01, 0.001, 0.001]
    assert all(json.loads(line) for line in (out / "log.jsonl").read_text().splitlines())
    code, text = cli("rank=4", out=out)
    assert code == 2 and "differs in: rank" in _error_line(text)


# -- 6. the smaller points -------------------------------------------------------------------


def test_state_without_config_is_refused(cli, tmp_path):
    out = tmp_path / "run"
    assert cli("epochs=1", out=out)[0] == 0
    (out / "config.json").unlink()
    code, text = cli("epochs=1", out=out)
    assert code == 2 and "config.json is missing" in _error_line(text)


def test_an_adapter_config_claiming_too_many_experts_fails_before_building_them(tmp_path, monkeypatch):
    from moecl.models.loading import tiny_random
    from moecl.models.pmoe import PMoEModel

    _, out = tiny_run(tmp_path, monkeypatch, "run")
    folder = out / "checkpoints" / "task-2"
    meta = json.loads((folder / "moecl_adapter.json").read_text())
    meta["num_experts"] = 3000
    (folder / "moecl_adapter.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="num_experts is 3000, but .* holds the tensors of at most 3"):
        PMoEModel.from_pretrained(tiny_random()[0], folder)


def test_checkpoints_are_written_with_the_usual_file_mode(tmp_path, monkeypatch):
    _, out = tiny_run(tmp_path, monkeypatch, "run")
    mask = os.umask(0o022)
    os.umask(mask)
    mode = (out / "checkpoints" / "task-0" / "moecl_adapter.safetensors").stat().st_mode & 0o777
    assert mode == 0o666 & ~mask


def test_export_refuses_a_non_empty_folder(tmp_path, monkeypatch, capsys):
    _, out = tiny_run(tmp_path, monkeypatch, "run")
    target = tmp_path / "adapters"
    files = _saved_model(target)
    assert main(["export", str(out), "--expert", "1", "--out", str(target)]) == 2
    assert "is not empty" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in target.iterdir()} == files
    assert main(["export", str(out), "--expert", "1", "--out", str(target), "--force"]) == 0


def test_models_never_run_their_own_code(monkeypatch):
    from moecl.models import loading

    seen = []

    class Recorder:
        @staticmethod
        def from_pretrained(path, **kwargs):
            seen.append(kwargs.get("trust_remote_code"))
            raise OSError("stop here")

    monkeypatch.setattr(loading, "AutoTokenizer", Recorder)
    with pytest.raises(ValueError):
        loading.load_model("some/model")
    assert seen == [False]


def test_a_long_prompt_is_cut_without_tokenising_it_whole():
    from moecl.data.tokens import first_tokens, last_tokens
    from moecl.models.loading import byte_tokenizer

    tokenizer = byte_tokenizer()
    text = "word " * 2_000_000  # 10 MB
    calls = []
    real = tokenizer.__call__

    def counting(self, text, **kwargs):
        calls.append(len(text))
        return real(text, **kwargs)

    tokenizer.__class__ = type("Counting", (type(tokenizer),), {"__call__": counting})
    assert last_tokens(tokenizer, text, 320) == real(text[-400:], add_special_tokens=False)["input_ids"][-320:]
    assert first_tokens(tokenizer, text, 24) == real(text[:40], add_special_tokens=False)["input_ids"][:24]
    assert max(calls) < 100_000


@pytest.mark.parametrize("n", [1, 5, 40])
def test_truncated_tokenisation_equals_tokenising_the_whole_text(n):
    import random

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from moecl.data.tokens import first_tokens, last_tokens

    rng = random.Random(n)
    words = ["alpha", "beta", "γάμμα", "12345", "x", "!!", "\n", "  ", "\t", "don't", "C++"]
    texts = [
        "".join(rng.choice(words) + rng.choice([" ", "", "  "]) for _ in range(rng.randint(1, 400))) for _ in range(60)
    ]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core)
    for text in texts:
        whole = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert last_tokens(tokenizer, text, n) == whole[-n:]
        assert first_tokens(tokenizer, text, n) == whole[:n]


def test_commands_that_read_a_finished_run_name_an_unfinished_or_foreign_folder(tmp_path, monkeypatch, capsys):
    results, out = tiny_run(tmp_path, monkeypatch, "run")
    finished = RunFolder(out).finished()
    assert finished.results["R"] == results["R"] and finished.final_checkpoint.name == "task-2"
    (out / "results.json").unlink()
    for command in (["show", str(out)], ["export", str(out), "--expert", "1", "--out", str(tmp_path / "x")]):
        assert main(command) == 2
        text = " ".join(capsys.readouterr().out.split())
        assert "is unfinished (3 tasks done): run its command again to resume it" in text, text
    (tmp_path / "other").mkdir()
    assert main(["show", str(tmp_path / "other")]) == 2
    assert "not a moecl run folder" in capsys.readouterr().out
