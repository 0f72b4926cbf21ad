"""mpo_fast.train on CPU: tiny random-init models (a Llama, an InternVL), packed = padded =
a float64 full-logits oracle, images encoded once per pair, exact micro-batch accounting,
references, M-RoPE refusal, the CLI and the demo."""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from mpo_fast import MPOLoss
from mpo_fast.data import DataError, PairTokenizer, collate, load_dataset, tiny
from mpo_fast.data.collate import TokenizedPair
from mpo_fast.losses import new_bco_state, preference_loss
from mpo_fast.train import checkpoint, cli, plot, reference
from mpo_fast.train.config import TrainConfig, resolve
from mpo_fast.train.distributed import Context
from mpo_fast.train.loop import train
from mpo_fast.train.model import MPOModel, check_packable, count_calls, hidden_states, set_attention

CPU = Context("none", 0, 1, torch.device("cpu"))
NO_AMP = lambda: torch.autocast("cpu", enabled=False)


@pytest.fixture(scope="module")
def tok():
    return tiny.tiny_tokenizer()


def small_lm(tok, seed=0):
    return tiny.tiny_lm(tok, hidden=32, layers=1, heads=2, seed=seed)


def random_pairs(n, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    ids = lambda k: torch.randint(0, vocab, (k,), generator=g).tolist()
    length = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))
    return [TokenizedPair(ids(length(2, 12)), ids(length(1, 7)), ids(length(1, 7)), index=i)
            for i in range(n)]


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def run_policy(model, pairs, packed, ref_logps, pad_id):
    """Loss, metrics and parameter gradients of one MPOModel call."""
    set_attention(model, packed)
    model.zero_grad(set_to_none=True)
    batch = collate(pairs, pad_id=pad_id, packed=packed)
    out = MPOModel(model, MPOLoss())(batch, ref_logps)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def oracle_loss(model, pairs, ref_logps, pad_id):
    """float64: the model's own full logits (padded, sdpa with mask), log_softmax, gather,
    the same MPO loss on sequence sums; gradients w.r.t. every parameter."""
    m = copy.deepcopy(model).double()
    set_attention(m, packed=False)
    batch = collate(pairs, pad_id=pad_id, packed=False)
    kwargs = {"pixel_values": torch.cat([batch.pixel_values] * 2).double()} \
        if batch.pixel_values is not None else {}
    logits = m(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long(),
               position_ids=batch.position_ids, use_cache=False, **kwargs).logits
    scored = batch.targets != -100
    token = logits.log_softmax(-1).gather(-1, batch.targets.clamp(min=0)[..., None])[..., 0]
    seq, counts = (token * scored).sum(-1), scored.sum(-1)
    B = batch.num_pairs
    loss, _ = preference_loss(seq[:B], seq[B:], *(r.double() for r in ref_logps),
                              chosen_lengths=counts[:B], rejected_lengths=counts[B:],
                              bco_state=new_bco_state())
    loss.backward()
    return loss, {n: p.grad for n, p in m.named_parameters() if p.grad is not None}


# --------------------------------------------------------------------------- causal LM


def test_packed_padded_and_float64_oracle_agree_on_loss_and_gradients(tok):
    model = small_lm(tok, seed=torch.initial_seed() % 1000)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied
    pairs = random_pairs(6, len(tok), seed=torch.initial_seed())
    ref = (torch.randn(6) - 20, torch.randn(6) - 20)
    packed, g_packed = run_policy(model, pairs, True, ref, tok.pad_token_id)
    padded, g_padded = run_policy(model, pairs, False, ref, tok.pad_token_id)
    oracle, g_oracle = oracle_loss(model, pairs, ref, tok.pad_token_id)
    assert torch.isfinite(packed.loss)
    assert rel(packed.loss, oracle) < 1e-5 and rel(padded.loss, oracle) < 1e-5
    for k in packed.metrics:
        assert rel(packed.metrics[k], padded.metrics[k]) < 1e-5, k
    assert g_packed.keys() == g_padded.keys() == g_oracle.keys()
    assert "model.embed_tokens.weight" in g_packed  # the tied head's gradient arrives
    for name in g_oracle:
        assert rel(g_packed[name], g_oracle[name]) < 1e-5, name
        assert rel(g_padded[name], g_oracle[name]) < 1e-5, name


def losses_on_fixed_batch(model, ref, batch, steps: int):
    """MPO loss of each of ``steps`` AdamW steps (lr 1e-2) on the same batch, and the last
    step's `MPOOutput`."""
    policy = MPOModel(model, MPOLoss())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        out = policy(batch, ref.logps(batch))
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    return losses, out


def test_loss_decreases_on_a_fixed_batch(tok):
    model = small_lm(tok)
    pairs = random_pairs(8, len(tok), seed=torch.initial_seed())
    ref = reference.FrozenCopy(model, CPU, NO_AMP)
    set_attention(model, True)
    batch = collate(pairs, pad_id=tok.pad_token_id)
    losses, out = losses_on_fixed_batch(model, ref, batch, steps=8)
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.8 * losses[0], losses
    assert out.metrics["rewards/accuracies"] > 0.5  # the policy moved away from the reference


def cfg_for(tmp_path, **kw):
    base = dict(model="given", data="given", output_dir=str(tmp_path), max_steps=2,
                pairs_per_step=8, max_tokens=4096, max_length=32, lr=1e-3, warmup_ratio=0.0,
                log_every=1, progress=False, save_every=0)
    return TrainConfig(**{**base, **kw})


def test_micro_batch_split_gives_the_loss_and_step_of_the_whole_batch(tok, tmp_path):
    """J accounting: pair-mean terms and the SFT token mean of the whole step, however the
    step is cut into micro-batches (bco_delta="none": the running mean is per call)."""
    examples = tiny.make_task(16, seed=torch.initial_seed() % 1000)
    runs = []
    for name, max_tokens in (("one", 4096), ("many", 48)):
        model = small_lm(tok)
        cfg = cfg_for(tmp_path / name, max_tokens=max_tokens, bco_delta="none")
        r = train(cfg, model=model, tokenizer=tok, examples=examples, log=lambda *a: None)
        runs.append((r, dict(model.named_parameters())))
    (one, w_one), (many, w_many) = runs
    assert [h["micro_batches"] for h in one.history] == [1, 1]
    assert all(h["micro_batches"] >= 3 for h in many.history)
    for a, b in zip(one.history, many.history, strict=True):
        for k in ("loss", "rewards/accuracies", "rewards/margins", "loss/sigmoid"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), k
    for name in w_one:
        assert rel(w_many[name].detach(), w_one[name].detach()) < 1e-5, name


def test_gradient_checkpointing_and_bf16_autocast(tok, tmp_path):
    examples = tiny.make_task(16, seed=3)
    weights = []
    for name, gc in (("plain", False), ("gc", True)):
        model = small_lm(tok)
        train(cfg_for(tmp_path / name, gradient_checkpointing=gc, max_steps=1), model=model,
              tokenizer=tok, examples=examples, log=lambda *a: None)
        weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
    for name in weights[0]:
        assert rel(weights[1][name], weights[0][name]) < 1e-6, name
    r = train(cfg_for(tmp_path / "bf16", dtype="bf16", max_steps=2), model=small_lm(tok),
              tokenizer=tok, examples=examples, log=lambda *a: None)
    assert all(np.isfinite(h["loss"]) for h in r.history)


# --------------------------------------------------------------------------- InternVL


def vl_examples(tmp_path, n=6, seed=0):
    rng = np.random.default_rng(seed)
    root = tmp_path / "imgs"
    root.mkdir(exist_ok=True)
    rows = []
    for i in range(n):
        names = [f"{i}-{k}.png" for k in range(1 + i % 2)]
        for name in names:
            Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(root / name)
        q = "which color is this image ?" if i % 2 == 0 else "<image> and <image> : which is red ?"
        rows.append({"image": names[0] if len(names) == 1 else names, "question": q,
                     "chosen": f"red {i}", "rejected": f"blue {i % 3}"})
    rows.append({"question": "is it red ?", "chosen": "yes", "rejected": "no"})  # no image
    with open(tmp_path / "ann.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    (tmp_path / "meta.json").write_text(json.dumps(
        {"vl": {"root": "imgs", "annotation": "ann.jsonl", "repeat_time": 1}}))
    examples, report = load_dataset(str(tmp_path / "meta.json"))
    assert report.loaded == n + 1 and not report.skipped
    return examples


def test_internvl_packed_padded_oracle_and_images_encoded_once(tok, tmp_path):
    model, proc = tiny.tiny_internvl(tok, image_size=56, seed=torch.initial_seed() % 1000)
    examples = vl_examples(tmp_path, seed=torch.initial_seed() % 1000)
    tokenize = PairTokenizer(tok, proc, max_length=64)
    pairs = [tokenize(e, i) for i, e in enumerate(examples)]
    n_images = sum(len(e.images) for e in examples)
    B = len(pairs)
    ref = (torch.randn(B) - 20, torch.randn(B) - 20)
    results = {}
    for packed in (True, False):
        with count_calls(model.model.vision_tower) as calls:
            results[packed] = run_policy(model, pairs, packed, ref, tokenize.pad_id)
        assert len(calls) == 1, "one vision-tower call per micro-batch"
    batch = collate(pairs, pad_id=tokenize.pad_id)
    assert batch.pixel_values.shape[0] == n_images  # each pair's images once, not twice
    oracle, g_oracle = oracle_loss(model, pairs, ref, tokenize.pad_id)  # images twice (HF)
    (packed, g_packed), (padded, g_padded) = results[True], results[False]
    assert rel(packed.loss, oracle) < 1e-5 and rel(padded.loss, oracle) < 1e-5
    assert any("vision_tower" in n for n in g_oracle)
    for name in g_oracle:
        assert rel(g_packed[name], g_oracle[name]) < 1e-5, name
        assert rel(g_padded[name], g_oracle[name]) < 1e-5, name


def test_internvl_trains_from_mmpr_files(tok, tmp_path):
    model, proc = tiny.tiny_internvl(tok, image_size=56)
    examples = vl_examples(tmp_path)
    tokenize = PairTokenizer(tok, proc, max_length=64)
    pairs = [tokenize(e, i) for i, e in enumerate(examples)]
    set_attention(model, True)
    batch = collate(pairs, pad_id=tokenize.pad_id)
    ref = reference.FrozenCopy(model, CPU, NO_AMP)
    losses, _ = losses_on_fixed_batch(model, ref, batch, steps=6)
    assert all(np.isfinite(losses)) and losses[-1] < 0.9 * losses[0], losses
    cfg = cfg_for(tmp_path / "run", pairs_per_step=4, max_tokens=96)
    with count_calls(model.model.vision_tower) as calls:
        r = train(cfg, model=model, tokenizer=tok, processor=proc, examples=examples,
                  log=lambda *a: None)
    micro = sum(h["micro_batches"] for h in r.history)
    assert len(calls) <= 2 * micro  # policy + reference, once per micro-batch (if any images)
    assert all(np.isfinite(h["loss"]) for h in r.history)
    assert checkpoint.latest(str(tmp_path / "run" / "checkpoints")).endswith("step-00000002")


# --------------------------------------------------------------------------- M-RoPE


def tiny_qwen2_vl(tok):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    cfg = Qwen2VLConfig(
        vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                          "mrope_section": [1, 1, 2]}),
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id)
    return Qwen2VLForConditionalGeneration(cfg)


def test_mrope_packing_is_refused_and_padded_is_exact(tok, tmp_path):
    model = tiny_qwen2_vl(tok)
    with pytest.raises(ValueError, match=r"M-RoPE.*--no-packing"):
        check_packable(model)
    with pytest.raises(ValueError, match="M-RoPE"):
        train(cfg_for(tmp_path), model=model, tokenizer=tok,
              examples=tiny.make_task(16, seed=1), log=lambda *a: None)
    pairs = random_pairs(4, len(tok), seed=torch.initial_seed())
    ref = (torch.randn(4) - 20, torch.randn(4) - 20)
    padded, grads = run_policy(model, pairs, False, ref, tok.pad_token_id)
    oracle, g_oracle = oracle_loss(model, pairs, ref, tok.pad_token_id)
    assert rel(padded.loss, oracle) < 1e-5
    for name in g_oracle:
        assert rel(grads[name], g_oracle[name]) < 1e-5, name


# --------------------------------------------------------------------------- references


def test_cached_reference_matches_the_frozen_copy_and_is_reused(tok, tmp_path, monkeypatch):
    model = small_lm(tok)
    examples = tiny.make_task(12, seed=4)
    tokenize = PairTokenizer(tok, max_length=32)
    key = reference.fingerprint(model, reference.data_key(examples, tokenize), {})
    build = lambda: reference.CachedReference.build(
        model, (lambda i: tokenize(examples[i], i), len(examples)), str(tmp_path), key, CPU,
        max_tokens=64, pad_id=tokenize.pad_id, packed=True, autocast=NO_AMP)
    set_attention(model, True)
    cached = build()
    frozen = reference.FrozenCopy(model, CPU, NO_AMP)
    pairs = [tokenize(examples[i], i) for i in (7, 2, 9)]
    batch = collate(pairs, pad_id=tokenize.pad_id)
    for a, b in zip(cached.logps(batch), frozen.logps(batch), strict=True):
        assert rel(a, b) < 1e-5 and (a < 0).all()

    def no_forward(*a, **k):
        raise AssertionError("the cache should have been read, not recomputed")

    monkeypatch.setattr(reference, "sequence_logps", no_forward)
    again = build()
    assert again.path == cached.path and torch.equal(again.table, cached.table)
    with torch.no_grad():
        model.model.norm.weight.add_(0.1)
    assert reference.fingerprint(model, reference.data_key(examples, tokenize), {}) != key
    fewer = reference.data_key(examples[:-1], tokenize)
    assert fewer != reference.data_key(examples, tokenize)


def test_adapter_disabled_reference_with_peft(tok):
    peft = pytest.importorskip("peft")
    model = small_lm(tok)
    set_attention(model, True)
    pairs = random_pairs(3, len(tok), seed=1)
    batch = collate(pairs, pad_id=tok.pad_token_id)
    base_logps = reference.sequence_logps(model, batch)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                      init_lora_weights=False))
    ref = reference.AdapterDisabled(lora, NO_AMP)
    for a, b in zip(ref.logps(batch), base_logps, strict=True):
        assert rel(a, b) < 1e-6
    with torch.no_grad():
        moved = hidden_states(lora, batch)
    assert moved.shape[-1] == 32


# --------------------------------------------------------------------------- config and CLI


def test_config_layers_defaults_preset_yaml_flags(tmp_path):
    paper = TrainConfig(model="org/model")
    assert (paper.beta, paper.loss_types, paper.loss_weights, paper.bco_delta, paper.lr,
            paper.lr_schedule, paper.warmup_ratio, paper.weight_decay) == (
        0.1, ("sigmoid", "bco_pair", "sft"), (0.8, 0.2, 1.0), "running_mean", 5e-6, "cosine",
        0.03, 0.05)
    assert resolve({"model": "org/model"}).lr == 5e-6  # no preset for a real model
    assert resolve({}).lr == 1e-3  # the tiny preset
    (tmp_path / "c.yaml").write_text("lr: 2.0e-5\nloss_types: sigmoid,sft\nloss_weights: [1, 1]\n")
    cfg = resolve({"lr": 3e-5, "model": "org/model"}, str(tmp_path / "c.yaml"))
    assert cfg.lr == 3e-5 and cfg.loss_types == ("sigmoid", "sft") and cfg.loss_weights == (1, 1)
    with pytest.raises(ValueError, match=r"unknown config fields.*'lrr'"):
        resolve({"lrr": 1})
    with pytest.raises(ValueError, match="reference must be one of"):
        TrainConfig(reference="ema")
    args = cli.build_parser().parse_args(["--lr", "1e-4", "--no-packing", "--loss-types",
                                          "sigmoid,sft", "--loss-weights", "1,2"])
    assert (args.lr, args.packing, args.loss_types) == ("1e-4", False, "sigmoid,sft")
    assert resolve({"lr": args.lr}).lr == 1e-4  # flags pass their text; TrainConfig converts


def test_the_demo_runs_end_to_end_and_reports(tmp_path, capsys):
    out = tmp_path / "demo"
    code = cli.main(["--max-steps", "4", "--output-dir", str(out), "--no-progress"])
    assert code == 0
    text = capsys.readouterr().out
    assert "What improved" in text and "V=128,256" in text and str(out) in text
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["stages"]) == {"random init", "after SFT warm-up", "after MPO"}
    assert summary["stages"]["after MPO"]["reward_accuracy"] >= 0
    head = summary["head"]["realistic_vocab"]
    assert head["naive"]["peak_mib"] > head["fused"]["peak_mib"]  # the logits' memory
    assert checkpoint.latest(str(out / "mpo" / "checkpoints"))
    assert summary["curves"] == str(out / "curves.png") and "curves.png" in text
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_curves_plot_into_the_run_folder_overlaid_or_in_order(tmp_path, capsys, monkeypatch):
    for name, losses in (("sft", [3.0, 2.0]), ("mpo", [1.5, 1.0, 0.5])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("".join(
            json.dumps({"step": i + 1, "loss": x, "nll_loss": x}) + "\n"
            for i, x in enumerate(losses)))
    drawn = {}
    real = plot.plot_curves

    def spy(runs, path, title="", after=False):
        drawn.update(runs=list(runs), after=after)
        return real(runs, path, title, after)

    monkeypatch.setattr(plot, "plot_curves", spy)
    monkeypatch.chdir(tmp_path)  # nothing may land in the working directory
    assert plot.main([str(tmp_path / "sft"), str(tmp_path / "mpo")]) == 0
    assert drawn == {"runs": ["sft", "mpo"], "after": False}  # overlaid by default
    assert (tmp_path / "sft" / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "curves.png").exists()
    png = tmp_path / "c.png"
    assert plot.main([str(tmp_path / "sft"), str(tmp_path / "mpo"), "--after", "--out",
                      str(png)]) == 0
    assert drawn["after"] and png.read_bytes()[:4] == b"\x89PNG"
    assert plot.main([str(tmp_path / "nothing-here"), "--out", str(png)]) == 2
    assert "no metrics.jsonl records" in capsys.readouterr().err


def test_cached_reference_trains_like_the_frozen_copy(tok, tmp_path):
    examples = tiny.make_task(24, seed=5)
    runs = {}
    for kind in ("copy", "cached"):
        r = train(cfg_for(tmp_path / kind, reference=kind, max_steps=3), model=small_lm(tok),
                  tokenizer=tok, examples=examples, log=lambda *a: None)
        runs[kind] = [h["loss"] for h in r.history]
    assert runs["cached"] == pytest.approx(runs["copy"], rel=1e-5)
    cached = list((tmp_path / "cached" / "ref_cache").glob("ref_logps-*.pt"))
    assert len(cached) == 1


def test_bad_pairs_at_tokenization_are_skipped_or_fatal(tok, tmp_path):
    model, proc = tiny.tiny_internvl(tok, image_size=56)
    examples = vl_examples(tmp_path)  # prompts with images, 4 image tokens each
    long = dataclasses.replace(examples[0], prompt="<image> " + "largest of " * 30,
                               source="ann.jsonl:1")
    data = [long, *examples[1:]]
    said = []
    r = train(cfg_for(tmp_path / "skip", pairs_per_step=len(data), max_steps=1, max_length=40),
              model=model, tokenizer=tok, processor=proc, examples=data, log=said.append)
    assert r.history[0]["pairs"] == len(data) - 1  # the step went on without it
    assert any("ann.jsonl:1" in s and "image tokens" in s for s in said)
    with pytest.raises(DataError, match=r"ann.jsonl:1: .*image tokens"):
        train(cfg_for(tmp_path / "raise", pairs_per_step=len(data), max_steps=1, max_length=40,
                      on_bad_data="raise"), model=model, tokenizer=tok, processor=proc,
              examples=data, log=lambda *a: None)


def test_gemma2_softcap_and_sliding_window_match_its_own_logits():
    """final_logit_softcapping goes to the fused head; the sliding window to packed attention."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                       final_logit_softcapping=3.0, query_pre_attn_scalar=16, sliding_window=4)
    model = Gemma2ForCausalLM(cfg)
    pairs = random_pairs(3, 64, seed=torch.initial_seed())
    set_attention(model, True)
    chosen, rejected = reference.sequence_logps(model, collate(pairs, pad_id=0))
    set_attention(model, False)
    b = collate(pairs, pad_id=0, packed=False)
    with torch.no_grad():
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask.long()).logits
    token = logits.log_softmax(-1).gather(-1, b.targets.clamp(min=0)[..., None])[..., 0]
    seq = (token * (b.targets != -100)).sum(-1)
    assert rel(chosen, seq[:3]) < 1e-5 and rel(rejected, seq[3:]) < 1e-5
