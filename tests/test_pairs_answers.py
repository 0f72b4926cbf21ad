"""Answer extraction and matching (mpo_fast.pairs.answers) on tables of cases."""

import random

import pytest

from mpo_fast.pairs.answers import (
    extract_answer,
    infer_kind,
    match_answer,
    normalize_text,
    parse_choice,
    parse_number,
    parse_response,
    parse_yesno,
    similarity,
    text_match,
)

# ---------------------------------------------------------------- extraction

EXTRACT = [  # response, strict answer (None: a format failure)
    ("Two plus two.\nFinal Answer: 4", "4"),
    ("reasoning\nFinal answer: 4.", "4"),
    ("reasoning\nFINAL ANSWER:4", "4"),
    ("reasoning\n**Final Answer:** 12 cm", "12 cm"),
    ("reasoning\nFinal Answer: **B**", "B"),
    ("reasoning. The final answer is 7", "7"),
    ("reasoning\nFinal answer is: (C)", "(C)"),
    ("reasoning\nFinal Answer:\n\n  yes  \n", "yes"),
    ("reasoning\nFinal Answer: \\boxed{3/4}", "3/4"),
    ("reasoning\nFinal Answer: $-2.5$", "-2.5"),
    ("first guess\nFinal Answer: 3\nwait, recount\nFinal Answer: 5", "5"),  # the last wins
    ("no trigger at all: 4", None),
    ("reasoning\nFinal Answer:", None),  # empty answer
    ("reasoning\nFinal Answer:   \n\n", None),
    ("Final Answer: 4", None),  # no reasoning before the trigger
    ("**Final Answer:** 4", None),
    ("r\nFinal Answer: 1\nFinal Answer: 2\nFinal Answer: 3", None),  # looping model
    ("Before the final answer, I count 3 dots.", None),  # "final answer" without ':' / 'is'
]


@pytest.mark.parametrize("response, expected", EXTRACT)
def test_parse_response_table(response, expected):
    parsed = parse_response(response)
    assert (parsed.answer if parsed else None) == expected
    if parsed:
        assert parsed.rationale and "final answer" not in parsed.rationale.lower()[-15:]


def test_extract_answer_lenient_for_direct_answers():
    assert extract_answer("  5 \n", require_trigger=False) == "5"
    assert extract_answer("5", require_trigger=True) is None
    assert extract_answer("Final Answer: 5", require_trigger=True) == "5"  # no rationale needed
    assert extract_answer("The answer\n is  B.", require_trigger=False) == "The answer is B"
    assert extract_answer("", require_trigger=False) is None


# ---------------------------------------------------------------- numbers

NUMBERS = [  # answer, value, percent
    ("42", 42.0, False), ("-3", -3.0, False), ("−7", -7.0, False), ("x = -3", -3.0, False),
    ("1,234.5 cm", 1234.5, False), ("$1,200", 1200.0, False), ("10,000,000", 1e7, False),
    ("12.5%", 12.5, True), ("3/4", 0.75, False), (".5", 0.5, False), ("2.5e-2 m", 0.025, False),
    ("about 3 apples", 3.0, False), ("2 + 3 = 5", 5.0, False), ("2-3", 3.0, False),
    ("three", 3.0, False), ("Twelve birds", 12.0, False),
]


@pytest.mark.parametrize("answer, value, percent", NUMBERS)
def test_parse_number_table(answer, value, percent):
    n = parse_number(answer)
    assert n is not None and n.value == pytest.approx(value) and n.percent == percent


@pytest.mark.parametrize("answer", ["", "none of them", "blue", "n/a"])
def test_parse_number_none(answer):
    assert parse_number(answer) is None


NUMBER_MATCH = [  # prediction, ground truth, correct
    ("4", "4", True), ("4.0", "4", True), ("four", "4", True), ("4 apples", "4", True),
    ("1,200", "1200", True), ("$1,200.00", "1200", True), ("12 cm", "12", True),
    ("25", "25%", True), ("0.25", "25%", True), ("25%", "0.25", True), ("-3", "-3", True),
    ("3/4", "0.75", True), ("0.333", "0.33", True),  # rounding to the ground truth's decimals
    ("3", "-3", False), ("3.4", "3", False), ("13", "3", False), ("0.3", "0.33", False),
    ("1.2", "12", False), ("24%", "25%", False), ("none", "0", False), ("", "4", False),
]


@pytest.mark.parametrize("pred, gt, ok", NUMBER_MATCH)
def test_number_match_table(pred, gt, ok):
    assert match_answer(pred, gt, kind="number") is ok


def test_number_match_fresh_values():
    rng = random.Random()
    for _ in range(50):
        v = round(rng.uniform(-1e6, 1e6), rng.randint(0, 3))
        gt = f"{v:,}"
        assert match_answer(f"{v}", gt, kind="number"), gt
        assert match_answer(f"The total is {gt} units", gt, kind="number"), gt
        assert not match_answer(f"{v + max(1.0, abs(v)) * 0.01}", gt, kind="number"), gt


def test_relaxed_numeric_tolerance():
    assert not match_answer("104", "100", kind="number")
    assert match_answer("104", "100", kind="number", rel_tol=0.05)
    assert not match_answer("106", "100", kind="number", rel_tol=0.05)


# ---------------------------------------------------------------- choices, yes/no

CHOICES = [  # answer, letter
    ("B", "B"), ("b", "B"), ("(B)", "B"), ("(b)", "B"), ("B.", "B"), ("B)", "B"), ("B:", "B"),
    ("B. a cat", "B"), ("(B) a cat", "B"), ("B) a cat", "B"), ("Answer: b", "B"),
    ("The answer is D.", "D"), ("Option C", "C"), ("option (c)", "C"),
    ("A cat", None), ("cat", None), ("", None), ("BC", None),
]


@pytest.mark.parametrize("answer, letter", CHOICES)
def test_parse_choice_table(answer, letter):
    assert parse_choice(answer) == letter


def test_choice_with_option_texts():
    choices = ["a dog", "a cat", "a bird"]
    assert parse_choice("cat", choices) == "B"
    assert parse_choice("The Bird.", choices) == "C"
    assert parse_choice("D", choices) is None  # not one of the 3 options
    assert match_answer("a cat", "B", choices=choices)
    assert match_answer("(B)", "a cat", choices=choices)  # ground truth given as the text
    assert not match_answer("(A)", "B", choices=choices)
    assert not match_answer("fish", "B", choices=choices)


@pytest.mark.parametrize("answer, yn", [("Yes", "yes"), ("yes.", "yes"),
                                        ("No, there is none", "no"), ("TRUE", "yes"),
                                        ("false", "no"), ("Not sure", None),
                                        ("Nope", None), ("maybe", None), ("**Yes**", "yes")])
def test_parse_yesno_table(answer, yn):
    assert parse_yesno(answer) == yn


def test_yesno_match():
    assert match_answer("Yes, it is.", "yes") and match_answer("no", "No")
    assert not match_answer("no", "yes") and not match_answer("Not sure", "no")


# ---------------------------------------------------------------- short strings

TEXT_MATCH = [  # prediction, ground truth, correct
    ("red car", "The red car.", True), ("Red  Car", "red car", True), ("apples", "apple", True),
    ("San Fransisco", "San Francisco", True), ("Mississipi", "Mississippi", True),
    ("don't know", "do not know", True),
    # near-identical strings that mean the opposite, or another thing
    ("increase", "decrease", False), ("impossible", "possible", False),
    ("invisible", "visible", False), ("unsafe", "safe", False), ("not red", "red", False),
    ("the left side", "the right side", False), ("route 66", "route 67", False),
    ("cat", "car", False), ("horse", "house", False), ("red", "", False),
]


@pytest.mark.parametrize("pred, gt, ok", TEXT_MATCH)
def test_text_match_table(pred, gt, ok):
    assert text_match(pred, gt) is ok
    assert match_answer(pred, gt, kind="text") is ok


def test_similarity_extremes():
    rng = random.Random()
    letters = "abcdefghijklmnopqrstuvwxyz"
    s = "".join(rng.choice(letters) for _ in range(rng.randint(8, 30)))
    assert similarity(s, s) == 1.0
    assert similarity("", "") == 1.0 and similarity(s, "") == 0.0 and similarity("", s) == 0.0
    disjoint = "".join(rng.choice("0123456789") for _ in range(len(s)))
    assert similarity(s, disjoint) == 0.0  # every character substituted
    one_typo = s[:3] + ("x" if s[3] != "x" else "y") + s[4:]
    assert similarity(s, one_typo) == pytest.approx(1 - 1 / len(s))
    # the scorer's extremes: identical and one typo in a long answer count, unrelated does not
    assert text_match(s, s) and text_match(one_typo, s) == (1 - 1 / len(s) >= 0.85)
    assert not text_match(disjoint, s)
    long = "the quick brown fox jumps over the lazy dog"
    assert text_match(long.replace("quick", "quikc"), long)
    assert not text_match(long.replace("over", "under"), long)  # an antonym, one word apart
    assert not text_match("the fox does not jump", "the fox does jump")  # a negation


def test_normalize_text():
    assert normalize_text("The  Cats, ARE here!") == "cat are here"
    assert normalize_text("1,234.5 units.") == "1234.5 unit"
    assert normalize_text("three dogs") == "3 dog"


# ---------------------------------------------------------------- dispatch

@pytest.mark.parametrize("gt, kind", [("B", "choice"), ("(C)", "choice"), ("yes", "yesno"),
                                      ("No", "yesno"), ("42", "number"), ("12 cm", "number"),
                                      ("$1,200", "number"), ("25%", "number"),
                                      ("red car", "text"), ("3 red and 2 blue", "text")])
def test_infer_kind(gt, kind):
    assert infer_kind(gt) == kind


def test_match_answer_rejects_bad_input():
    assert not match_answer(None, "4") and not match_answer("  ", "4")
    with pytest.raises(ValueError, match="kind"):
        match_answer("4", "4", kind="numeric")
    with pytest.raises(ValueError, match="number"):
        match_answer("4", "a dog", kind="number")
