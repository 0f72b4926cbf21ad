"""The bundled run (`python -m mpo_fast.train` with no arguments): MPO on a tiny model, on CPU,
in a few minutes, and what it changed.

    1. build the tiny tokenizer and a random-init 2-layer Llama (`mpo_fast.data.tiny`), the
       "largest / smallest of ..." task (8000 training pairs, 256 held-out prompts never seen
       in training): chosen = the right number, rejected = another number of the list
    2. evaluate on the held-out pairs: task accuracy (greedy decoding), preference accuracy
       (log p(chosen) > log p(rejected))
    3. a short SFT warm-up on the chosen answers (the model MPO starts from, and its reference,
       as the paper starts from an instruction-tuned model), evaluate again
    4. MPO (0.8 DPO + 0.2 BCO + 1.0 SFT, packed micro-batches, frozen reference), evaluate:
       task and preference accuracy, and the reward accuracy against the reference
    5. the loss head on one held-out micro-batch: fused MPOLoss against the naive full-logits
       path (logits, log_softmax, gather, the same loss), peak memory and time, at the tiny
       model's vocabulary and at a realistic one (V = 128,256, same hidden size and tokens)

Everything is written under the output folder (default runs/<timestamp>): the two phases'
metrics.jsonl and checkpoints, summary.json, and curves.png (loss, reward accuracy, reward
margin and NLL by step; when matplotlib is installed).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time

import torch

from ..attention import attention_kwargs, model_inputs
from ..data import tiny
from ..data.collate import PairTokenizer, collate, micro_batches
from ..hf_model import lm_head
from ..losses import new_bco_state, preference_loss
from ..measure import cost
from ..mpo import MPOLoss
from ..packing import pack
from .config import TrainConfig
from .loop import default_output_dir, train
from .model import set_attention
from .plot import plot_curves
from .reference import sequence_logps

__all__ = ["evaluate", "run_demo"]

WARMUP_FRACTION = 4  # SFT warm-up steps = MPO steps / 4
REALISTIC_VOCAB = 128_256  # Llama-3's vocabulary


def run_demo(cfg: TrainConfig) -> int:
    t_start = time.perf_counter()
    # the tiny model's matmuls are too small to gain from threads, and several threads on
    # busy cores spin and wait (measured: 5-7x slower steps on a loaded 2-core machine)
    torch.set_num_threads(1)
    out_dir = cfg.output_dir or default_output_dir()
    tok = tiny.tiny_tokenizer()
    model = tiny.tiny_lm(tok, hidden=128, layers=2, seed=cfg.seed)
    train_set = tiny.make_task(tiny.TRAIN_PAIRS, seed=cfg.seed + 1)
    held_out = tiny.make_task(tiny.HELD_OUT_PAIRS, seed=cfg.seed + 2,
                              exclude=frozenset(e.prompt for e in train_set))
    tokenize = PairTokenizer(tok, max_length=cfg.max_length)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"mpo-fast demo: a {n_params / 1e6:.2f}M-parameter Llama (random init, vocab "
          f"{model.config.vocab_size}, tied embeddings) learns 'largest / smallest of a list' "
          f"from {len(train_set)} preference pairs; {len(held_out)} held-out prompts.\n"
          f"  e.g. prompt {held_out[0].prompt!r}  chosen {held_out[0].chosen!r}  rejected "
          f"{held_out[0].rejected!r}\n  output: {out_dir}/")

    stages = {"random init": evaluate(model, None, held_out, tokenize)}
    warmup_steps = max(1, cfg.max_steps // WARMUP_FRACTION)
    warm = dataclasses.replace(cfg, loss_types=("sft",), loss_weights=(1.0,),
                               max_steps=warmup_steps, output_dir=os.path.join(out_dir, "sft"))
    print(f"\n[1/2] SFT warm-up on the chosen answers: {warmup_steps} steps")
    train(warm, model=model, tokenizer=tok, examples=train_set)
    stages["after SFT warm-up"] = evaluate(model, None, held_out, tokenize)
    reference = copy.deepcopy(model).eval()
    print(f"\n[2/2] MPO (0.8 DPO + 0.2 BCO + 1.0 SFT, beta {cfg.beta}), reference = the "
          f"warm-up model: {cfg.max_steps} steps of {cfg.pairs_per_step} pairs, packed "
          f"micro-batches of <= {cfg.max_tokens} tokens")
    result = train(dataclasses.replace(cfg, output_dir=os.path.join(out_dir, "mpo")),
                   model=model, tokenizer=tok, examples=train_set)
    stages["after MPO"] = evaluate(model, reference, held_out, tokenize)
    head = compare_heads(model, held_out, tokenize)
    curves = plot_curves({"SFT warm-up": os.path.join(out_dir, "sft"),
                          "MPO": os.path.join(out_dir, "mpo")},
                         os.path.join(out_dir, "curves.png"),
                         title="mpo-fast demo: SFT warm-up, then MPO (held-out results in "
                               "summary.json)", after=True)
    summary = {"stages": stages, "head": head, "mpo_last_step": result.history[-1],
               "wall_time_s": time.perf_counter() - t_start, "output_dir": out_dir,
               "curves": curves, "stopped_by": result.stopped_by}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    print_summary(summary)
    return 128 + result.stopped_by if result.stopped_by else 0


@torch.no_grad()
def evaluate(model, reference, examples, tokenize: PairTokenizer) -> dict:
    """Held-out task accuracy (greedy decoding), preference accuracy (policy log p(chosen) >
    log p(rejected)) and, given a reference, reward accuracy and margin (as in training)."""
    was_training = model.training
    model.eval()
    pairs = [tokenize(e, i) for i, e in enumerate(examples)]
    c, r, c0, r0 = [], [], [], []
    for group in micro_batches(pairs, 2048):
        batch = collate([pairs[i] for i in group], pad_id=tokenize.pad_id)
        chosen, rejected = sequence_logps(model, batch)
        c.append(chosen)
        r.append(rejected)
        if reference is not None:
            ref_c, ref_r = sequence_logps(reference, batch)
            c0.append(ref_c)
            r0.append(ref_r)
    c, r = torch.cat(c), torch.cat(r)
    answers = greedy(model, [p.prompt for p in pairs], tokenize.eos_id)
    right = [tokenize.tokenizer.decode(a).strip() == tiny.answer_of(e)
             for a, e in zip(answers, examples, strict=True)]
    out = {"task_accuracy": sum(right) / len(right),
           "preference_accuracy": (c > r).float().mean().item()}
    if reference is not None:
        zc, zr = c - torch.cat(c0), r - torch.cat(r0)
        out["reward_accuracy"] = (zc > zr).float().mean().item()
        out["reward_margin"] = (0.1 * (zc - zr)).mean().item()
    model.train(was_training)
    return out


@torch.no_grad()
def greedy(model, prompts: list[list[int]], eos_id: int, max_new_tokens: int = 3
           ) -> list[list[int]]:
    """Greedy decoding of every prompt, all in one packed row per step (no KV cache: the
    answers are a few tokens): the generated tokens before eos."""
    seqs = [list(p) for p in prompts]
    done = [False] * len(seqs)
    weight = lm_head(model)[0].float()
    for _ in range(max_new_tokens):
        lengths = torch.tensor([len(s) for s in seqs])
        ids = torch.zeros(len(seqs), int(lengths.max()), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = torch.tensor(s)
        p = pack(ids, lengths)
        hidden = model.base_model(**model_inputs(p), use_cache=False).last_hidden_state[0]
        last = p.cu_seqlens[1:].long() - 1
        nxt = (hidden[last] @ weight.T).argmax(-1).tolist()
        for i, t in enumerate(nxt):
            if not done[i]:
                seqs[i].append(t)
                done[i] = t == eos_id
        if all(done):
            break
    out = []
    for s, p in zip(seqs, prompts, strict=True):
        new = s[len(p):]
        out.append(new[:new.index(eos_id)] if eos_id in new else new)
    return out


def compare_heads(model, examples, tokenize: PairTokenizer, pairs: int = 16) -> dict:
    """The loss head alone (policy forward + backward, reference log-probs given) on one
    packed micro-batch of held-out pairs: fused `MPOLoss` vs naive full logits, at the tiny
    model's vocabulary and at REALISTIC_VOCAB (a random head of the same hidden size)."""
    batch = collate([tokenize(e, i) for i, e in enumerate(examples[:pairs])],
                    pad_id=tokenize.pad_id)
    set_attention(model, True)
    with torch.no_grad():
        hidden = model.base_model(input_ids=batch.input_ids[None],
                                  position_ids=batch.position_ids[None], use_cache=False,
                                  **attention_kwargs(batch.segments)).last_hidden_state[0]
    weight = lm_head(model)[0].float()
    out = {"tokens": batch.num_tokens, "pairs": batch.num_pairs, "hidden": hidden.shape[-1]}
    g = torch.Generator().manual_seed(0)
    big = torch.randn(REALISTIC_VOCAB, hidden.shape[-1], generator=g) * 0.02
    for name, w, repeats in (("tiny_vocab", weight.detach(), 3), ("realistic_vocab", big, 1)):
        case = {"vocab": w.shape[0]}
        for how, step in (("fused", _fused_step), ("naive", _naive_step)):
            case[how] = cost(lambda step=step, w=w: step(hidden, w, batch.targets, batch),
                             repeats=repeats)
        out[name] = case
    return out


def _ref_logps(batch):
    B = batch.num_pairs
    return torch.full((B,), -5.0), torch.full((B,), -6.0)


def _fused_step(hidden, weight, targets, batch):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    MPOLoss()(h, w, targets, cu_seqlens=batch.segments, ref_logps=_ref_logps(batch)).loss.backward()


def _naive_step(hidden, weight, targets, batch):
    """What a trainer without a fused head does: full fp32 logits, log_softmax, gather."""
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp = torch.log_softmax((h @ w.T).float(), dim=-1)
    scored = targets != -100
    token = logp.gather(-1, targets.clamp(min=0)[:, None])[:, 0] * scored
    seq = batch.segments.sum(token)
    B = batch.num_pairs
    counts = batch.segments.sum(scored.float())
    loss, _ = preference_loss(seq[:B], seq[B:], *_ref_logps(batch),
                              chosen_lengths=counts[:B], rejected_lengths=counts[B:],
                              bco_state=new_bco_state())
    loss.backward()


def print_summary(s: dict) -> None:
    names = list(s["stages"])
    rows = [("task accuracy (greedy decoding)", "task_accuracy"),
            ("preference accuracy (log p(chosen) > log p(rejected))", "preference_accuracy"),
            ("reward accuracy vs the reference (DPO's metric)", "reward_accuracy")]
    width = max(len(r[0]) for r in rows) + 2
    print("\n" + "=" * 88)
    print("What improved (held-out pairs, never trained on)".ljust(width)
          + "".join(n.rjust(19) for n in names))
    for label, key in rows:
        cells = [f"{s['stages'][n][key]:.1%}" if key in s["stages"][n] else "-" for n in names]
        print(label.ljust(width) + "".join(c.rjust(19) for c in cells))
    margin = s["stages"][names[-1]].get("reward_margin")
    if margin is not None:
        print(f"reward margin beta*((c - c0) - (r - r0)), mean: {margin:+.3f}. MPO's loss "
              "includes 1.0 x SFT on the chosen answers, which teaches the task too: the "
              "accuracy gain is MPO's as a whole, not the preference terms' alone.")
    h = s["head"]
    print(f"\nLoss head, policy fwd+bwd on one packed micro-batch ({h['pairs']} pairs, "
          f"{h['tokens']} tokens, H={h['hidden']}), CPU:")
    for name in ("tiny_vocab", "realistic_vocab"):
        c = h[name]
        f, n = c["fused"], c["naive"]
        ratio = (f"{n['peak_mib'] / f['peak_mib']:.1f}x less memory, "
                 if min(f["peak_mib"], n["peak_mib"]) >= 1 else "")
        print(f"  V={c['vocab']:>7,}: fused {f['ms']:7.1f} ms, peak +{f['peak_mib']:6.1f} MiB   "
              f"naive {n['ms']:7.1f} ms, peak +{n['peak_mib']:6.1f} MiB   "
              f"({ratio}{n['ms'] / f['ms']:.2f}x the speed)")
    last = s["mpo_last_step"]
    print(f"\nMPO last step: loss {last['loss']:.3f}, rewards/accuracies "
          f"{last['rewards/accuracies']:.2f}, bco/delta {last['bco/delta']:.3f}, "
          f"{last['tokens_per_s']:.0f} tokens/s, padding {last['padding_fraction']:.0%}")
    plot = ", curves.png" if s.get("curves") else ""
    print(f"Wall time {s['wall_time_s']:.0f} s. Output: {s['output_dir']}/ (summary.json{plot}, "
          "sft/ and mpo/ with metrics.jsonl and checkpoints)")
