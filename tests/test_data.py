"""mpo_fast.data: MMPR and HF preference files, bad lines, templates, truncation, batches."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from mpo_fast.data import DataError, Example, PairTokenizer, collate, load_dataset, tiny
from mpo_fast.data.collate import TokenizedPair, micro_batches, step_pairs
from mpo_fast.data.formats import load_mmpr, load_preference

IGNORE = -100


@pytest.fixture(scope="module")
def tok():
    return tiny.tiny_tokenizer()


def _image(path, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(path)
    return path


def _jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(row if isinstance(row, str) else json.dumps(row))
            f.write("\n")
    return path


# --------------------------------------------------------------------------- formats


def test_mmpr_meta_roots_images_and_repeat(tmp_path):
    (tmp_path / "imgs").mkdir()
    _image(tmp_path / "imgs" / "a.png")
    _image(tmp_path / "imgs" / "b.png", 1)
    rows = [{"image": "a.png", "question": "<image>\nwhat color ?", "chosen": "red",
             "rejected": "blue"},
            {"image": ["a.png", "b.png"], "question": "which is red ?", "chosen": "1",
             "rejected": "2"},
            {"question": "is it red ?", "chosen": "yes", "rejected": "no"}]
    _jsonl(tmp_path / "ann.jsonl", rows)
    _jsonl(tmp_path / "few.jsonl", [{**rows[2], "chosen": f"yes {i}"} for i in range(10)])
    meta = {"twice": {"root": "imgs", "annotation": "ann.jsonl", "repeat_time": 2},
            "half": {"root": "imgs", "annotation": "few.jsonl", "repeat_time": 0.5}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    examples, report = load_dataset(str(tmp_path / "meta.json"), seed=3)
    assert report.loaded == len(examples) == 2 * 3 + 5 and not report.skipped
    first = examples[0]
    assert first.images == (str(tmp_path / "imgs" / "a.png"),)
    assert first.prompt.startswith("<image>") and first.chosen == "red"
    assert len(examples[1].images) == 2 and examples[2].images == ()
    assert [e.chosen for e in examples[:3]] == [e.chosen for e in examples[3:6]]  # repeated
    halves = {e.chosen for e in examples[6:]}
    assert len(halves) == 5  # a sample of distinct lines, not a repeat
    again, _ = load_mmpr(str(tmp_path / "meta.json"), seed=3)
    assert [e.chosen for e in again] == [e.chosen for e in examples]  # seeded


def test_hf_preference_format_strings_messages_and_images(tmp_path):
    _image(tmp_path / "x.png")
    rows = [{"prompt": "largest of 3 9 4", "chosen": "9", "rejected": "4"},
            {"prompt": [{"role": "user", "content": [{"type": "image"},
                                                      {"type": "text", "text": " what ?"}]}],
             "chosen": [{"role": "assistant", "content": "red"}],
             "rejected": [{"role": "assistant", "content": "blue"}], "images": ["x.png"]}]
    examples, report = load_preference(str(_jsonl(tmp_path / "p.jsonl", rows)))
    assert report.loaded == 2
    assert examples[0] == Example("largest of 3 9 4", "9", "4", (), f"{tmp_path}/p.jsonl:1")
    msg = examples[1].prompt
    assert msg[0]["content"] == "<image> what ?" and examples[1].chosen == "red"
    assert examples[1].images == (str(tmp_path / "x.png"),)
    (tmp_path / "p.json").write_text(json.dumps(rows))
    as_list, _ = load_dataset(str(tmp_path / "p.json"))
    assert [e.chosen for e in as_list] == ["9", "red"]


BAD_LINES = [
    ("{not json", "malformed JSON"),
    ('["a", "list"]', "expected a JSON object"),
    ({"question": "q ?", "rejected": "no"}, "missing 'chosen'"),
    ({"question": "q ?", "chosen": "   ", "rejected": "no"}, "empty 'chosen'"),
    ({"question": "", "chosen": "a", "rejected": "b"}, "empty 'question'"),
    ({"question": "q", "chosen": 3, "rejected": "b"}, "must be a string"),
    ({"question": "q", "chosen": "a", "rejected": "a"}, "identical"),
    ({"image": "nope.png", "question": "q", "chosen": "a", "rejected": "b"}, "missing image"),
    ({"image": ["ok.png"], "question": "<image> <image> q", "chosen": "a", "rejected": "b"},
     "2 <image> placeholders but 1 images"),
]


def test_bad_lines_are_reported_with_file_and_line_then_skipped_or_fatal(tmp_path):
    _image(tmp_path / "ok.png")
    good = {"image": "ok.png", "question": "<image> q", "chosen": "a", "rejected": "b"}
    lines = [good]
    for bad, _ in BAD_LINES:
        lines += [bad, good]
    ann = _jsonl(tmp_path / "ann.jsonl", lines)
    (tmp_path / "meta.json").write_text(json.dumps(
        {"d": {"root": ".", "annotation": "ann.jsonl", "repeat_time": 1}}))
    examples, report = load_dataset(str(tmp_path / "meta.json"))
    assert len(examples) == report.loaded == len(BAD_LINES) + 1
    assert len(report.skipped) == len(BAD_LINES)
    for k, ((_, reason), err) in enumerate(zip(BAD_LINES, report.skipped, strict=True)):
        assert err.source == f"{ann}:{2 * k + 2}", err
        assert reason in err.reason, (reason, err.reason)
    assert f"{len(BAD_LINES)} bad lines skipped" in report.summary()
    with pytest.raises(DataError, match=r"ann.jsonl:2: malformed JSON"):
        load_dataset(str(tmp_path / "meta.json"), on_error="raise")
    with pytest.raises(ValueError, match="on_error"):
        load_dataset(str(tmp_path / "meta.json"), on_error="ignore")


# --------------------------------------------------------------------------- tokenizing


def test_chat_template_splits_prompt_and_completions(tok):
    pair = PairTokenizer(tok, max_length=64)(Example("largest of 0 12 5", "12", "5"))
    words = tok.convert_ids_to_tokens
    assert words(pair.prompt) == ["<|user|>", "largest", "of", "0", "12", "5", "<|end|>",
                                  "<|assistant|>"]
    assert words(pair.chosen) == ["12", "<|end|>"] and words(pair.rejected) == ["5", "<|end|>"]
    assert pair.prompt[3] == 0  # id 0 is the real token "0"


def test_without_a_template_the_completion_ends_with_eos(tok):
    plain = tiny.tiny_tokenizer()
    plain.chat_template = None
    pair = PairTokenizer(plain, max_length=64)(Example("largest of 3 9", "9", "3"))
    assert plain.convert_ids_to_tokens(pair.chosen) == ["9", "<|end|>"]
    assert plain.convert_ids_to_tokens(pair.prompt) == ["largest", "of", "3", "9"]


def test_truncation_cuts_completions_then_prompt_never_image_tokens(tok):
    long = "largest of " + " ".join(map(str, range(40)))
    pair = PairTokenizer(tok, max_length=20)(Example(long, " ".join(["7"] * 30), "3"))
    assert len(pair.prompt) == 19 and len(pair.chosen) == 1  # prompt kept its end, 1 answer
    assert tok.convert_ids_to_tokens(pair.prompt)[-1] == "<|assistant|>"
    mid = PairTokenizer(tok, max_length=48)(Example(long, " ".join(["7"] * 30), "3"))
    assert len(mid.prompt) == 45 and len(mid.chosen) == 3 and len(mid.rejected) == 2
    _, proc = tiny.tiny_internvl(tok, image_size=56)  # 4 image tokens per image
    img = Image.new("RGB", (8, 8))
    ex = Example("<image> " + long, "7", "3", (img,), "f.jsonl:9")
    with pytest.raises(DataError, match=r"f.jsonl:9: .*would cut \d+ image tokens"):
        PairTokenizer(tok, proc, max_length=20)(ex)
    tail_image = Example(long + " <image>", "7", "3", (img,))
    ok = PairTokenizer(tok, proc, max_length=20)(tail_image)  # cut text only: fine
    assert ok.prompt.count(proc.image_token_id) == 4 and ok.pixel_values.shape[0] == 1
    with pytest.raises(DataError, match="no processor"):
        PairTokenizer(tok, max_length=64)(ex)


# --------------------------------------------------------------------------- batches


def _random_pairs(n, rng, vocab=60):
    ids = lambda k: [rng.randrange(vocab) for _ in range(k)]
    return [TokenizedPair(ids(rng.randint(1, 9)), ids(rng.randint(1, 6)), ids(rng.randint(1, 6)),
                          index=i) for i in range(n)]


def _expected_targets(seq, n_prompt):
    return [seq[t + 1] if t + 1 >= n_prompt and t + 1 < len(seq) else IGNORE
            for t in range(len(seq))]


@pytest.mark.parametrize("packed", [True, False])
def test_collate_layout_targets_and_mask(packed):
    rng = random.Random(torch.initial_seed())
    pairs = _random_pairs(5, rng)
    pairs[0].prompt[0] = 0  # a real token with id 0 ...
    b = collate(pairs, pad_id=0, packed=packed)  # ... and padding with id 0 too
    seqs = [p.prompt + p.chosen for p in pairs] + [p.prompt + p.rejected for p in pairs]
    want = [t for p, s in zip(pairs * 2, seqs, strict=True)
            for t in _expected_targets(s, len(p.prompt))]
    if packed:
        assert b.input_ids.tolist() == [t for s in seqs for t in s]
        assert b.targets.tolist() == want
        assert b.segments.cu_seqlens.tolist() == np.cumsum([0] + [len(s) for s in seqs]).tolist()
        assert b.position_ids.tolist() == [i for s in seqs for i in range(len(s))]
        assert b.attention_mask is None and b.padding_fraction == 0.0
    else:
        T = max(map(len, seqs))
        assert b.input_ids.shape == b.targets.shape == b.attention_mask.shape == (10, T)
        for s, seq in enumerate(seqs):
            assert b.attention_mask[s].tolist() == [i < len(seq) for i in range(T)]
            assert b.input_ids[s, :len(seq)].tolist() == seq
        got = [t for s, seq in enumerate(seqs) for t in b.targets[s, :len(seq)].tolist()]
        assert got == want
        assert (b.targets[~b.attention_mask] == IGNORE).all()
        assert b.padding_fraction == pytest.approx(1 - b.num_tokens / (10 * T))
    assert b.attention_mask is None or b.attention_mask[0, 0]  # id 0 attended
    assert b.chosen_tokens == sum(len(p.chosen) for p in pairs)
    assert b.num_pairs == 5 and b.index == list(range(5))


def test_step_pairs_deal_disjoint_shares_and_reshuffle_per_epoch():
    P, per_step = 23, 6
    per_epoch = P // per_step
    seen = []
    for step in range(per_epoch):
        shares = [step_pairs(step, P, per_step, seed=5, rank=r, world=3) for r in range(3)]
        assert all(len(s) == 2 for s in shares)
        dealt = [i for share in shares for i in share]
        assert sorted(dealt) == sorted(step_pairs(step, P, per_step, seed=5))
        seen += dealt
    assert len(set(seen)) == len(seen) == per_epoch * per_step
    assert step_pairs(per_epoch, P, per_step, 5) != step_pairs(0, P, per_step, 5)  # new epoch
    assert step_pairs(2, P, per_step, 5) == step_pairs(2, P, per_step, 5)
    with pytest.raises(ValueError, match="multiple"):
        step_pairs(0, P, per_step, 5, rank=0, world=4)


def test_micro_batches_keep_pairs_whole_and_split_to_a_count():
    rng = random.Random(torch.initial_seed())
    pairs = _random_pairs(9, rng)
    groups = micro_batches(pairs, 40)
    assert sorted(i for g in groups for i in g) == list(range(9))
    assert all(sum(pairs[i].num_tokens for i in g) <= 40 for g in groups)
    count = min(len(groups) + 3, len(pairs))
    more = micro_batches(pairs, 40, count=count)
    assert len(more) == count and all(more)
    assert sorted(i for g in more for i in g) == list(range(9))
    pairs[4].source, pairs[4].prompt = "data.jsonl:77", [1] * 30
    with pytest.raises(ValueError, match=r"data.jsonl:77: the pair has \d+ tokens.*max_tokens=40"):
        micro_batches(pairs, 40)


def test_tiny_task_answers_are_checkable():
    train = tiny.make_task(50, seed=1)
    held = tiny.make_task(20, seed=2, exclude=frozenset(e.prompt for e in train))
    assert not {e.prompt for e in train} & {e.prompt for e in held}
    for e in train + held:
        values = [int(v) for v in e.prompt.split()[2:]]
        assert tiny.answer_of(e) == e.chosen == str(max(values) if "largest" in e.prompt
                                                     else min(values))
        assert e.rejected != e.chosen and int(e.rejected) in values
