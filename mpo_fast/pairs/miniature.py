"""The method end to end, in miniature, on a CPU: `mpo-fast pairs demo`.

    1. task      synthetic shape counting (`mpo_fast.pairs.shapes`): train / pair / test splits
    2. model     a tiny InternVL built in code (`mpo_fast.pairs.tiny`), random init
    3. SFT       a short warm-up on reference answers, direct and chain-of-thought
    4. before    accuracy on the test split, direct answers and CoT (greedy)
    5. pairs     the correctness pipeline on the model's own samples (`run_correctness`):
                 K samples per question at temperature 0.7 -> MMPR jsonl + meta.json
    6. MPO       `train_fn(model, processor, meta_path, out_dir, config)`: trains the model in
                 place on the pairs of meta.json, the reference being a frozen copy; by default
                 `mpo_trainer`, the trainer (`mpo_fast.train.train`) on the in-memory model:
                 sigmoid + bco_pair + sft at 0.8 / 0.2 / 1.0, beta 0.1, packed, fp32, AdamW
                 with warmup + cosine, the learning rate / epochs / pairs per step of
                 `MiniatureConfig.mpo_*`; the final checkpoint and metrics.jsonl in
                 <out>/after (and <out>/sft_only)
    7. after     accuracy again
    8. control   (config.control) the same from the same start with the SFT term alone
                 (loss_types ("sft",)): what the preference terms add over fine-tuning on the
                 chosen responses; then results.json

One token layout throughout: the trainer tokenizes a pair with the processor's chat template and
image tokens (`mpo_fast.data.collate.PairTokenizer`), which gives exactly the ids of `encode_row`
(the SFT warm-up) and of the prompts `Generator` samples and evaluates with, and scores the same
positions: the answer and its end-of-turn token (tests/test_pairs_miniature.py checks it).
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .answers import extract_answer, match_answer
from .correctness import CorrectnessConfig, cot_question, run_correctness
from .generate import Generator, Prompt, SamplingConfig
from .io import load_images
from .shapes import DIRECT_SUFFIX, QUESTION, cot_text, make_example, task_corpus, write_split
from .tiny import build_tiny_vlm, build_tokenizer

__all__ = ["MiniatureConfig", "evaluate", "mpo_trainer", "run_miniature", "sft_warmup"]

IGNORE = -100
MINI_COT_INSTRUCTION = ("{question}\nReason step by step, then end with "
                        "\"Final Answer: <answer>\".")


@dataclass(frozen=True)
class MiniatureConfig:
    seed: int = 0
    max_total: int = 9  # shapes per image: 1..max_total
    n_colors: int = 3  # red, blue, green
    # SFT warm-up (on freshly generated examples, half direct, half CoT)
    sft_steps: int = 150
    sft_batch: int = 32
    sft_lr: float = 2e-3
    # correctness pairs from the model's own samples
    pair_questions: int = 160
    num_samples: int = 16
    max_pairs: int = 15
    temperature: float = 0.7
    top_k: int = 50
    gen_batch: int = 128
    # MPO
    mpo_epochs: int = 2
    mpo_batch: int = 16  # pairs per step
    mpo_lr: float = 1e-4
    beta: float = 0.1
    mpo_loss_types: tuple[str, ...] = ("sigmoid", "bco_pair", "sft")
    mpo_loss_weights: tuple[float, ...] | None = None  # None: the paper's 0.8 / 0.2 / 1.0
    # tokens per packed micro-batch: on a CPU packed attention is dense over the micro-batch
    # (masked), so several small ones beat one big one (the step's loss is the same)
    mpo_max_tokens: int = 512
    control: bool = True  # also train an SFT-only copy (same pairs, steps, start) to compare
    # evaluation
    test_questions: int = 300
    max_new_tokens: int = 32
    # the CoT instruction (a short one: every token is paid for in every step on a CPU)
    instruction: str = MINI_COT_INSTRUCTION
    threads: int | None = 1  # torch threads (1 is fastest for this size on a shared CPU)

    @classmethod
    def quick(cls, seed: int = 0) -> MiniatureConfig:
        """A smoke-test size (about a minute): numbers mean little."""
        return cls(seed=seed, sft_steps=60, pair_questions=24, num_samples=8, mpo_epochs=1,
                   test_questions=60)


TrainFn = Callable[[Any, Any, Path, Path, MiniatureConfig], Any]


# ---------------------------------------------------------------- encoding

@dataclass
class Row:
    ids: list[int]
    n_prompt: int  # tokens of the prompt (not scored)
    pixels: torch.Tensor | None  # [num_images, 3, H, W]


def encode_row(gen: Generator, question: str, images: Sequence, completion: str) -> Row:
    """Prompt (chat template, image tokens) + completion + end-of-turn, as token ids."""
    batch = gen.encode([Prompt(question, images)])
    prompt = batch["input_ids"][0].tolist()
    tok = gen.tokenizer
    completion_ids = tok(completion + tok.eos_token, add_special_tokens=False)["input_ids"]
    return Row(prompt + completion_ids, len(prompt), batch.get("pixel_values"))


def collate(rows: Sequence[Row], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ids, attention mask, shifted targets (completion tokens only), pixels."""
    T = max(len(r.ids) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    targets = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r.ids)
        ids[i, :n] = torch.tensor(r.ids)
        mask[i, :n] = 1
        targets[i, r.n_prompt - 1:n - 1] = ids[i, r.n_prompt:n]  # target t = token t + 1
    out = {"input_ids": ids, "attention_mask": mask, "targets": targets}
    pixels = [r.pixels for r in rows if r.pixels is not None]
    if pixels:
        out["pixel_values"] = torch.cat(pixels)
    return out


def hidden_states(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Final hidden states [rows, T, H] of the language model (image features injected)."""
    out = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      pixel_values=batch.get("pixel_values"))
    return out.last_hidden_state


def _schedule(opt, total: int, warmup: int):
    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


# ---------------------------------------------------------------- SFT warm-up

def direct_question(q: str = QUESTION) -> str:
    return f"<image>\n{q}\n{DIRECT_SUFFIX}"


def sft_warmup(model, gen: Generator, cfg: MiniatureConfig, rng: random.Random,
               log=print) -> list[float]:
    """`cfg.sft_steps` steps of SFT on fresh examples (half direct answers, half CoT)."""
    from mpo_fast import fused_logprobs

    opt = torch.optim.AdamW(model.parameters(), lr=cfg.sft_lr, weight_decay=0.0)
    sched = _schedule(opt, cfg.sft_steps, max(1, cfg.sft_steps // 10))
    model.train()
    losses = []
    for step in range(cfg.sft_steps):
        rows = []
        for i in range(cfg.sft_batch):
            ex = make_example(rng, cfg.max_total, cfg.n_colors)
            if i % 2:
                rows.append(encode_row(gen, cot_question(f"<image>\n{QUESTION}", cfg.instruction),
                                       [ex.image],
                                       cot_text(ex.counts)))
            else:
                rows.append(encode_row(gen, direct_question(), [ex.image], str(ex.total)))
        batch = collate(rows, gen.tokenizer.pad_token_id)
        h = hidden_states(model, batch)
        lp = fused_logprobs(h, model.lm_head.weight, batch["targets"], ignore_index=IGNORE)
        loss = -lp.sum() / (batch["targets"] != IGNORE).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if (step + 1) % max(1, cfg.sft_steps // 5) == 0:
            recent = losses[-20:]
            log(f"[sft] step {step + 1}/{cfg.sft_steps} loss {sum(recent) / len(recent):.3f}")
    model.eval()
    return losses


# ---------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(gen: Generator, items: Sequence[dict], root: Path, instruction: str,
             max_new_tokens: int = 32) -> dict:
    """Greedy accuracy with direct answers and with CoT ("Final Answer:" required), and the
    CoT format failure rate."""
    images = [load_images(it["image"], root) for it in items]
    direct = gen([Prompt(direct_question(it["question"]), im)
                  for it, im in zip(items, images, strict=True)],
                 desc="eval direct", do_sample=False, max_new_tokens=6)
    cot = gen([Prompt(cot_question(f"<image>\n{it['question']}", instruction), im)
               for it, im in zip(items, images, strict=True)],
              desc="eval CoT", do_sample=False, max_new_tokens=max_new_tokens)
    d_ok = [match_answer(extract_answer(r, require_trigger=False), it["answer"])
            for r, it in zip(direct, items, strict=True)]
    c_ans = [extract_answer(r) for r in cot]
    c_ok = [match_answer(a, it["answer"]) for a, it in zip(c_ans, items, strict=True)]
    n = len(items)
    return {"direct": sum(d_ok) / n, "cot": sum(c_ok) / n,
            "cot_format_failures": sum(a is None for a in c_ans) / n, "n": n,
            "examples": [{"answer": it["answer"], "direct": d, "cot": c}
                         for it, d, c in zip(items[:3], direct, cot, strict=False)]}


# ---------------------------------------------------------------- MPO: the trainer

def mpo_trainer(model, processor, meta_path: Path, out_dir: Path, cfg: MiniatureConfig,
                log=print) -> Any:
    """Train `model` in place with the trainer (`mpo_fast.train.train`) on the MMPR pairs of
    `meta_path`: the loss of ``cfg.mpo_loss_types`` / ``mpo_loss_weights`` (None: the paper's
    0.8 / 0.2 / 1.0 for MPO, 1.0 each otherwise) with ``cfg.beta``, the reference a frozen copy
    of the model at the start, AdamW at ``cfg.mpo_lr`` with the trainer's warmup + cosine,
    ``cfg.mpo_epochs`` passes of ``cfg.mpo_batch`` pairs per step, packed into micro-batches
    of ``cfg.mpo_max_tokens``, fp32, one process.
    Into `out_dir`: config.json, metrics.jsonl (every step) and the final checkpoint only.

    The trainer tokenizes a pair with `mpo_fast.data.collate.PairTokenizer` (the processor's
    chat template and image tokens): the same ids as `encode_row` and the prompts `Generator`
    samples and evaluates with (tests/test_pairs_miniature.py checks it)."""
    from mpo_fast.data.formats import load_dataset
    from mpo_fast.losses import LossConfig
    from mpo_fast.train import TrainConfig, train

    examples, report = load_dataset(str(meta_path), on_error="raise", seed=cfg.seed)
    log(f"[mpo] data: {report.summary()}")
    if len(examples) < cfg.mpo_batch:
        log(f"[mpo] {len(examples)} pairs, fewer than one step of {cfg.mpo_batch}: "
            "nothing to train")
        return model
    loss = LossConfig(cfg.mpo_loss_types, cfg.mpo_loss_weights, cfg.beta)
    train_cfg = TrainConfig(
        model="pairs-miniature (in memory)", data=str(meta_path), output_dir=str(out_dir),
        beta=loss.beta, loss_types=loss.loss_types, loss_weights=loss.loss_weights,
        reference="copy", lr=cfg.mpo_lr, epochs=cfg.mpo_epochs, pairs_per_step=cfg.mpo_batch,
        packing=True, max_tokens=cfg.mpo_max_tokens, dtype="fp32", distributed="none",
        seed=cfg.seed, log_every=1, save_every=0, keep_checkpoints=1, progress=False)
    attention = model.config.text_config._attn_implementation
    try:
        result = train(train_cfg, model=model, tokenizer=processor.tokenizer,
                       processor=processor, examples=examples, log=log)
    finally:  # packed attention is for training only: generation needs a KV cache
        model.set_attn_implementation({"text_config": attention})
        model.eval()
    every = max(1, len(result.history) // 6)
    for r in result.history[every - 1::every]:
        log(f"[mpo] step {r['step']}/{len(result.history)} loss {r['loss']:.3f} reward acc "
            f"{r['rewards/accuracies']:.2f} margin {r['rewards/margins']:.3f} "
            f"nll {r['nll_loss']:.3f} lr {r['lr']:.2e}")
    return model


# ---------------------------------------------------------------- the whole thing

def run_miniature(out_dir: str | Path = "runs/pairs-demo",
                  cfg: MiniatureConfig = MiniatureConfig(),
                  train_fn: TrainFn | None = None, log=print) -> dict:
    """Run steps 1-7 of the module docstring; returns (and writes) results.json's content."""
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(Path(out_dir), cfg, train_fn, log)
    finally:
        torch.set_num_threads(threads)


def _run(out: Path, cfg: MiniatureConfig, train_fn: TrainFn | None, log) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    times = {}
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    data = out / "task"
    pair_items = write_split(data, "pairs", cfg.pair_questions, rng, cfg.max_total, cfg.n_colors)
    test_items = write_split(data, "test", cfg.test_questions, rng, cfg.max_total, cfg.n_colors)
    tok = build_tokenizer(task_corpus([cfg.instruction, "user", "assistant"], cfg.max_total,
                                      cfg.n_colors))
    model, processor = build_tiny_vlm(tok, seed=cfg.seed)
    sampling = SamplingConfig(temperature=cfg.temperature, top_k=cfg.top_k,
                              max_new_tokens=cfg.max_new_tokens)
    generator = lambda m: Generator(m, processor, batch_size=cfg.gen_batch, sampling=sampling)
    gen = generator(model)
    log(f"[demo] tiny InternVL: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
        f"parameters, vocab {len(tok)}; {cfg.pair_questions} pair questions, "
        f"{cfg.test_questions} test questions")

    sft_losses = sft_warmup(model, gen, cfg, rng, log)
    times["sft_s"] = time.perf_counter() - t0
    acc = {"before": evaluate(gen, test_items, data, cfg.instruction, cfg.max_new_tokens)}
    log(f"[demo] before MPO: direct {acc['before']['direct']:.1%}, "
        f"CoT {acc['before']['cot']:.1%}")

    t = time.perf_counter()
    pair_cfg = CorrectnessConfig(num_samples=cfg.num_samples, max_pairs=cfg.max_pairs,
                                 seed=cfg.seed, instruction=cfg.instruction)
    pairs_dir = out / "pairs"
    summary = run_correctness(pair_items, gen, pairs_dir, "shapes", config=pair_cfg,
                              image_root=data, log=log)
    times["pairs_s"] = time.perf_counter() - t

    train = train_fn or (lambda m, p, meta, o, c: mpo_trainer(m, p, meta, o, c, log=log))
    runs = [("after", cfg)]
    if cfg.control:  # the same budget, the same start, the SFT term alone on the chosen side
        runs.append(("sft_only", replace(cfg, mpo_loss_types=("sft",), mpo_loss_weights=None)))
    start = copy.deepcopy(model.state_dict())
    for key, run_cfg in runs:
        t = time.perf_counter()
        model.load_state_dict(start)
        log(f"[demo] training: {key} (loss types {list(run_cfg.mpo_loss_types)})")
        trained = train(model, processor, pairs_dir / "meta.json", out / key, run_cfg)
        trained = model if trained is None else trained
        times[f"{key}_train_s"] = time.perf_counter() - t
        acc[key] = evaluate(generator(trained), test_items, data, cfg.instruction,
                            cfg.max_new_tokens)
        log(f"[demo] {key}: direct {acc[key]['direct']:.1%}, CoT {acc[key]['cot']:.1%}")
    times["total_s"] = time.perf_counter() - t0

    result = {"accuracy": acc, "pairs": summary, "times": times,
              "sft_final_loss": sum(sft_losses[-20:]) / max(1, len(sft_losses[-20:])),
              "train_fn": getattr(train_fn, "__name__", "mpo_trainer"), "config": asdict(cfg)}
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    log(_table(result))
    return result


def _table(r: dict) -> str:
    p = r["pairs"]
    names = {"before": "SFT warm-up", "after": "+ MPO", "sft_only": "+ SFT only (control)"}
    lines = [f"[demo] {p.get('pairs', 0)} pairs + {p.get('format_pairs', 0)} format pairs from "
             f"{p.get('samples', 0)} samples (sample accuracy {p['sample_accuracy']:.1%})",
             f"[demo] {'':22s}{'direct':>8s}{'CoT':>8s}"]
    for key, a in r["accuracy"].items():
        lines.append(f"[demo] {names.get(key, key):22s}{a['direct']:>8.1%}{a['cot']:>8.1%}")
    n = r["accuracy"]["before"]["n"]
    lines.append(f"[demo] {n} test questions; wall time {r['times']['total_s']:.0f} s")
    return "\n".join(lines)
