"""The pair pipelines on a tiny random-init InternVL (transformers'
InternVLForConditionalGeneration): DropoutNTP continues WITHOUT the image; correctness sampling
sees it; whitespace stays natural."""

import json
import random

import pytest
import torch
from PIL import Image

from mpo_fast.pairs.correctness import CorrectnessConfig, run_correctness
from mpo_fast.pairs.dropout_ntp import run_dropout_ntp, truncate_words
from mpo_fast.pairs.generate import Generator, Prompt, SamplingConfig, continuation_text
from mpo_fast.pairs.io import read_items
from mpo_fast.pairs.tiny import build_tiny_vlm, build_tokenizer

WORDS = "the red square sits left of two blue circles near a green line on white paper".split()


@pytest.fixture(scope="module")
def tiny():
    tok = build_tokenizer([" ".join(WORDS), "Final Answer: 3"], vocab_size=320)
    return build_tiny_vlm(tok, hidden=64, layers=1, vision_layers=1, seed=None)


class Recorder:
    """Wraps model.generate: keeps each call's input_ids and keyword arguments."""

    def __init__(self, model):
        self.model, self.calls, self._generate = model, [], model.generate

    def __enter__(self):
        def generate(*args, **kwargs):
            self.calls.append({k: v for k, v in kwargs.items()})
            return self._generate(*args, **kwargs)

        self.model.generate = generate
        return self

    def __exit__(self, *exc):
        del self.model.generate


def write_images(tmp_path, n):
    (tmp_path / "img").mkdir()
    paths = []
    for i in range(n):
        color = tuple(random.randrange(256) for _ in range(3))
        Image.new("RGB", (32, 32), color).save(tmp_path / "img" / f"{i}.png")
        paths.append(f"img/{i}.png")
    return paths


def sentence(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def test_dropout_ntp_drops_the_image(tmp_path, tiny):
    model, processor = tiny
    rng = random.Random()
    paths = write_images(tmp_path, 4)
    with open(tmp_path / "in.jsonl", "w") as f:
        for i, p in enumerate(paths):
            item = {"id": f"d{i}", "image": p, "question": "<image>\nDescribe the picture."}
            if i < 3:  # the fourth has no chosen response: the model writes one, with the image
                words = sentence(rng, rng.randint(6, 14)).split()
                item["chosen"] = words[0] + "  " + " ".join(words[1:4]) + "\n" + " ".join(words[4:])
            f.write(json.dumps(item) + "\n")
    items = read_items(tmp_path / "in.jsonl")
    gen = Generator(model, processor, batch_size=8, progress=False,
                    sampling=SamplingConfig(max_new_tokens=10))
    with Recorder(model) as rec:
        summary = run_dropout_ntp(items, gen, tmp_path / "out", "dntp", image_root=tmp_path,
                                  log=lambda s: None)
    img_id = processor.image_token_id
    with_image = [c for c in rec.calls if (c["input_ids"] == img_id).any()]
    without = [c for c in rec.calls if not (c["input_ids"] == img_id).any()]
    assert len(with_image) == 1 and with_image[0]["pixel_values"].shape[0] == 1  # the 4th item
    assert len(without) >= 1
    for call in without:  # the continuation: no pixels, no image tokens, no image markers
        assert call.get("pixel_values") is None
        text = processor.tokenizer.batch_decode(call["input_ids"])
        assert not any("<img>" in t or "<image>" in t for t in text)
    pairs = [json.loads(x) for x in open(tmp_path / "out" / "dntp.jsonl")]
    assert summary["pairs"] == len(pairs) >= 3
    for pair in pairs:
        prefix = truncate_words(pair["chosen"])
        n_words = len(pair["chosen"].split())
        assert len(prefix.split()) == n_words // 2
        assert pair["chosen"].startswith(prefix) and pair["rejected"].startswith(prefix)
        assert pair["question"] == "<image>\nDescribe the picture." and pair["image"]
    continued = [t for call in without for t in processor.tokenizer.batch_decode(
        call["input_ids"], skip_special_tokens=True)]
    for pair in pairs:  # each prefill ended with exactly the chosen prefix
        assert any(t.endswith(truncate_words(pair["chosen"])) for t in continued)


def test_correctness_sampling_sees_the_image(tmp_path, tiny):
    model, processor = tiny
    paths = write_images(tmp_path, 2)
    with open(tmp_path / "in.jsonl", "w") as f:
        for p in paths:
            f.write(json.dumps({"image": p, "question": "How many squares?", "answer": "3"}) + "\n")
    items = read_items(tmp_path / "in.jsonl")
    gen = Generator(model, processor, batch_size=4, progress=False,
                    sampling=SamplingConfig(max_new_tokens=6))
    with Recorder(model) as rec:
        s = run_correctness(items, gen, tmp_path / "out", "cnt", image_root=tmp_path,
                            config=CorrectnessConfig(num_samples=3), log=lambda s: None)
    assert s["samples"] == 6 and s["items"] == 2
    assert all(c["pixel_values"] is not None for c in rec.calls)
    ids = torch.cat([c["input_ids"].flatten() for c in rec.calls])
    assert (ids == processor.image_token_id).sum() == 6 * processor.image_seq_length
    assert all(c["input_ids"][:, -1].ne(processor.tokenizer.pad_token_id).all()
               for c in rec.calls)  # left padding: every row ends in its prompt
    samples = [json.loads(x) for x in open(tmp_path / "out" / "cnt.samples.jsonl")]
    assert len(samples) == 6


def test_generator_batches_keep_prompt_order(tiny):
    model, processor = tiny
    gen = Generator(model, processor, batch_size=3, progress=False)
    prompts = [Prompt("q " * random.randint(1, 9)) for _ in range(7)]
    torch.manual_seed(0)
    greedy = gen(prompts, do_sample=False, max_new_tokens=5)
    one_by_one = [gen([p], do_sample=False, max_new_tokens=5)[0] for p in prompts]
    assert greedy == one_by_one


def test_continuation_keeps_the_natural_space():
    """SentencePiece drops the leading space of a first "▁word" when decoded alone."""
    from tokenizers import SentencePieceBPETokenizer
    from transformers import PreTrainedTokenizerFast

    sp = SentencePieceBPETokenizer()
    sp.train_from_iterator([" ".join(WORDS)] * 4, vocab_size=120, show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=sp)
    prefix = "the red square sits"
    new = tok.encode(" left of two", add_special_tokens=False)
    assert not tok.decode(new).startswith(" ")  # the problem
    anchor = tok.encode(prefix, add_special_tokens=False)
    assert continuation_text(tok, anchor, new, prefix) == " left of two"
    glued = tok.encode("s", add_special_tokens=False)  # a continuation inside the last word
    assert continuation_text(tok, anchor, glued, prefix) in ("s", " s")


def test_truncate_words():
    assert truncate_words("a b c d e") == "a b"
    assert truncate_words("one  two\nthree four") == "one  two"
    assert truncate_words("  lead trail  ", 0.5) == "  lead"
    assert truncate_words("single") is None and truncate_words("") is None
    assert truncate_words("a b c d", 0.75) == "a b c"
