import re
import warnings

import pytest

from moecl.evaluation.continual import backward_transfer, forward_transfer, overall_performance
from moecl.evaluation.metrics import accuracy, edit_similarity, first_char, rouge_l, sari, sari_multi, score


def test_sari_matches_the_published_value():
    value = sari_multi(
        "About 95 species are currently accepted.",
        "About 95 you now get in.",
        ["About 95 species are currently known.", "About 95 species are now accepted.", "95 species are now accepted."],
    )
    assert value == pytest.approx(26.9536, abs=1e-4)


def test_sari_of_copying_the_reference_beats_copying_the_source():
    src, ref = "the cat sat on the mat today", "the cat sat"
    assert sari(src, ref, ref) > sari(src, ref, src)


# Pairs (answer, prediction) with punctuation, casing, unicode, repeated words, several
# sentences and empty or blank sides: where hand-written metrics part from the reference ones.
PAIRS = [
    ("Council approved the 2024 budget.", "The council approved the budget, 5-2."),
    ("the city s plan revised passed", "The city's plan (revised) passed!"),
    ("Die Stadt plant   einen Neubau.", "die Stadt plant einen Neubau"),
    ("Zürich wählt grün. Café öffnet.", "Zürich wählt Grün. Café öffnet heute."),
    ("a b a b a", "b a b"),
    ("the cat. the dog. a bird", "a bird. the dog"),
    ("same text", "same text"),
    ("x", "y"),
    ("def f(x): return x", "def f(y): return y"),
    ("  padded ", "padded"),
    ("...", "some words"),
    ("answer", " "),
    ("answer", ""),
    ("", "prediction"),
    ("", ""),
]


def test_rouge_l_is_the_rouge_package_that_trace_calls():
    """TRACE scores MeetingBank with ``Rouge(metrics=["rouge-l"]).get_scores(target,
    prediction)`` (rouge 1.0.1), skipping (so scoring 0) an empty side; the package itself
    refuses a text with no sentence."""
    from rouge import Rouge

    reference = Rouge(metrics=["rouge-l"])
    for answer, prediction in PAIRS:
        try:
            expected = (
                0.0 if "" in (answer, prediction) else 100 * reference.get_scores(answer, prediction)[0]["rouge-l"]["f"]
            )
        except ValueError:  # "Collections must contain at least 1 sentence."
            expected = 0.0
        assert rouge_l("", answer, prediction) == pytest.approx(expected, abs=1e-9), (answer, prediction)
    # The two pairs that moecl's earlier lower-cased whitespace LCS scored 54.55 and 36.36.
    assert rouge_l("", *PAIRS[0]) == pytest.approx(36.3636, abs=1e-4)
    assert rouge_l("", *PAIRS[1]) == pytest.approx(18.1818, abs=1e-4)


def _trace_py150(code: str) -> str:
    """TRACE's Py150 post-processing, step by step: bare placeholders, then each literal found."""
    code = code.replace("<NUM_LIT>", "0").replace("<STR_LIT>", "").replace("<CHAR_LIT>", "")
    for kind, value in re.findall(re.compile(r"<(STR|NUM|CHAR)_LIT:(.*?)>", re.S), code):
        code = code.replace(f"<{kind}_LIT:{value}>", value)
    return code


CODE = [
    ("x = <NUM_LIT>", "x = 0"),
    ("f(<STR_LIT:hi>)", "f(hi)"),
    ("print(<STR_LIT>)", "print()"),
    ("c = <CHAR_LIT:a> + <NUM_LIT:3>", "c = a + 3"),
    ("for i in range(<NUM_LIT>):", "for j in range(10):"),
    ("return self.name  ", "return self.name"),
    ("s = '<STR_LIT:é>'", "s = 'é'"),
    ("<STR_LIT>", "x"),
    ("x" * 300 + "y" * 50, "x" * 290 + "z" * 40),  # difflib's autojunk applies past 200 characters
]


def test_edit_similarity_is_the_fuzzywuzzy_ratio_that_trace_calls():
    """TRACE scores Py150 with ``fuzzywuzzy.fuzz.ratio`` (no python-Levenshtein in its
    requirements, so difflib), after its literal mapping, skipping an empty side."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Using slow pure-python SequenceMatcher"
        from fuzzywuzzy import fuzz
    for answer, prediction in [*CODE, *PAIRS]:
        pred, ref = _trace_py150(prediction), _trace_py150(answer)
        expected = 0 if "" in (pred, ref) else fuzz.ratio(pred, ref)
        assert edit_similarity("", answer, prediction) == expected, (answer, prediction)


def _trace_science_qa(text: str) -> str:
    return "" if text.find("Answer: ") == -1 else text[text.find("Answer: ") + 8 : text.find("Answer: ") + 9]


def test_exact_match_and_the_science_qa_letter_are_trace_s():
    for answer, prediction in PAIRS:
        expected = 0.0 if "" in (answer, prediction) else 100.0 * (prediction == answer)
        assert accuracy("", answer, prediction) == expected
    assert accuracy("", "", "") == 0.0 and accuracy("", "A", "A") == 100.0 and accuracy("", "A", "a") == 0.0
    # The stream's answers open with the space that separates them from the prompt.
    assert score("accuracy", "Q:", " A", "A") == 100.0 and score("edit_similarity", "", " x = 1", "x = 1") == 100.0
    for answer, prediction in [
        ("Answer: B Because the sun is a star.", "Answer: B Because it glows."),
        ("Answer: B Because the sun is a star.", "Answer: C"),
        ("Answer: B Because the sun is a star.", "B"),
        ("Answer: B", "Answer: "),
    ]:
        expected = _trace_science_qa(answer)
        assert first_char("", answer, prediction) == 100.0 * (
            expected != "" and _trace_science_qa(prediction) == expected
        )
    # A bare-letter answer (mini-trace's sciq): TRACE's rule would score every example 0, so the
    # first characters are compared instead: the one place moecl departs from it on purpose.
    assert first_char("", "B", "B) because") == 100.0 and first_char("", "B", "") == 0.0


def test_sari_of_an_empty_prediction_is_still_scored():
    assert (
        0
        < sari("the cat sat on the mat today", "the cat sat", "")
        < sari("the cat sat on the mat today", "the cat sat", "the cat sat")
    )


def test_unknown_metrics_are_refused():
    with pytest.raises(ValueError, match="unknown metric"):
        score("bleu", "", "", "")


R = [[80.0, None, None], [60.0, 70.0, None], [50.0, 65.0, 90.0]]


def test_op_bwt_fwt_on_hand_computed_values():
    assert overall_performance(R) == pytest.approx((50 + 65 + 90) / 3)
    assert overall_performance(R, 1) == pytest.approx(65.0)
    # seed: (1/3)[(50-80) + (65-70) + 0]
    assert backward_transfer(R) == pytest.approx(-35 / 3)
    assert backward_transfer(R, "lopez-paz") == pytest.approx(-35 / 2)
    assert backward_transfer([[50.0, None], [60.0, 40.0]], "forgetting") == 0.0  # gains clipped
    assert backward_transfer([[50.0]], "lopez-paz") is None
    assert forward_transfer(R, [10.0, 20.0, 30.0]) is None  # R[0][1] was not evaluated
    full = [[80.0, 25.0, 35.0], [60.0, 70.0, 40.0], [50.0, 65.0, 90.0]]
    assert forward_transfer(full, [10.0, 20.0, 30.0]) == pytest.approx(((25 - 20) + (40 - 30)) / 2)
