"""The miniature's parts: the shapes task and its step checker, direct and CoT correctness pairs,
the token layout the trainer shares with generation and evaluation, the training step through the
trainer, the arms' shared start and pairs, the learning rate chosen on validation only, the paired
standard errors, and --quick end to end."""

import hashlib
import json
import math
import random
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mpo_fast.data.collate import PairTokenizer
from mpo_fast.data.collate import collate as trainer_collate
from mpo_fast.data.formats import load_dataset
from mpo_fast.pairs import miniature
from mpo_fast.pairs.answers import match_answer, parse_response
from mpo_fast.pairs.correctness import CorrectnessConfig, cot_question, run_correctness
from mpo_fast.pairs.generate import Generator, Prompt
from mpo_fast.pairs.io import load_images, question_with_images
from mpo_fast.pairs.miniature import (
    ARMS,
    MiniatureConfig,
    TrainSpec,
    aggregate,
    collate,
    direct_question,
    encode_row,
    hidden_states,
    mpo_trainer,
    paired_se,
    run_miniature,
    select_lr,
)
from mpo_fast.pairs.shapes import (
    CELL,
    COLORS,
    DIRECT_SUFFIX,
    GRID,
    QUESTION,
    check_steps,
    cot_text,
    make_example,
    score,
    write_split,
)
from mpo_fast.pairs.tiny import build_tiny_vlm, build_tokenizer

INSTRUCTION = MiniatureConfig().instruction
RGB = {"red": 2, "blue": 3, "green": 1}


# ---------------------------------------------------------------- the task and its checker

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
        assert ex.score == score(ex.counts) >= ex.total
        assert set(ex.counts) == set(list(COLORS)[:len(ex.counts)])


def test_reference_cot_has_right_steps_and_is_graded_correct():
    assert score(RGB) == 11
    assert cot_text(RGB) == ("red: 2, blue: 3, green: 1. 2 x 1 = 2. 3 x 2 = 6. 1 x 3 = 3. "
                             "2 + 6 = 8. 8 + 3 = 11.\nFinal Answer: 11")
    assert cot_text({"red": 4}) == "red: 4. 4 x 1 = 4.\nFinal Answer: 4"
    for counts in ({"red": 4}, {"red": 0, "blue": 7}, {"red": 3, "blue": 0, "green": 5}):
        text = cot_text(counts)
        total = score(counts)
        parsed = parse_response(text)
        assert parsed is not None and match_answer(parsed.answer, str(total))
        assert not match_answer(parsed.answer, str(total + 1))
        chk = check_steps(text, counts)
        assert chk.steps_ok and not chk.lucky


def test_the_answer_is_the_score_of_the_colours():
    items = write_split(Path(tempfile.mkdtemp()), "s", 5, random.Random(3), 8, 3)
    for it in items:
        assert it["answer"] == str(it["counts"]["red"] + 2 * it["counts"]["blue"]
                                   + 3 * it["counts"]["green"])
        assert it["question"] == QUESTION and "score" in QUESTION


C = "red: 2, blue: 3, green: 1."


@pytest.mark.parametrize("response, parsed, counts_ok, arithmetic_ok, answer_ok", [
    # right answer, right steps
    (f"{C} 2 x 1 = 2. 3 x 2 = 6. 1 x 3 = 3. 2 + 6 = 8. 8 + 3 = 11.\nFinal Answer: 11",
     1, 1, 1, 1),
    # lucky: wrong counts with the same score, right arithmetic
    ("red: 1, blue: 2, green: 2. 1 x 1 = 1. 2 x 2 = 4. 2 x 3 = 6. 1 + 4 = 5. 5 + 6 = 11."
     "\nFinal Answer: 11", 1, 0, 1, 1),
    ("red: 1, blue: 1, green: 1. 1 x 1 = 1. 1 x 2 = 2. 1 x 3 = 3. 1 + 2 = 3. 3 + 3 = 6."
     "\nFinal Answer: 11", 1, 0, 0, 1),
    # lucky: right counts, a false product or a false addition that ends on the right number
    (f"{C} 2 x 1 = 2. 3 x 2 = 5. 1 x 3 = 3. 2 + 5 = 8. 8 + 3 = 11.\nFinal Answer: 11",
     1, 1, 0, 1),
    (f"{C} 2 x 1 = 2. 3 x 2 = 6. 1 x 3 = 3. 2 + 6 = 9. 9 + 3 = 11.\nFinal Answer: 11",
     1, 1, 0, 1),
    # lucky: a product of a number that is not the listed count, or with the wrong points
    (f"{C} 2 x 1 = 2. 2 x 2 = 4. 1 x 3 = 3. 2 + 4 = 6. 6 + 5 = 11.\nFinal Answer: 11",
     1, 1, 0, 1),
    (f"{C} 2 x 1 = 2. 3 x 3 = 9. 0 x 3 = 0. 2 + 9 = 11. 11 + 0 = 11.\nFinal Answer: 11",
     1, 1, 0, 1),
    # (spaces before the final line are allowed)
    (f"{C} 2 x 1 = 2. 3 x 2 = 6. 1 x 3 = 3. 2 + 6 = 8. 8 + 3 = 11. \nFinal Answer: 11",
     1, 1, 1, 1),
    # lucky: an addition of a number that is not the product before it
    (f"{C} 2 x 1 = 2. 3 x 2 = 6. 1 x 3 = 3. 2 + 7 = 9. 9 + 2 = 11.\nFinal Answer: 11",
     1, 1, 0, 1),
    # lucky: a missing step, a missing colour, colours out of order
    (f"{C} 2 x 1 = 2. 3 x 2 = 6. 1 x 3 = 3. 2 + 6 = 8.\nFinal Answer: 11", 1, 1, 0, 1),
    ("red: 2, blue: 3. 2 x 1 = 2. 3 x 2 = 6. 2 + 6 = 8. 8 + 3 = 11.\nFinal Answer: 11",
     1, 0, 0, 1),
    ("blue: 3, red: 2, green: 1. 3 x 2 = 6. 2 x 1 = 2. 1 x 3 = 3. 6 + 2 = 8. 8 + 3 = 11."
     "\nFinal Answer: 11", 1, 0, 1, 1),
    # lucky: a one-line sum ("2 + 6 + 3 = 11") is not the grammar: no steps to trust
    (f"{C} 2 + 6 + 3 = 11.\nFinal Answer: 11", 0, 0, 0, 1),
    # right steps, but the final answer is not the last sum: wrong
    (f"{C} 2 x 1 = 2. 3 x 2 = 6. 1 x 3 = 3. 2 + 6 = 8. 8 + 3 = 11.\nFinal Answer: 12",
     1, 1, 0, 0),
    # wrong
    ("red: 2, blue: 3, green: 2. 2 x 1 = 2. 3 x 2 = 6. 2 x 3 = 6. 2 + 6 = 8. 8 + 6 = 14."
     "\nFinal Answer: 14", 1, 0, 1, 0),
    ("11", 0, 0, 0, 0),  # a bare direct answer has no CoT answer
    ("", 0, 0, 0, 0),
])
def test_checker_tells_right_steps_from_lucky_answers(response, parsed, counts_ok,
                                                      arithmetic_ok, answer_ok):
    chk = check_steps(response, RGB)
    assert (chk.parsed, chk.counts_ok, chk.arithmetic_ok, chk.answer_ok) == (
        bool(parsed), bool(counts_ok), bool(arithmetic_ok), bool(answer_ok))
    assert chk.steps_ok == bool(parsed and counts_ok and arithmetic_ok and answer_ok)
    assert chk.lucky == (chk.answer_ok and not chk.steps_ok)


# ---------------------------------------------------------------- direct and CoT pairs

class _Canned:
    """A generator stand-in: for each prompt, the next of a fixed list of responses."""

    batch_size, progress = 64, False

    def __init__(self, responses):
        self.responses, self.prompts = responses, []

    def __call__(self, prompts, desc=""):
        self.prompts.extend(prompts)
        return [self.responses[i % len(self.responses)] for i in range(len(prompts))]


def test_direct_and_cot_pairs_into_one_meta(tmp_path):
    items = write_split(tmp_path / "task", "q", 2, random.Random(0), 9, 3)
    out = tmp_path / "pairs"
    cot_items = [dict(it) for it in items]
    direct_items = [{**it, "question": f"{it['question']}\n{DIRECT_SUFFIX}"} for it in items]
    right = [cot_text(it["counts"]) for it in items]
    # CoT: one right, one wrong, one unreadable per question; direct: right, wrong, wrong
    for mode, its in (("cot", cot_items), ("direct", direct_items)):
        for it, r in zip(its, right, strict=True):
            n = int(it["answer"])
            canned = ([r, f"red: {n + 1}, blue: 0, green: 0. {n + 1} x 1 = {n + 1}. 0 x 2 = 0. "
                          f"0 x 3 = 0. {n + 1} + 0 = {n + 1}. {n + 1} + 0 = {n + 1}.\n"
                          f"Final Answer: {n + 1}", "I think so"]
                      if mode == "cot" else [str(n), str(n + 1), str(n + 2)])
            cfg = CorrectnessConfig(num_samples=3, max_pairs=15, instruction=INSTRUCTION,
                                    mode=mode)
            gen = _Canned(canned)
            run_correctness([it], gen, out, f"shapes_{mode}", config=cfg,
                            image_root=tmp_path / "task", log=lambda *a: None)
            asked = gen.prompts[0].question
            if mode == "cot":
                assert asked == cot_question(it["question"], INSTRUCTION)
            else:
                assert asked == it["question"] and "Final Answer" not in asked
    meta = json.loads((out / "meta.json").read_text())
    assert set(meta) == {"shapes_cot", "shapes_cot_format", "shapes_direct"}
    rows = {m: [json.loads(x) for x in (out / f"{m}.jsonl").read_text().splitlines()]
            for m in meta}
    assert len(rows["shapes_cot"]) == 2 and len(rows["shapes_cot_format"]) == 2
    assert len(rows["shapes_direct"]) == 4  # right x two wrong, per question
    for r in rows["shapes_direct"]:
        assert r["question"].endswith(DIRECT_SUFFIX) and r["meta"]["mode"] == "direct"
        assert r["chosen"] == r["meta"]["answer"] != r["rejected"]
    for r in rows["shapes_cot"]:
        assert r["meta"]["mode"] == "cot" and "Final Answer" in r["question"]
    ids = [r["id"] for rs in rows.values() for r in rs]
    assert len(set(ids)) == len(ids)
    examples, _ = load_dataset(str(out / "meta.json"), on_error="raise")
    assert len(examples) == 8


def test_correctness_mode_is_checked():
    with pytest.raises(ValueError, match="mode"):
        CorrectnessConfig(mode="both")


# ---------------------------------------------------------------- token layout, training step

def _mmpr_pairs(tmp_path, n: int):
    """n pairs on fresh shape images, questions as `run_correctness` writes them (CoT
    instruction, "<image>" in front): a right CoT chosen, a wrong sum rejected; and meta.json."""
    items = write_split(tmp_path, "img", n, random.Random(), 9, 3)
    pairs = []
    for it in items:
        m = int(it["answer"])
        pairs.append({"id": it["id"], "image": it["image"],
                      "question": question_with_images(cot_question(it["question"],
                                                                    INSTRUCTION), 1),
                      "chosen": cot_text(it["counts"]),
                      "rejected": f"red: {m}, blue: 9, green: 0. {m} x 1 = {m}. 9 x 2 = 18. "
                                  f"0 x 3 = 0. {m} + 18 = {m + 18}. {m + 18} + 0 = {m + 18}.\n"
                                  f"Final Answer: {m + 18}"})
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"p": {"root": str(tmp_path), "annotation": "p.jsonl",
                                      "repeat_time": 1}}))
    return items, pairs, meta


def _tiny(pairs):
    tok = build_tokenizer([INSTRUCTION, DIRECT_SUFFIX]
                          + [p[k] for p in pairs for k in ("chosen", "rejected")])
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
    # a direct pair's prompt (as run_correctness stores it) is the direct evaluation prompt
    stored = question_with_images(f"{it['question']}\n{DIRECT_SUFFIX}", 1)
    assert stored == direct_question(it["question"])


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
    arm = ARMS["mpo"]
    spec = TrainSpec("mpo", arm.loss_types, arm.loss_weights, lr=3e-3, epochs=12,
                     pairs_per_step=2, beta=0.1, max_tokens=512, seed=0)
    logs = []
    out = tmp_path / "out"
    assert mpo_trainer(model, processor, meta, out, spec, log=logs.append) is model
    c1, r1 = _sequence_logps(model, gen, pairs, tmp_path)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert ((c1 - r1) - (c0 - r0)).mean() > 1.0  # the margin grew
    assert (c1 - c0).mean() > 0  # the SFT term raised the chosen responses
    hist = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in hist] == list(range(1, 12 * 2 + 1))
    assert all(math.isfinite(h["loss"]) for h in hist)
    assert json.loads((out / "config.json").read_text())["loss_weights"] == [0.8, 0.2, 1.0]
    assert [c.name for c in (out / "checkpoints").iterdir()] == ["step-00000024"]  # final only
    assert logs and logs[-1].startswith("[train] mpo lr 0.003: 24 steps on 4 pairs")
    # back to generation: eval mode, the attention it had (packed attention has no KV cache)
    assert not model.training and model.config.text_config._attn_implementation == "sdpa"
    assert len(gen([Prompt(pairs[0]["question"], load_images(pairs[0]["image"], tmp_path))],
                   do_sample=False, max_new_tokens=3)) == 1


# ---------------------------------------------------------------- arms, selection, statistics

def test_select_lr_by_validation_score_ties_to_the_smaller_rate():
    r = lambda d, c: {"direct": d, "cot": c, "steps": 0.0}
    assert select_lr({1e-4: r(0.5, 0.5), 3e-4: r(0.6, 0.5), 3e-5: r(0.4, 0.6)}) == 3e-4
    assert select_lr({3e-4: r(0.6, 0.4), 1e-4: r(0.4, 0.6)}) == 1e-4  # tie: the smaller
    assert select_lr({3e-4: r(0.6, 0.5), 1e-4: r(0.4, 0.7)}) == 1e-4  # tie in floats too
    assert select_lr({1e-3: r(0.1, 0.1)}) == 1e-3


def test_paired_se_against_a_hand_computation():
    a = [[1, 0, 1, 1], [1, 1, 0, 1]]  # seed x question
    b = [[0, 0, 1, 0], [1, 0, 0, 0]]
    r = paired_se(a, b)
    # per question, averaged over the two seeds: d = (0.5, 0.5, 0, 1), mean 0.5;
    # sample variance ((0)^2 + (0)^2 + (-0.5)^2 + (0.5)^2) / 3 = 1/6; SE = sqrt(1/6 / 4)
    assert r["diff"] == pytest.approx(0.5)
    assert r["se"] == pytest.approx(math.sqrt(1 / 24))
    assert r["seed_diffs"] == pytest.approx([0.5, 0.5]) and r["seed_se"] == pytest.approx(0.0)
    assert (r["n"], r["seeds"]) == (4, 2)
    one = paired_se([[1, 0, 0]], [[0, 0, 1]])  # one seed: d = (1, 0, -1)
    assert one["diff"] == pytest.approx(0.0) and one["se"] == pytest.approx(math.sqrt(1 / 3))
    assert one["seed_se"] is None
    with pytest.raises(ValueError):
        paired_se([[1, 0]], [[1]])


def _state_hash(model) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


TINY = dict(sft_steps=2, sft_batch=4, pair_questions=2, num_samples=2, max_pairs=2,
            val_questions=3, test_questions=4, max_new_tokens=8, gen_batch=8, lrs=(1e-4, 3e-4))


def test_arms_share_warmup_and_pairs_and_the_test_split_waits_for_selection(tmp_path,
                                                                            monkeypatch):
    events, calls = [], []
    evaluate, select = miniature.evaluate, miniature.select_lr

    def spy_evaluate(gen, items, root, instruction, max_new_tokens=64):
        events.append(("eval", items[0]["id"].split("-")[0]))
        return evaluate(gen, items, root, instruction, max_new_tokens)

    def spy_select(val):
        events.append(("select", None))
        assert not (tmp_path / "task" / "test.jsonl").exists() or len(
            [e for e in events if e[0] == "select"]) > len(cfg.arms)  # seed 0: not written yet
        assert all(set(v) == {"direct", "cot", "steps", "lucky", "format"} for v in val.values())
        return select(val)

    def train_fn(model, processor, meta_path, out_dir, spec):
        calls.append((spec.seed, spec.arm, spec.lr, _state_hash(model), meta_path,
                      meta_path.read_text()))
        with torch.no_grad():  # a distinct, deterministic change per arm and rate
            model.lm_head.weight.add_(spec.lr * (1 + list(ARMS).index(spec.arm)))
        return model

    monkeypatch.setattr(miniature, "evaluate", spy_evaluate)
    monkeypatch.setattr(miniature, "select_lr", spy_select)
    cfg = MiniatureConfig(seeds=(0, 1), **TINY)
    result = run_miniature(tmp_path, cfg, train_fn=train_fn, log=lambda *a: None)

    assert [(s, a, lr) for s, a, lr, *_ in calls] == [
        (s, a, lr) for s in (0, 1) for a in cfg.arms for lr in cfg.lrs]
    for seed in (0, 1):
        mine = [c for c in calls if c[0] == seed]
        assert len({c[3] for c in mine}) == 1  # every arm and rate starts from one warm-up
        assert len({(c[4], c[5]) for c in mine}) == 1  # ... and trains on one meta.json
        pairs = mine[0][4].parent
        assert pairs == tmp_path / f"seed-{seed}" / "pairs"
        for mode in ("cot", "direct"):  # both were sampled and paired (2 questions x 2 samples)
            assert len((pairs / f"shapes_{mode}.samples.jsonl").read_text().splitlines()) == 4
    assert calls[0][3] != next(c for c in calls if c[0] == 1)[3]  # seeds differ

    # per seed: validation for the warm-up (a reference) and every (arm, rate), then the
    # choices, then the test split
    n_val = 1 + len(cfg.arms) * len(cfg.lrs)
    per_seed = n_val + len(cfg.arms) + 1 + len(cfg.arms)  # + test: warm-up and each arm
    assert len(events) == 2 * per_seed
    for s in range(2):
        ev = events[s * per_seed:(s + 1) * per_seed]
        assert ev[:n_val] == [("eval", "val")] * n_val
        assert ev[n_val:n_val + len(cfg.arms)] == [("select", None)] * len(cfg.arms)
        assert ev[n_val + len(cfg.arms):] == [("eval", "test")] * (1 + len(cfg.arms))

    seed0 = json.loads((tmp_path / "seed-0" / "seed.json").read_text())
    for arm in cfg.arms:  # the choice is the validation rule's, on validation rates only
        val = {float(lr): v for lr, v in seed0["validation"][arm].items()}
        assert seed0["chosen_lr"][arm] == select(val)
    assert result["seeds"] == [0, 1] and result["n"] == 4
    assert set(result["models"]) == {"warmup", *cfg.arms}
    assert json.loads((tmp_path / "results.json").read_text())["seeds"] == [0, 1]
    md = (tmp_path / "results.md").read_text()
    assert "| MPO (0.8 DPO + 0.2 BCO + 1.0 SFT) |" in md and "MPO - SFT only" in md

    # seeds run elsewhere (one process per seed) pool into the same table
    from mpo_fast.pairs.cli import main

    pooled = tmp_path / "pooled"
    assert main(["demo", "--pool", str(tmp_path), "--out", str(pooled)]) == 0
    again = json.loads((pooled / "results.json").read_text())
    assert again["seeds"] == [0, 1] and again["accuracy"] == json.loads(
        json.dumps(result["accuracy"]))
    assert (pooled / "results.md").read_text().strip() == md.split("Wall time")[0].strip()


def test_aggregate_pools_seeds_on_the_same_questions():
    def seed(s, mpo, sft):
        t = {"direct": [1, 0], "cot": [1, 0], "steps": [1, 0], "lucky": [0, 0], "format": [0, 0]}
        return {"seed": s, "test_ids": ["t0", "t1"], "chosen_lr": {"mpo": 1e-4, "sft": 3e-4},
                "pairs": {}, "times": {},
                "test": {"warmup": t, "mpo": {**t, "cot": mpo}, "sft": {**t, "cot": sft}}}
    agg = aggregate([seed(0, [1, 1], [1, 0]), seed(1, [0, 1], [0, 1])])
    assert agg["models"] == ["warmup", "sft", "mpo"]
    assert agg["accuracy"]["mpo"]["cot"]["mean"] == pytest.approx(0.75)
    assert agg["accuracy"]["mpo"]["cot"]["seeds"] == pytest.approx([1.0, 0.5])
    d = agg["differences"]["mpo - sft"]["cot"]
    assert d["diff"] == pytest.approx(0.25) and d["seed_diffs"] == pytest.approx([0.5, 0.0])
    assert agg["chosen_lr"]["mpo"] == [1e-4, 1e-4]
    bad = seed(2, [1, 1], [1, 1])
    bad["test_ids"] = ["t0", "t9"]
    with pytest.raises(ValueError, match="different questions"):
        aggregate([seed(0, [1, 1], [1, 0]), bad])


def test_quick_demo_end_to_end_through_the_cli(tmp_path, capsys):
    from mpo_fast.pairs.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("--quick is a smoke test") == 2
    cfg = MiniatureConfig.quick_config()
    result = json.loads((out / "results.json").read_text())
    assert result["quick"] is True and result["seeds"] == [0]
    assert result["n"] == cfg.test_questions
    assert (out / "results.md").read_text().startswith("**--quick: a smoke test.")
    seed = json.loads((out / "seed-0" / "seed.json").read_text())
    assert seed["pairs"]["cot"]["samples"] == seed["pairs"]["direct"]["samples"] == (
        cfg.pair_questions * cfg.num_samples)
    assert seed["train_fn"] == "mpo_trainer"
    n_pairs = sum(seed["pairs"][m][k] for m in ("cot", "direct") for k in ("pairs", "format_pairs"))
    assert n_pairs >= cfg.pairs_per_step  # so every arm trains at least one step
    for arm in cfg.arms:
        assert seed["chosen_lr"][arm] in cfg.lrs
        for lr in cfg.lrs:
            run = out / "seed-0" / "train" / f"{arm}-lr{lr:g}"
            train_cfg = json.loads((run / "config.json").read_text())
            assert train_cfg["loss_types"] == list(ARMS[arm].loss_types)
            assert train_cfg["loss_weights"] == list(ARMS[arm].loss_weights)
            assert train_cfg["lr"] == lr and train_cfg["packing"]
            assert (run / "metrics.jsonl").read_text().splitlines()
        for k in ("direct", "cot", "steps"):
            assert 0 <= result["accuracy"][arm][k]["mean"] <= 1


def test_config_is_checked():
    with pytest.raises(ValueError, match="arms"):
        MiniatureConfig(arms=("mpo", "ppo"))
    with pytest.raises(ValueError, match="lrs"):
        MiniatureConfig(lrs=())
    assert replace(MiniatureConfig(), arms=("mpo",)).arms == ("mpo",)
