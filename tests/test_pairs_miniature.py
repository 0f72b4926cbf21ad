"""The miniature's parts: the shapes task, the stand-in MPO step, the pluggable run."""

import json
import random
from dataclasses import replace

import pytest
import torch

from mpo_fast.pairs.answers import match_answer, parse_response
from mpo_fast.pairs.generate import Generator
from mpo_fast.pairs.miniature import (
    MiniatureConfig,
    collate,
    encode_row,
    hidden_states,
    mpo_standin,
    run_miniature,
)
from mpo_fast.pairs.shapes import CELL, COLORS, GRID, cot_text, make_example, write_split
from mpo_fast.pairs.tiny import build_tiny_vlm, build_tokenizer


def test_shapes_counts_match_the_pixels():
    rng = random.Random()
    for _ in range(20):
        ex = make_example(rng, max_total=8, n_colors=rng.randint(1, 3))
        px = ex.image.load()
        seen = dict.fromkeys(COLORS, 0)
        for cell in range(GRID * GRID):
            x0, y0 = (cell % GRID) * CELL, (cell // GRID) * CELL
            colors = {px[x, y] for x in range(x0, x0 + CELL) for y in range(y0, y0 + CELL)}
            hits = [c for c, rgb in COLORS.items() if rgb in colors]
            assert len(hits) <= 1  # one shape per cell
            for c in hits:
                seen[c] += 1
        assert seen == {c: ex.counts.get(c, 0) for c in COLORS} and 1 <= ex.total <= 8
        assert set(ex.counts) == set(list(COLORS)[:len(ex.counts)])


def test_reference_cot_is_graded_correct():
    for r in range(5):
        for b in range(5):
            text = cot_text({"red": r, "blue": b})
            parsed = parse_response(text)
            assert parsed is not None and match_answer(parsed.answer, str(r + b))
            assert not match_answer(parsed.answer, str(r + b + 1))


def _sequence_logps(model, gen, pairs, root):
    from mpo_fast import fused_logprobs
    from mpo_fast.pairs.io import load_images

    rows = [encode_row(gen, p["question"], load_images(p["image"], root), p[side])
            for side in ("chosen", "rejected") for p in pairs]
    batch = collate(rows, gen.tokenizer.pad_token_id)
    with torch.no_grad():
        lp = fused_logprobs(hidden_states(model, batch), model.lm_head.weight, batch["targets"])
    seq = lp.sum(-1)
    return seq[:len(pairs)], seq[len(pairs):]


@pytest.fixture
def one_thread():
    """Tiny matmuls on a shared CPU run fastest on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_mpo_standin_learns_the_preference(tmp_path, one_thread):
    rng = random.Random()
    items = write_split(tmp_path, "img", 4, rng)
    pairs = []
    for it in items:
        n = int(it["answer"])
        pairs.append({"id": it["id"], "image": it["image"], "question": "<image>\nHow many?",
                      "chosen": cot_text(it["counts"]),
                      "rejected": f"red: {n}, blue: 9. {n} + 9 = {n + 9}.\nFinal Answer: {n + 9}"})
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"p": {"root": str(tmp_path), "annotation": str(tmp_path / "p.jsonl"),
                                      "repeat_time": 1}}))
    tok = build_tokenizer([p["chosen"] for p in pairs] + [p["rejected"] for p in pairs])
    model, processor = build_tiny_vlm(tok, hidden=64, layers=1, vision_layers=1, seed=None)
    gen = Generator(model, processor, progress=False)
    c0, r0 = _sequence_logps(model, gen, pairs, tmp_path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = replace(MiniatureConfig(), mpo_epochs=12, mpo_batch=2, mpo_lr=3e-3)
    logs = []
    mpo_standin(model, processor, meta, tmp_path, cfg, log=logs.append)
    c1, r1 = _sequence_logps(model, gen, pairs, tmp_path)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert ((c1 - r1) - (c0 - r0)).mean() > 1.0  # the margin grew
    assert (c1 - c0).mean() > 0  # the SFT term raised the chosen responses
    hist = [json.loads(x) for x in (tmp_path / "mpo_metrics.jsonl").read_text().splitlines()]
    assert len(hist) == 12 * 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in hist)
    assert logs and "[mpo]" in logs[-1]


def test_run_miniature_calls_the_pluggable_train_fn(tmp_path):
    calls = []

    def train_fn(model, processor, meta_path, out_dir, cfg):
        calls.append((meta_path, out_dir, cfg.mpo_loss_types))
        assert hasattr(model, "generate") and hasattr(processor, "tokenizer")
        assert meta_path.exists()
        return None  # trained in place

    cfg = MiniatureConfig(sft_steps=2, sft_batch=4, pair_questions=2, num_samples=2,
                          test_questions=3, max_new_tokens=6, gen_batch=8)
    logs = []
    result = run_miniature(tmp_path, cfg, train_fn=train_fn, log=logs.append)
    meta = tmp_path / "pairs" / "meta.json"
    assert calls == [(meta, tmp_path / "after", ("sigmoid", "bco_pair", "sft")),
                     (meta, tmp_path / "sft_only", ("sft",))]
    assert result["pairs"]["samples"] == 4 and result["train_fn"] == "train_fn"
    for when in ("before", "after", "sft_only"):
        acc = result["accuracy"][when]
        assert acc["n"] == 3 and 0 <= acc["direct"] <= 1 and 0 <= acc["cot"] <= 1
    assert json.loads((tmp_path / "results.json").read_text())["accuracy"] == result["accuracy"]
    assert any("before" in line for line in logs)
