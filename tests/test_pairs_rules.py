"""Pair rules of the correctness pipeline on fixed samples: grading, the entailment (substring)
skip, the per-question cap, format negatives."""

import random

import pytest

from mpo_fast.pairs.correctness import (
    COT_INSTRUCTION,
    CorrectnessConfig,
    Judged,
    build_pairs,
    cot_question,
    entailed,
    judge,
)


def cot(answer: str, why: str = "Counting the dots one by one.") -> str:
    return f"{why}\nFinal Answer: {answer}"


def test_judge_grades_and_flags_format_failures():
    responses = [cot("3"), cot("three"), cot("4"), "I think it is 3.", cot("13"),
                 "Final Answer: 3"]
    judged = judge(responses, "3")
    assert [j.correct for j in judged] == [True, True, False, False, False, False]
    assert [j.answer for j in judged] == ["3", "three", "4", None, "13", None]


def test_entailed_is_on_extracted_answers():
    assert entailed("3", "13") and entailed("Red", "red and blue")
    assert entailed("a  cat", "A CAT sitting")
    assert not entailed("13", "3") and not entailed("blue", "red")


def test_substring_skip():
    judged = judge([cot("3"), cot("13"), cot("3 or 4"), cot("5")], "3")
    ps = build_pairs(judged, max_pairs=15)
    rejected = sorted(r.answer for _, r in ps.pairs)
    assert rejected == ["5"]  # "13" and "3 or 4" contain the chosen answer "3"
    assert ps.stats["entailment_skipped"] == 2 and ps.stats["candidate_pairs"] == 1
    kept = build_pairs(judged, max_pairs=15, allow_entailment=True)
    assert sorted(r.answer for _, r in kept.pairs) == ["13", "3 or 4", "5"]


def test_substring_skip_uses_each_chosen_answer():
    # "three" is correct too, and is not inside "13": that pair survives
    judged = judge([cot("3"), cot("three"), cot("13")], "3")
    ps = build_pairs(judged, max_pairs=15)
    assert [(c.answer, r.answer) for c, r in ps.pairs] == [("three", "13")]


def test_per_question_cap_and_no_duplicates():
    rng = random.Random()
    n_right, n_wrong = rng.randint(4, 8), rng.randint(4, 8)
    responses = [cot("7", f"way {i}") for i in range(n_right)] + \
                [cot(str(20 + 2 * i), f"slip {i}") for i in range(n_wrong)]  # none has a 7
    responses += responses[:3]  # repeated samples are paired once
    rng.shuffle(responses)
    judged = judge(responses, "7")
    for cap in (0, 5, 15, n_right * n_wrong + 10):
        ps = build_pairs(judged, max_pairs=cap, rng=random.Random(cap))
        assert len(ps.pairs) == min(cap, n_right * n_wrong)
        assert len({(c.response, r.response) for c, r in ps.pairs}) == len(ps.pairs)
        assert all(c.correct and r.answer is not None and not r.correct for c, r in ps.pairs)
    assert ps.stats["samples"] == len(responses)


def test_cap_draw_is_seeded():
    judged = judge([cot("7", f"a{i}") for i in range(6)] + [cot("8", f"b{i}") for i in range(6)],
                   "7")
    a = build_pairs(judged, max_pairs=5, rng=random.Random("0:q1"))
    b = build_pairs(judged, max_pairs=5, rng=random.Random("0:q1"))
    assert a.pairs == b.pairs


def test_format_negatives_are_a_separate_capped_set():
    responses = [cot("B", "Option B fits."), cot("(B)", "B again."), cot("A", "Maybe A."),
                 "B", "The answer is B", "Final Answer: B", "reasoning\nFinal Answer:"]
    judged = judge(responses, "B")
    ps = build_pairs(judged, max_pairs=15)
    assert {(c.answer, r.answer) for c, r in ps.pairs} == {("B", "A"), ("(B)", "A")}
    assert len(ps.format_pairs) == 2 * 4  # 2 correct x 4 unparseable
    assert all(c.correct and r.answer is None for c, r in ps.format_pairs)
    assert ps.stats["format_failures"] == 4
    assert len(build_pairs(judged, max_pairs=3).format_pairs) == 3


def test_no_pairs_without_both_sides():
    all_right = judge([cot("2", f"r{i}") for i in range(4)], "2")
    ps = build_pairs(all_right)
    assert ps.pairs == [] and ps.format_pairs == [] and ps.stats["all_correct"] == 1
    all_wrong = judge([cot("5"), "garbage"], "2")
    ps = build_pairs(all_wrong)
    assert ps.pairs == [] and ps.format_pairs == [] and ps.stats["none_correct"] == 1


def test_cot_question_replaces_direct_instruction_and_keeps_images():
    q = "<image>\nHow many dots?\nAnswer the question using a single word or phrase."
    out = cot_question(q)
    assert out.startswith("<image>\n") and out.count("<image>") == 1
    assert "single word" not in out and "How many dots?" in out and "Final Answer:" in out
    assert cot_question("What?", "Q: {question} (end with Final Answer:)") == \
        "Q: What? (end with Final Answer:)"
    assert "{question}" in COT_INSTRUCTION


def test_config_checks():
    with pytest.raises(ValueError, match="num_samples"):
        CorrectnessConfig(num_samples=0)
    with pytest.raises(ValueError, match="question"):
        CorrectnessConfig(instruction="no slot")
    assert Judged("r", None, False).answer is None
