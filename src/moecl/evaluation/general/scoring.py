"""Scoring a suite through lm-evaluation-harness, and pairing before with after.

lm-eval's ``HFLM`` wraps our in-memory model and tokenizer, and each manifest becomes an lm-eval
task over the local file (``dataset_path: json``): lm-eval computes the log-likelihoods and the
accuracy. We only read back its per-item results, to pair before and after on the same items."""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from moecl.evaluation.general.benchmarks import BENCHMARKS, DEFAULT_LIMIT, Benchmark, manifest, suite_benchmarks
from moecl.io import atomic_write_json
from moecl.models.loading import cache_dir


class LMView(nn.Module):
    """What lm-eval's ``HFLM`` needs of a model: the adapted model's forward and generation
    (adapters, router, task routing), the base model's Hugging Face config (context length and
    vocabulary), its name, device and a ``tie_weights`` that leaves the loaded weights alone."""

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

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any):
        """The adapted model's own generation (lm-eval's ``generate_until`` tasks): its routing
        and adapters apply to every generated token, as in the run's evaluation."""
        return self.inner.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


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
        benchmarks = {name: manifest(name, limit) for name in suite_benchmarks(suite)}
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "right"  # lm-eval pads continuations on the right
    try:
        lm = HFLM(pretrained=LMView(model, base_model), tokenizer=tokenizer, batch_size=batch_size)
        out = simple_evaluate(
            model=lm,
            tasks=[_benchmark(name).task(name, path) for name, path in benchmarks.items()],
            log_samples=True,
            bootstrap_iters=0,
            verbosity="ERROR",
        )
    finally:
        tokenizer.padding_side = padding_side
    scores = {}
    for name in benchmarks:
        benchmark = _benchmark(name)
        samples = [s for s in out["samples"][f"moecl_{name}"] if s.get("filter", "none") == benchmark.filter]
        samples.sort(key=lambda s: s["doc_id"])
        scores[name] = BenchmarkScore(name, benchmark.metric, [float(s[benchmark.metric]) for s in samples])
    return scores


def _benchmark(name: str) -> Benchmark:
    """A known benchmark, or a hand-made multiple-choice file's (tests), scored by accuracy."""
    return BENCHMARKS.get(name) or Benchmark(name, lambda root: [])


def manifest_digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for path in paths:
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def base_scores(
    model_name: str, base_model: PreTrainedModel, tokenizer, suite: str, limit: int | None, dtype: torch.dtype
) -> dict[str, BenchmarkScore]:
    """The base model's scores, computed once per (model, suite, manifests, dtype) and cached."""
    names = suite_benchmarks(suite)
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
