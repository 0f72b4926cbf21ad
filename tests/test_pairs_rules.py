"""Pair rules of the correctness pipeline on fixed samples: grading, the entailment (substring)
skip, the per-question cap, format negatives; empty responses never paired (both pipelines, down
to the trainer's loader); DropoutNTP's prefix rules; the generation length default."""

import json
import random

import pytest

from mpo_fast.data.formats import load_dataset
from mpo_fast.pairs import cli as pairs_cli
from mpo_fast.pairs.correctness import (
    COT_INSTRUCTION,
    CorrectnessConfig,
    Judged,
    build_pairs,
    cot_question,
    entailed,
    is_blank,
    judge,
    run_correctness,
)
from mpo_fast.pairs.dropout_ntp import run_dropout_ntp, truncate_words
from mpo_fast.pairs.generate import MAX_NEW_TOKENS, SamplingConfig

BLANKS = ("", " ", "\n\n", "\t \n ", "\u3000")  # \u3000: the ideographic space


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


# --------------------------------------------------------------------------- empty responses


def test_blank_responses_are_never_paired():
    rng = random.Random()
    blanks = [rng.choice(BLANKS) for _ in range(rng.randint(1, 4))]
    responses = [cot("6", "Two rows of three."), cot("8", "Miscounted."), "Six, surely.",
                 *blanks]
    rng.shuffle(responses)
    ps = build_pairs(judge(responses, "6"), max_pairs=15)
    assert [(c.answer, r.answer) for c, r in ps.pairs] == [("6", "8")]
    assert [r.response for _, r in ps.format_pairs] == ["Six, surely."]  # not the blanks
    assert ps.stats["empty"] == len(blanks)
    assert ps.stats["format_failures"] == 1 + len(blanks)  # still counted as failures
    assert all(is_blank(b) for b in BLANKS) and not is_blank(" x ")


def test_blank_only_negatives_make_no_pairs():
    ps = build_pairs(judge([cot("6"), "", "   "], "6"), max_pairs=15)
    assert ps.pairs == [] and ps.format_pairs == []
    assert ps.stats["empty"] == 2 and ps.stats["all_correct"] == 0


class ScriptedGenerator:
    """Returns the scripted responses in turn (cycling): no model, no images."""

    def __init__(self, responses, batch_size=64):
        self.responses, self.batch_size, self.progress, self.n = list(responses), batch_size, \
            False, 0

    def __call__(self, prompts, desc=""):
        out = [self.responses[(self.n + i) % len(self.responses)] for i in range(len(prompts))]
        self.n += len(prompts)
        return out


def test_correctness_run_writes_no_blank_answer_and_the_loader_takes_every_pair(tmp_path):
    """Blank samples among right, wrong and unparseable ones: the written pairs and format
    pairs all load through the trainer's loader with on_error="raise"."""
    items = [{"id": f"q{i}", "question": f"How many? #{i}", "answer": "6"} for i in range(3)]
    gen = ScriptedGenerator([cot("6", "Rows of three."), "", cot("9", "Miscounted."), "  \n",
                             "Six.", "\t", cot("6", "Pairs of two.")])
    summary = run_correctness(items, gen, tmp_path, "q", config=CorrectnessConfig(num_samples=7),
                              log=lambda s: None)
    assert summary["empty"] == 3 * 3 and summary["pairs"] > 0 and summary["format_pairs"] > 0
    records = [json.loads(line) for name in ("q.jsonl", "q_format.jsonl")
               for line in (tmp_path / name).read_text().splitlines()]
    assert len(records) == summary["pairs"] + summary["format_pairs"]
    assert all(r["chosen"].strip() and r["rejected"].strip() for r in records)
    examples, _ = load_dataset(str(tmp_path / "meta.json"), on_error="raise")
    assert len(examples) == len(records)


def test_dropout_ntp_skips_blank_chosen_and_never_writes_a_blank_rejected(tmp_path):
    items = [{"id": "a", "question": "Describe.", "chosen": ""},
             {"id": "b", "question": "Describe.", "chosen": " \n "},
             {"id": "c", "question": "Describe.", "chosen": "one"},  # 1 word: too short
             {"id": "d", "question": "Describe.", "chosen": "a red ball on a table"},
             {"id": "e", "question": "Describe.", "chosen": "two blue cups  "}]
    # continuations: "" for d (the prefix "a red ball" alone is the rejected answer); e's
    # prefix "two" continued by its own rest plus whitespace: identical up to it, skipped
    gen = ScriptedGenerator(["", " blue cups \n"])
    summary = run_dropout_ntp(items, gen, tmp_path, "d", log=lambda s: None)
    assert (summary["empty"], summary["too_short"], summary["identical"], summary["pairs"]) == \
        (2, 1, 1, 1)
    (record,) = [json.loads(line) for line in (tmp_path / "d.jsonl").read_text().splitlines()]
    assert record["id"] == "d" and record["rejected"] == "a red ball"
    assert record["chosen"].startswith(record["rejected"])  # differs only after the prefix


def test_prefix_is_the_first_floor_ratio_words_with_their_whitespace():
    text = "  one\ttwo  three\nfour five "
    assert truncate_words(text, 0.5) == "  one\ttwo"  # floor(5 * 0.5) = 2 words
    assert truncate_words(text, 0.75) == "  one\ttwo  three"  # floor(3.75) = 3
    assert truncate_words("one", 0.5) is None and truncate_words("   ", 0.5) is None
    assert truncate_words("one two", 0.5) == "one"  # 2 = 1 / ratio words: the shortest kept


# --------------------------------------------------------------------------- generation length


def test_generation_length_defaults_to_the_authors_2048():
    assert MAX_NEW_TOKENS == 2048 and SamplingConfig().max_new_tokens == 2048
    parser = pairs_cli.argparse.ArgumentParser()
    pairs_cli.configure(parser)
    base = ["--model", "m", "--data", "d.jsonl", "--out", "o"]
    for command in ("correctness", "dropout-ntp"):
        assert parser.parse_args([command, *base]).max_new_tokens == 2048
        args = parser.parse_args([command, *base, "--max-new-tokens", "4096"])
        assert args.max_new_tokens == 4096
    assert "2048" in parser._subparsers._group_actions[0].choices["correctness"].format_help()
