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


def test_exact_match_and_first_character():
    assert accuracy("", " A", "A ") == 100.0 and accuracy("", "A", "B") == 0.0
    assert first_char("", "B", "B) because") == 100.0 and first_char("", "B", "") == 0.0


def test_rouge_l_on_a_hand_computed_pair():
    # LCS("a b c d", "a c d e") = "a c d" = 3; P = R = 3/4 -> F = 75
    assert rouge_l("", "a b c d", "a c d e") == pytest.approx(75.0)
    assert rouge_l("", "a b", "") == 0.0


def test_edit_similarity_maps_py150_placeholders():
    assert edit_similarity("", "x = <NUM_LIT>", "x = 0") == 100.0
    assert edit_similarity("", "f(<STR_LIT:hi>)", "f(hi)") == 100.0
    assert edit_similarity("", "print(<STR_LIT>)", "print()") == 100.0
    assert 0 < edit_similarity("", "abcd", "abce") < 100
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
