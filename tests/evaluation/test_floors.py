"""Floors: majority-class and base-model zero-shot scores, on a stream written here by hand."""

import json

import pytest

from moecl.config import RunConfig
from moecl.data.trace import Example, Task
from moecl.evaluation.floors import majority_answer, majority_score, zero_shot_key
from moecl.training import run as run_module


def _split(answers, stem):
    return [{"prompt": f"{stem} {i}: pick\nAnswer:", "answer": a} for i, a in enumerate(answers)]


def _stream(root):
    """Two tasks; the training answers' majority is A for ``cls`` and "12" for ``num``."""
    splits = {
        "cls": {
            "train": [" A", " A", " B", " A"],
            "eval": [" A", " B", " B", " B"],  # majority A: 1 of 4 = 25
            "test": [" B", " B"],  # 0
        },
        "num": {"train": [" 12", " 7", " 12"], "eval": [" 12", " 12", " 3"], "test": [" 12"]},  # 66.7, 100
    }
    for task, by_split in splits.items():
        for split, answers in by_split.items():
            (root / task).mkdir(parents=True, exist_ok=True)
            (root / task / f"{split}.json").write_text(json.dumps(_split(answers, f"{task} {split}")))
    (root / "moecl_tasks.json").write_text(json.dumps({"order": ["cls", "num"], "metrics": {}}))


def test_majority_floor_by_hand():
    task = Task("t", "accuracy", [Example("p", " B"), Example("q", " A"), Example("r", " A")], [])
    assert majority_answer(task) == " A"
    assert majority_score(task, [Example("x", " A"), Example("y", " B")]) == 50.0
    tie = Task("t", "accuracy", [Example("p", " B"), Example("q", " A")], [])
    assert majority_answer(tie) == " B"  # ties: the answer seen first


def test_run_records_floors_and_caches_the_zero_shot_pass(tmp_path, monkeypatch):
    monkeypatch.setenv("MOECL_CACHE", str(tmp_path / "cache"))
    _stream(tmp_path / "data")
    options = dict(
        model="tiny-random",
        benchmark="trace",
        data_dir=str(tmp_path / "data"),
        eval_split="eval",
        epochs=1,
        batch_size=2,
        micro_batch_size=2,
        max_prompt_tokens=32,
        max_answer_tokens=4,
        eval_all_tasks=True,  # the pmoe model before training is the base model: its zero-shot row
    )
    results = run_module.run(RunConfig(**options), tmp_path / "a")
    floors = results["floors"]
    assert floors["cls"]["majority"] == 25.0 and floors["num"]["majority"] == pytest.approx(200 / 3)
    assert [floors[t]["zero_shot"] for t in ("cls", "num")] == results["zero_shot"]
    assert results["eval_split"] == "eval"
    assert len(list((tmp_path / "cache" / "floors").glob("*.json"))) == 2

    plain_calls = []
    evaluate = run_module.Run.evaluate

    def counting(self, *args, plain=False, **kw):
        plain_calls.append(plain)
        return evaluate(self, *args, plain=plain, **kw)

    monkeypatch.setattr(run_module.Run, "evaluate", counting)
    again = run_module.run(RunConfig(**{**options, "seed": 1, "method": "seq-lora"}), tmp_path / "b")
    assert again["floors"] == floors and not any(plain_calls)  # read from the cache, not evaluated
    on_test = run_module.run(RunConfig(**{**options, "eval_split": "test"}), tmp_path / "c")
    assert on_test["floors"]["cls"]["majority"] == 0.0 and on_test["floors"]["num"]["majority"] == 100.0
    assert sum(plain_calls) == 2  # another split: other items, evaluated once per task


def test_zero_shot_key_ignores_item_order_but_not_items_or_model():
    task = Task("t", "accuracy", [], [])
    items = [Example("a", " A"), Example("b", " B")]
    key = zero_shot_key("m", task, items, {"max_new_tokens": 4})
    assert key == zero_shot_key("m", task, items[::-1], {"max_new_tokens": 4})
    assert key != zero_shot_key("other", task, items, {"max_new_tokens": 4})
    assert key != zero_shot_key("m", task, items[:1], {"max_new_tokens": 4})
    assert key != zero_shot_key("m", task, items, {"max_new_tokens": 5})


def test_eval_split_without_eval_files_says_which_file(tmp_path, monkeypatch):
    monkeypatch.setenv("MOECL_CACHE", str(tmp_path / "cache"))
    _stream(tmp_path / "data")
    (tmp_path / "data" / "num" / "eval.json").unlink()
    config = RunConfig(model="tiny-random", benchmark="trace", data_dir=str(tmp_path / "data"), eval_split="eval")
    with pytest.raises(ValueError, match=r"num/eval.json is missing"):
        run_module.run(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()
