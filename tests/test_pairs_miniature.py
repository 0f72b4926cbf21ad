"""The miniature's parts: the shapes task, the token layout the trainer shares with generation
and evaluation, the MPO step through the trainer, the pluggable run, the quick run."""

import json
import random
from dataclasses import replace

import pytest
import torch

from mpo_fast.data.collate import PairTokenizer
from mpo_fast.data.collate import collate as trainer_collate
from mpo_fast.data.formats import load_dataset
from mpo_fast.pairs.answers import match_answer, parse_response
from mpo_fast.pairs.correctness import cot_question
from mpo_fast.pairs.generate import Generator, Prompt
from mpo_fast.pairs.io import load_images, question_with_images
from mpo_fast.pairs.miniature import (
    MiniatureConfig,
    collate,
    encode_row,
    hidden_states,
    mpo_trainer,
    run_miniature,
)
from mpo_fast.pairs.shapes import CELL, COLORS, GRID, cot_text, make_example, write_split
from mpo_fast.pairs.tiny import build_tiny_vlm, build_tokenizer

INSTRUCTION = MiniatureConfig().instruction


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


def _mmpr_pairs(tmp_path, n: int):
    """n pairs on fresh shape images, questions as `run_correctness` writes them (CoT
    instruction, "<image>" in front): a right CoT chosen, a wrong sum rejected; and meta.json."""
    items = write_split(tmp_path, "img", n, random.Random())
    pairs = []
    for it in items:
        m = int(it["answer"])
        pairs.append({"id": it["id"], "image": it["image"],
                      "question": question_with_images(cot_question(it["question"],
                                                                    INSTRUCTION), 1),
                      "chosen": cot_text(it["counts"]),
                      "rejected": f"red: {m}, blue: 9. {m} + 9 = {m + 9}.\nFinal Answer: {m + 9}"})
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"p": {"root": str(tmp_path), "annotation": "p.jsonl",
                                      "repeat_time": 1}}))
    return items, pairs, meta


def _tiny(pairs):
    tok = build_tokenizer([INSTRUCTION] + [p[k] for p in pairs for k in ("chosen", "rejected")])
    return build_tiny_vlm(tok, hidden=64, layers=1, vision_layers=1, seed=None)


def test_the_trainer_tokenizes_a_pair_as_generation_and_the_miniature_do(tmp_path):
    items, pairs, meta = _mmpr_pairs(tmp_path, 1)
    (it,), (p,) = items, pairs
    model, processor = _tiny(pairs)
    tok = processor.tokenizer
    gen = Generator(model, processor, progress=False)
    (example,), _ = load_dataset(str(meta), on_error="raise")  # as the trainer reads it
    pair = PairTokenizer(tok, processor)(example)
    images = load_images(it["image"], tmp_path)

    # the prompt: what the miniature samples the pairs with and evaluates CoT with
    for question in (p["question"], cot_question(f"<image>\n{it['question']}", INSTRUCTION)):
        assert pair.prompt == gen.encode([Prompt(question, images)])["input_ids"][0].tolist()
    assert pair.prompt.count(processor.image_token_id) == processor.image_seq_length
    # the completions: the answer, then eos (where generation stops), nothing after
    rows = [encode_row(gen, p["question"], images, p[k]) for k in ("chosen", "rejected")]
    assert [pair.prompt + pair.chosen, pair.prompt + pair.rejected] == [r.ids for r in rows]
    assert pair.chosen[-1] == pair.rejected[-1] == tok.eos_token_id
    assert tok.decode(pair.chosen, skip_special_tokens=True) == p["chosen"]
    assert torch.equal(pair.pixel_values, rows[0].pixels)
    # the scored positions (target t = token t + 1, completion only), padded and packed
    mine = collate(rows, tok.pad_token_id)["targets"]
    padded = trainer_collate([pair], pad_id=tok.pad_token_id, packed=False)
    assert torch.equal(padded.targets, mine)
    packed = trainer_collate([pair], pad_id=tok.pad_token_id, packed=True)
    cu = packed.segments.cu_seqlens.tolist()
    for s, r in enumerate(rows):
        assert torch.equal(packed.targets[cu[s]:cu[s + 1]], mine[s, :len(r.ids)])


def _sequence_logps(model, gen, pairs, root):
    """Sequence log-probs by the miniature's own path (encode_row, its collate, the model's
    hidden states, fused_logprobs): a measurement independent of the trainer's."""
    from mpo_fast import fused_logprobs

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


def test_mpo_trainer_learns_the_preference(tmp_path, one_thread):
    _, pairs, meta = _mmpr_pairs(tmp_path, 4)
    model, processor = _tiny(pairs)
    gen = Generator(model, processor, progress=False)
    c0, r0 = _sequence_logps(model, gen, pairs, tmp_path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = replace(MiniatureConfig(), mpo_epochs=12, mpo_batch=2, mpo_lr=3e-3)
    logs = []
    out = tmp_path / "out"
    assert mpo_trainer(model, processor, meta, out, cfg, log=logs.append) is model
    c1, r1 = _sequence_logps(model, gen, pairs, tmp_path)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert ((c1 - r1) - (c0 - r0)).mean() > 1.0  # the margin grew
    assert (c1 - c0).mean() > 0  # the SFT term raised the chosen responses
    hist = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in hist] == list(range(1, 12 * 2 + 1))
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in hist)
    assert json.loads((out / "config.json").read_text())["loss_weights"] == [0.8, 0.2, 1.0]
    assert [c.name for c in (out / "checkpoints").iterdir()] == ["step-00000024"]  # final only
    assert logs and logs[-1].startswith("[mpo] step 24/24")
    # back to generation: eval mode, the attention it had (packed attention has no KV cache)
    assert not model.training and model.config.text_config._attn_implementation == "sdpa"
    assert len(gen([Prompt(pairs[0]["question"], load_images(pairs[0]["image"], tmp_path))],
                   do_sample=False, max_new_tokens=3)) == 1


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


def test_quick_miniature_runs_through_the_trainer(tmp_path):
    cfg = MiniatureConfig.quick()
    logs = []
    result = run_miniature(tmp_path, cfg, log=logs.append)
    assert result["train_fn"] == "mpo_trainer"
    n_pairs = result["pairs"]["pairs"] + result["pairs"]["format_pairs"]
    steps = n_pairs // cfg.mpo_batch * cfg.mpo_epochs
    assert steps >= 2
    for key, types in (("after", ["sigmoid", "bco_pair", "sft"]), ("sft_only", ["sft"])):
        train_cfg = json.loads((tmp_path / key / "config.json").read_text())
        assert train_cfg["loss_types"] == types and train_cfg["packing"]
        assert (train_cfg["lr"], train_cfg["pairs_per_step"]) == (cfg.mpo_lr, cfg.mpo_batch)
        hist = (tmp_path / key / "metrics.jsonl").read_text().splitlines()
        assert len(hist) == steps
        assert [c.name for c in (tmp_path / key / "checkpoints").iterdir()] == [
            f"step-{steps:08d}"]
    for when in ("before", "after", "sft_only"):
        acc = result["accuracy"][when]
        assert acc["n"] == cfg.test_questions and 0 <= acc["direct"] <= 1 and 0 <= acc["cot"] <= 1
    assert any(line.startswith(f"[mpo] step {steps}/{steps}") for line in logs)
