"""mini-trace's conversion, on a fake BIG-bench archive built here (CI never downloads the real one)."""

import io
import json
import tarfile

from moecl.data import mini_trace
from moecl.data.trace import load_benchmark


def _mc(n, options=("yes", "no")):
    return {
        "examples": [
            {"input": f"question {i}", "target_scores": {o: int(j == i % len(options)) for j, o in enumerate(options)}}
            for i in range(n)
        ]
    }


def _fake_sources() -> dict:
    text = {"examples": [{"input": f"Article {i}. It is long.", "target": [f"Summary {i}. More."]} for i in range(12)]}
    data = {name: _mc(12, ("a", "b", "c", "d")) for name in mini_trace.SOURCES}
    data["intent_recognition/task.json"] = _mc(12, ("add_to_playlist", "get_weather", "play_music"))
    data["gem/xsum/task.json"] = data["gem/mlsum_de/task.json"] = text
    for op in ("addition", "subtraction", "multiplication"):
        data[f"arithmetic/2_digit_{op}/task.json"] = {
            "examples": [{"input": f"What is {i} plus 1?", "target": str(i + 1)} for i in range(4)]
        }
    data["multiemo/all_text_en/task.json"] = _mc(2500, ("positive", "negative", "neutral", "ambivalent"))
    return data


def test_archive_is_streamed_for_the_named_members_only(tmp_path):
    sdist = tmp_path / mini_trace.SDIST
    with tarfile.open(sdist, "w:gz") as tar:
        for name, payload in {"physics/task.json": _mc(3), "other/task.json": _mc(1)}.items():
            raw = json.dumps(payload).encode()
            info = tarfile.TarInfo(mini_trace.PREFIX + name)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    assert mini_trace.read_members(sdist, {"physics/task.json"}) == {"physics/task.json": _mc(3)}


def test_tasks_follow_trace_order_and_answer_with_letters(tmp_path):
    tasks = mini_trace.build_tasks(_fake_sources(), seed=0)
    assert [t.name for t in tasks] == [
        "multiemo-en",
        "intent",
        "xsum",
        "stdlib-py",
        "physics",
        "math-qa",
        "arithmetic",
        "mlsum-de",
    ]
    assert [t.metric for t in tasks] == [
        "accuracy",
        "accuracy",
        "rouge_l",
        "edit_similarity",
        "first_char",
        "accuracy",
        "accuracy",
        "sari",
    ]
    physics = tasks[4]
    ex = physics.test[0]
    assert ex.prompt.endswith("Answer:") and "(A) " in ex.prompt and ex.answer in {" A", " B", " C", " D"}
    letter = ex.answer.strip()
    chosen = ex.prompt.split(f"({letter}) ")[1].split("\n")[0]
    assert chosen == "abcd"[int(ex.prompt.split("question ")[1].split("\n")[0]) % 4]  # the option scored 1
    assert len(tasks[0].test) == mini_trace.TEST and len(tasks[0].eval) == mini_trace.EVAL
    assert len(tasks[0].train) == mini_trace.TRAIN
    assert tasks[7].train[0].answer.strip().count(".") == 1  # first sentence only
    again = mini_trace.build_tasks(_fake_sources(), seed=0)
    assert again[4].train == physics.train  # deterministic for a seed
    mini_trace.write_benchmark(tmp_path, tasks)
    assert [t.name for t in load_benchmark(tmp_path)] == [t.name for t in tasks]


def test_validation_split_is_disjoint_from_train_and_test_and_deterministic(tmp_path):
    import random

    from moecl.data.trace import Example

    pool = [Example(f"q{i}", f" {i % 3}") for i in range(1000)]
    train, held, test = mini_trace.split_pool(pool, random.Random("s"))
    assert (len(train), len(held), len(test)) == (mini_trace.TRAIN, mini_trace.EVAL, mini_trace.TEST)
    assert not {e.prompt for e in train} & {e.prompt for e in held}
    assert not {e.prompt for e in held} & {e.prompt for e in test}
    assert not {e.prompt for e in train} & {e.prompt for e in test}
    assert mini_trace.split_pool(pool, random.Random("s")) == (train, held, test)
    assert mini_trace.split_pool(pool, random.Random("t"))[1] != held
    small = mini_trace.split_pool(pool[:229], random.Random("s"))  # physics' size: a quarter each
    assert [len(x) for x in small] == [115, 57, 57]

    tasks = mini_trace.build_tasks(_fake_sources(), seed=0)
    mini_trace.write_benchmark(tmp_path, tasks)
    for task in load_benchmark(tmp_path):
        assert task.eval, task.name
        prompts = [{e.prompt for e in task.split(s)} for s in ("train", "eval", "test")]
        if task.name != "stdlib-py":  # generated lines may repeat, as code does
            assert not (prompts[0] & prompts[1]) and not (prompts[1] & prompts[2]) and not (prompts[0] & prompts[2])
