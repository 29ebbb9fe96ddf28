"""TRACE's per-task metrics (SPEC §5), each scoring one prediction on a 0-100 scale.

A task's score is the mean of its examples' scores, so every metric fits one contract:
``score(metric, prompt, answer, prediction) -> float``; the per-example numbers are what
``predictions/`` records.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable

from rapidfuzz import fuzz
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

_TOKENIZE_13A = Tokenizer13a()


def accuracy(prompt: str, answer: str, prediction: str) -> float:
    """Exact match after stripping surrounding whitespace."""
    return 100.0 * (prediction.strip() == answer.strip())


def first_char(prompt: str, answer: str, prediction: str) -> float:
    """ScienceQA: the first character (the option letter) decides."""
    p, a = prediction.strip(), answer.strip()
    return 100.0 * (bool(p) and bool(a) and p[0] == a[0])


def _lcs(a: list[str], b: list[str]) -> int:
    row = [0] * (len(b) + 1)
    for x in a:
        prev = 0
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], prev + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(prompt: str, answer: str, prediction: str) -> float:
    """ROUGE-L F1 on lower-cased whitespace tokens (MeetingBank)."""
    ref, hyp = answer.lower().split(), prediction.lower().split()
    if not ref or not hyp:
        return 100.0 * (ref == hyp)
    lcs = _lcs(ref, hyp)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(hyp), lcs / len(ref)
    return 100.0 * 2 * precision * recall / (precision + recall)


def _py150_normalise(code: str) -> str:
    code = re.sub(r"<STR_LIT:([^>]*)>", r"\1", code)
    code = code.replace("<NUM_LIT>", "0").replace("<STR_LIT>", "").replace("<CHAR_LIT>", "")
    return code.strip()


def edit_similarity(prompt: str, answer: str, prediction: str) -> float:
    """Py150: fuzzy ratio (0-100) after TRACE's literal-placeholder mapping."""
    return float(fuzz.ratio(_py150_normalise(prediction), _py150_normalise(answer)))


def _ngrams(tokens: list[str], n: int) -> list[str]:
    return [" ".join(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def _sari_ngram(s: list[str], c: list[str], refs: list[list[str]], numref: int) -> tuple[float, float, float]:
    """Keep F1, deletion precision and addition F1 for one n-gram order (Xu et al. 2016, with the
    keep-recall fix of the reference implementations)."""
    r_all = Counter(g for r in refs for g in r)
    s_count, c_count = Counter(s), Counter(c)
    s_rep = Counter({g: n * numref for g, n in s_count.items()})
    c_rep = Counter({g: n * numref for g, n in c_count.items()})

    keep = s_rep & c_rep
    keep_good = keep & r_all
    keep_all = s_rep & r_all
    keep_p = sum(keep_good[g] / keep[g] for g in keep_good) / len(keep) if keep else 1.0
    keep_r = sum(keep_good.values()) / sum(keep_all.values()) if keep_all else 1.0
    keep_f = 2 * keep_p * keep_r / (keep_p + keep_r) if keep_p + keep_r > 0 else 0.0

    delete = s_rep - c_rep
    delete_good = delete - r_all
    del_p = sum(delete_good[g] / delete[g] for g in delete_good) / len(delete) if delete else 1.0

    add = set(c_count) - set(s_count)
    add_good = add & set(r_all)
    add_all = set(r_all) - set(s_count)
    add_p = len(add_good) / len(add) if add else 1.0
    add_r = len(add_good) / len(add_all) if add_all else 1.0
    add_f = 2 * add_p * add_r / (add_p + add_r) if add_p + add_r > 0 else 0.0
    return keep_f, del_p, add_f


def sari_multi(source: str, prediction: str, references: list[str]) -> float:
    """SARI (0-100) of one prediction against several references, on lower-cased 13a tokens."""
    norm = [_TOKENIZE_13A(x.lower()).split(" ") for x in [source, prediction, *references]]
    s, c, refs = norm[0], norm[1], norm[2:]
    parts = [_sari_ngram(_ngrams(s, n), _ngrams(c, n), [_ngrams(r, n) for r in refs], len(refs)) for n in (1, 2, 3, 4)]
    return 100.0 * sum(sum(p[k] for p in parts) / 4 for k in range(3)) / 3


def sari(prompt: str, answer: str, prediction: str) -> float:
    """20Minuten: SARI with the prompt as the source and the answer as the one reference."""
    return sari_multi(prompt, prediction, [answer])


METRICS: dict[str, Callable[[str, str, str], float]] = {
    "accuracy": accuracy,
    "first_char": first_char,
    "rouge_l": rouge_l,
    "edit_similarity": edit_similarity,
    "sari": sari,
}


def score(metric: str, prompt: str, answer: str, prediction: str) -> float:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")
    return METRICS[metric](prompt, answer, prediction)
