import json

import pytest

from moecl.data.smoke import build_smoke
from moecl.data.trace import DataError, load_benchmark


def _write(root, task, split, content: bytes):
    path = root / task / f"{split}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def _good(root, task="FOMC"):
    rec = json.dumps([{"prompt": "p", "answer": "a"}]).encode()
    _write(root, task, "train", rec)
    _write(root, task, "test", rec)


def test_reads_trace_layout_in_trace_order_with_its_metrics(tmp_path):
    for task in ("ScienceQA", "C-STANCE", "Py150"):
        _good(tmp_path, task)
    tasks = load_benchmark(tmp_path)
    assert [t.name for t in tasks] == ["C-STANCE", "Py150", "ScienceQA"]
    assert [t.metric for t in tasks] == ["accuracy", "edit_similarity", "first_char"]
    assert [t.name for t in load_benchmark(tmp_path, tasks=["Py150", "C-STANCE"])] == ["Py150", "C-STANCE"]
    with pytest.raises(DataError, match="no task folder for Nope"):
        load_benchmark(tmp_path, tasks=["Nope"])


@pytest.mark.parametrize(
    "content, message",
    [
        (b'[{"prompt": "p"}]', r"test.json: record 0: field 'answer' is missing"),
        (b'[{"prompt": "p", "answer": "a"}, {"prompt": 3, "answer": "a"}]', r"record 1: field 'prompt' is a int"),
        (b'{"prompt": "p", "answer": "a"}', r"test.json: expected a JSON list"),
        (b"[]", r"test.json: the split is empty"),
        (b'[{"prompt": "p", "answer": "a"},', r"test.json: invalid JSON at line 1"),
        ('[{"prompt": "é", "answer": "a"}]'.encode("latin-1"), r"test.json: not UTF-8"),
        (b'["just text"]', r"record 0 is a str"),
    ],
)
def test_bad_files_name_file_record_and_field(tmp_path, content, message):
    _good(tmp_path)
    _write(tmp_path, "FOMC", "test", content)
    with pytest.raises(DataError, match=message):
        load_benchmark(tmp_path)


def test_caps_are_seeded_samples(tmp_path):
    root = build_smoke(tmp_path / "smoke")
    a = load_benchmark(root, train_size=5, test_size=3, seed=1)
    b = load_benchmark(root, train_size=5, test_size=3, seed=1)
    assert [len(t.train) for t in a] == [5] * 4 and [len(t.test) for t in a] == [3] * 4
    assert a[0].train == b[0].train
    assert a[0].train != load_benchmark(root, train_size=5, seed=2)[0].train
    assert [t.metric for t in a] == ["accuracy", "accuracy", "accuracy", "rouge_l"]
