"""TRACE's per-task metrics (arXiv 2310.06762), each scoring one prediction on a 0-100 scale.

A task's score is the mean of its examples' scores, so every metric fits one contract:
``score(metric, prompt, answer, prediction) -> float``; the per-example numbers are what
``predictions/`` records. Each metric behaves as the implementation TRACE's evaluation calls
(*TRACE: A Comprehensive Benchmark for Continual Learning in Large Language Models*,
arXiv 2310.06762), checked against it in ``tests/evaluation/test_metrics.py``:

========================  ===========================================================
accuracy                  exact string match; an empty prediction or answer scores 0
first_char                TRACE's ScienceQA rule: the character after ``Answer: ``;
                          a bare-letter answer (no ``Answer: ``) compares first characters
rouge_l                   ``rouge`` 1.0.1, ``Rouge(metrics=["rouge-l"])``, F of
                          ``get_scores(answer, prediction)``
edit_similarity           ``fuzzywuzzy`` 0.18.0 ``fuzz.ratio`` (difflib, an integer)
                          after TRACE's Py150 literal mapping
sari                      Hugging Face ``evaluate``'s ``sari`` (lower-cased 13a tokens)
========================  ===========================================================

As in TRACE, an empty prediction or answer scores 0 under every metric but SARI.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from difflib import SequenceMatcher

from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

_TOKENIZE_13A = Tokenizer13a()


def accuracy(prompt: str, answer: str, prediction: str) -> float:
    """Exact match (predictions arrive stripped of surrounding whitespace, see
    :func:`moecl.evaluation.generation.postprocess`)."""
    return 100.0 * (prediction != "" and answer != "" and prediction == answer)


def first_char(prompt: str, answer: str, prediction: str) -> float:
    """ScienceQA: the option letter decides. In TRACE's format (``Answer: B Because ...``) the
    letter is the character after ``Answer: `` in both texts; an answer without it is a bare
    letter, compared with the prediction's first character."""
    if "Answer: " in answer:
        answer, prediction = _after_answer(answer), _after_answer(prediction)
    else:
        answer, prediction = answer.strip()[:1], prediction.strip()[:1]
    return 100.0 * (prediction != "" and prediction == answer)


def _after_answer(text: str) -> str:
    at = text.find("Answer: ")
    return "" if at == -1 else text[at + 8 : at + 9]


def _sentences(text: str) -> list[list[str]]:
    """The ``rouge`` package's tokens: sentences split at every '.', words at single spaces
    after collapsing whitespace; case and other punctuation are kept."""
    kept = [" ".join(part.split()) for part in text.split(".") if part]
    return [sentence.split(" ") for sentence in kept]


def _lcs_words(x: list[str], y: list[str]) -> set[str]:
    """The words of one longest common subsequence of ``x`` and ``y``, traced back through the
    table as the ``rouge`` package does (on a tie, step back in ``y``)."""
    table = [[0] * (len(y) + 1) for _ in range(len(x) + 1)]
    for i, a in enumerate(x, 1):
        for j, b in enumerate(y, 1):
            table[i][j] = table[i - 1][j - 1] + 1 if a == b else max(table[i - 1][j], table[i][j - 1])
    words, i, j = set(), len(x), len(y)
    while i and j:
        if x[i - 1] == y[j - 1]:
            words.add(x[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return words


def rouge_l(prompt: str, answer: str, prediction: str) -> float:
    """ROUGE-L F as TRACE computes it (MeetingBank): the ``rouge`` package's summary-level
    ROUGE-L, with the answer as its hypothesis and the prediction as its reference; lengths and
    overlaps count distinct words (the package's default ``exclusive=True``)."""
    if answer == "" or prediction == "":
        return 0.0
    hyp, ref = _sentences(answer), _sentences(prediction)
    if not hyp or not ref:  # only dots: the package refuses it, TRACE counts it as 0
        return 0.0
    union: set[str] = set()
    for r in ref:
        for h in hyp:
            union |= _lcs_words(r, h)
    recall = len(union) / len({w for s in ref for w in s})
    precision = len(union) / len({w for s in hyp for w in s})
    return 100.0 * 2.0 * precision * recall / (precision + recall + 1e-8)


def _py150_literals(code: str) -> str:
    """TRACE's Py150 post-processing: bare placeholders first, then ``<KIND_LIT:value>`` -> value."""
    code = code.replace("<NUM_LIT>", "0").replace("<STR_LIT>", "").replace("<CHAR_LIT>", "")
    return re.sub(r"<(?:STR|NUM|CHAR)_LIT:(.*?)>", r"\1", code, flags=re.S)


def edit_similarity(prompt: str, answer: str, prediction: str) -> float:
    """Py150: ``fuzzywuzzy``'s ratio (difflib's matching-block ratio, rounded to an integer)
    after TRACE's literal-placeholder mapping."""
    pred, ref = _py150_literals(prediction), _py150_literals(answer)
    if pred == "" or ref == "":
        return 0.0
    return float(round(100 * SequenceMatcher(None, pred, ref).ratio()))


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
    """One example's score under ``metric``. The answer loses its surrounding whitespace first:
    in the stream's format it opens with the space that separates it from the prompt (``" B"``),
    and a prediction arrives stripped (:func:`moecl.evaluation.generation.postprocess`)."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")
    return METRICS[metric](prompt, answer.strip(), prediction)
