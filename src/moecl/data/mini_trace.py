"""``mini-trace``: an 8-task stream in TRACE's domains and order, built from real data offline.

TRACE's data cannot be fetched here; BIG-bench 1.0.0 (Apache-2.0) can, as a PyPI sdist of
``task.json`` files. Building downloads it once (``pip download --no-deps``, 358 MB), streams
only the nine files it needs out of the archive, and writes the tasks *in TRACE's on-disk format*
into the cache, so the same loader reads them and real TRACE data drops in with ``--data-dir``.
The build is deterministic (seeded samples and option orders).

| TRACE task (metric)     | mini-trace   | source (BIG-bench unless said)                          |
|-------------------------|--------------|---------------------------------------------------------|
| C-STANCE (accuracy)     | multiemo-en  | multiemo/all_text_en, review sentiment, 4 fixed letters |
| FOMC (accuracy)         | intent       | intent_recognition: an utterance's intent, 7 fixed letters |
| MeetingBank (ROUGE-L)   | xsum         | gem/xsum, one-sentence summary, article cut at 700 chars |
| Py150 (edit similarity) | stdlib-py    | next line of this Python's standard library, 8 lines in |
| ScienceQA (first char)  | physics      | physics: the formula that answers the question, letters |
| NumGLUE-cm (accuracy)   | math-qa      | elementary_math_qa/question_only, 5 letters             |
| NumGLUE-ds (accuracy)   | arithmetic   | arithmetic 2-digit +, -, x: the number                  |
| 20Minuten (SARI)        | mlsum-de     | gem/mlsum_de, German summary's first sentence           |

As in TRACE, several classification tasks answer in one format (option letters), so they compete
for the same output tokens. multiemo is taken in English, not Chinese as C-STANCE is: the default
model (SmolLM2-135M) reads English only, and did not rise above chance on the Chinese sentences.
``stdlib-py`` depends on the Python version that builds it.
"""

from __future__ import annotations

import random
import re
import shutil
import sysconfig
import tarfile
from collections.abc import Callable
from pathlib import Path

from moecl.data.trace import MANIFEST, Example, Task, write_benchmark
from moecl.io import pip_download

BIGBENCH = "bigbench==1.0.0"
SDIST = "bigbench-1.0.0.tar.gz"
PREFIX = "bigbench-1.0.0/bigbench/benchmark_tasks/"
VERSION = 2
"""Bumped when the build changes what it writes; the cache folder is ``mini-trace-v<VERSION>``,
so an older build is never read as the current one. v2: a validation split, larger test sets."""
TRAIN, EVAL, TEST = 500, 200, 200
"""Per-task caps; a smaller source gives a quarter of its pool to each of test and eval (physics:
229 items -> 57 / 57 / 115; intent: 693 -> 173 / 173 / 347)."""
DEFAULT_TASKS = ["multiemo-en", "intent", "arithmetic"]
"""What ``moecl run`` takes when no tasks are named (``--tasks all`` takes the 8): the tasks
SmolLM2-135M learns within minutes on two CPU cores, chosen on the validation split (README): two
answer with letters that mean different classes (so they interfere), one with a number."""
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def download_bigbench(downloads: Path) -> Path:
    """The BIG-bench sdist, downloaded once with pip (no dependencies, never installed)."""
    otherwise = f"place {SDIST} in {downloads} by hand, or use --benchmark smoke"
    return pip_download(BIGBENCH, SDIST, downloads, ("--no-binary", ":all:"), otherwise)


def read_members(sdist: Path, names: set[str]) -> dict[str, bytes]:
    """Stream the archive once and keep only the members named (relative to benchmark_tasks/)."""
    import json

    found: dict[str, bytes] = {}
    with tarfile.open(sdist, mode="r|gz") as tar:
        for member in tar:
            name = member.name.removeprefix(PREFIX)
            if member.name.startswith(PREFIX) and name in names:
                found[name] = tar.extractfile(member).read()
                if len(found) == len(names):
                    break
    missing = names - set(found)
    if missing:
        raise ValueError(f"{sdist} lacks {sorted(missing)}; delete it so that it is downloaded again")
    return {k: json.loads(v) for k, v in found.items()}


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


def multiple_choice(
    task: dict, instruction: str, rng: random.Random, fixed: bool = False, max_chars: int | None = None
) -> list[Example]:
    """Options labelled (A), (B), ...; the answer is the correct letter.

    ``fixed``: a classification task whose classes keep one order (sorted), so a letter always
    means the same class, as in TRACE's C-STANCE and FOMC; otherwise options are in a seeded
    random order, as in a multiple-choice exam. ``max_chars``: the input is cut at the last word
    boundary before this many characters (long reviews).
    """
    out = []
    for ex in task["examples"]:
        text = ex["input"].strip()
        if max_chars is not None and len(text) > max_chars:
            text = " ".join(text.split())[:max_chars].rsplit(" ", 1)[0] + " ..."
        options = sorted(ex["target_scores"]) if fixed else list(ex["target_scores"])
        if not fixed:
            rng.shuffle(options)
        best = max(options, key=lambda o: ex["target_scores"][o])
        listed = "\n".join(f"({LETTERS[i]}) {o}" for i, o in enumerate(options))
        out.append(Example(f"{instruction}\n{text}\nOptions:\n{listed}\nAnswer:", f" {LETTERS[options.index(best)]}"))
    return out


def summaries(task: dict, instruction: str, label: str, first_sentence: bool = False) -> list[Example]:
    out = []
    for ex in task["examples"]:
        target = ex["target"][0] if isinstance(ex["target"], list) else ex["target"]
        if first_sentence:
            target = re.split(r"(?<=[.!?])\s", target.strip(), maxsplit=1)[0]
        article = " ".join(ex["input"].split())[:700]
        out.append(Example(f"{instruction}\n{article}\n{label}:", f" {target.strip()}"))
    return out


def arithmetic(tasks: list[dict]) -> list[Example]:
    return [
        Example(
            f"{ex['input'].strip()}\nAnswer:", f" {ex['target'] if isinstance(ex['target'], str) else ex['target'][0]}"
        )
        for task in tasks
        for ex in task["examples"]
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


def build_tasks(data: dict[str, dict], seed: int) -> list[Task]:
    rng = lambda name: random.Random(f"mini-trace:{seed}:{name}")  # noqa: E731
    sentiment = "Is the opinion positive, negative, neutral or ambivalent?"
    makers: list[tuple[str, str, Callable[[], list[Example]]]] = [
        (
            "multiemo-en",
            "accuracy",
            lambda: multiple_choice(
                data["multiemo/all_text_en/task.json"], sentiment, rng("multiemo-en"), fixed=True, max_chars=400
            ),
        ),
        (
            "intent",
            "accuracy",
            lambda: multiple_choice(
                data["intent_recognition/task.json"],
                "What does the user want to do?",
                rng("intent"),
                fixed=True,
            ),
        ),
        (
            "xsum",
            "rouge_l",
            lambda: summaries(data["gem/xsum/task.json"], "Summarize the article in one sentence.", "Summary"),
        ),
        ("stdlib-py", "edit_similarity", lambda: stdlib_lines(rng("stdlib-py"), TRAIN + EVAL + TEST)),
        (
            "physics",
            "first_char",
            lambda: multiple_choice(
                data["physics/task.json"], "Which formula is most useful to answer the question?", rng("physics")
            ),
        ),
        (
            "math-qa",
            "accuracy",
            lambda: multiple_choice(
                data["elementary_math_qa/question_only/task.json"], "Solve the math word problem.", rng("math-qa")
            ),
        ),
        (
            "arithmetic",
            "accuracy",
            lambda: arithmetic(
                [data[f"arithmetic/2_digit_{op}/task.json"] for op in ("addition", "subtraction", "multiplication")]
            ),
        ),
        (
            "mlsum-de",
            "sari",
            lambda: summaries(
                data["gem/mlsum_de/task.json"],
                "Fasse den Artikel in einem Satz zusammen.",
                "Zusammenfassung",
                first_sentence=True,
            ),
        ),
    ]
    tasks = []
    for name, metric, make in makers:
        examples = make()
        if name == "multiemo-en":  # 8k reviews: sample before splitting
            examples = rng("pool").sample(examples, 2000)
        train, held, test = split_pool(examples, rng(f"split:{name}"))
        tasks.append(Task(name, metric, train, test, held))
    return tasks


SOURCES = {
    "multiemo/all_text_en/task.json",
    "intent_recognition/task.json",
    "gem/xsum/task.json",
    "physics/task.json",
    "elementary_math_qa/question_only/task.json",
    "arithmetic/2_digit_addition/task.json",
    "arithmetic/2_digit_subtraction/task.json",
    "arithmetic/2_digit_multiplication/task.json",
    "gem/mlsum_de/task.json",
}


def build_mini_trace(root: Path, seed: int = 0) -> Path:
    """Build mini-trace under ``root`` unless it is there already; return ``root``."""
    if (root / MANIFEST).is_file():
        return root
    data = read_members(download_bigbench(root.parent / "downloads"), SOURCES)
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write_benchmark(tmp, build_tasks(data, seed), default=DEFAULT_TASKS)
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)  # the manifest appears with the whole stream, never half of it
    return root
