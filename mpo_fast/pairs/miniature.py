"""The method end to end, in miniature, on a CPU: `mpo-fast pairs demo`.

Does MPO beat fine-tuning on the same pairs? Each seed runs:

    1. task      shape counting with a checkable chain of thought (`mpo_fast.pairs.shapes`):
                 the seed's own pair questions; validation and test questions fixed by
                 ``task_seed`` (the same for every seed, so arms and seeds share them)
    2. model     a tiny InternVL built in code (`mpo_fast.pairs.tiny`), random init
    3. warm-up   SFT on reference answers, half direct ("6"), half CoT with right steps
    4. pairs     the correctness pipeline on the warm-up model's own samples, for CoT answers
                 AND for direct answers (`run_correctness`, modes "cot" and "direct"; K samples
                 per question at temperature 0.7), into one meta.json
    5. arms      from the same warm-up weights on the same meta.json, through the trainer
                 (`mpo_fast.train.train`): SFT only; preference only (0.8 DPO + 0.2 BCO);
                 MPO (0.8 DPO + 0.2 BCO + 1.0 SFT); DPO + SFT (1.0 + 1.0); each at every
                 learning rate of the sweep, scored on the VALIDATION split
    6. select    per arm, the learning rate with the best validation score, the same rule for
                 every arm (`select_lr`: mean of direct and CoT accuracy; ties: the smaller
                 rate); the test split is not read until every arm of the seed is chosen
    7. test      the warm-up and each arm's chosen model on the test split: direct accuracy,
                 CoT accuracy, and the rate of right answers reached by right steps
                 (`shapes.check_steps`); per question, into seed-<s>/seed.json

After each seed, the seeds done so far are pooled (`aggregate`) into results.json and results.md:
accuracies with standard errors over questions, paired differences between arms (per question,
averaged over seeds, then the standard error of the mean difference: `paired_se`), each seed's
own difference and the chosen learning rates. A run stopped half way leaves the finished seeds'
results.

Cost (measured on the 2-core VM, torch 2.13, one thread per process): about 6 CPU-minutes a seed
(warm-up 300 steps; 3,840 samples; 12 trainings of about 55 steps; 13 validation and 5 test
evaluations), so the default 3 seeds should take about 18 minutes in one process on an idle
machine (an estimate from the CPU time). Seeds can run side by side, one process each
(``--seeds 0 --out A``, ``--seeds 1 --out B``, ...), then ``--pool A B ... --out C`` pools them
(3 processes at nice 19 on a machine busy with other work: 15 minutes of wall time). ``--seeds``, ``--arms``, ``--lrs``, ``--test-questions`` make it cheaper;
``--quick`` is a smoke test of every stage (about a minute), whose numbers mean nothing.

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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .answers import extract_answer, match_answer
from .correctness import CorrectnessConfig, cot_question, run_correctness
from .generate import Generator, Prompt, SamplingConfig
from .io import load_images
from .shapes import (
    DIRECT_SUFFIX,
    QUESTION,
    check_steps,
    cot_text,
    make_example,
    task_corpus,
    write_split,
)
from .tiny import build_tiny_vlm, build_tokenizer

__all__ = ["ARMS", "Arm", "MiniatureConfig", "TrainSpec", "aggregate", "evaluate",
           "mpo_trainer", "paired_se", "pool_runs", "run_miniature", "select_lr", "sft_warmup"]

IGNORE = -100
MINI_COT_INSTRUCTION = ("{question}\nReason step by step, then end with "
                        "\"Final Answer: <answer>\".")


@dataclass(frozen=True)
class Arm:
    label: str
    loss_types: tuple[str, ...]
    loss_weights: tuple[float, ...]


ARMS = {
    "sft": Arm("SFT only", ("sft",), (1.0,)),
    "pref": Arm("preference only (0.8 DPO + 0.2 BCO)", ("sigmoid", "bco_pair"), (0.8, 0.2)),
    "mpo": Arm("MPO (0.8 DPO + 0.2 BCO + 1.0 SFT)", ("sigmoid", "bco_pair", "sft"),
               (0.8, 0.2, 1.0)),
    "dpo_sft": Arm("DPO + SFT (1.0 + 1.0)", ("sigmoid", "sft"), (1.0, 1.0)),
}
WARMUP = "warmup"  # the row of the warm-up model (before any pair training)
METRICS = ("direct", "cot", "steps")  # direct acc, CoT acc, right answer with right steps


@dataclass(frozen=True)
class MiniatureConfig:
    seeds: tuple[int, ...] = (0, 1, 2)
    task_seed: int = 1000  # the validation and test questions, the same for every seed
    max_total: int = 8  # shapes per image: 1..max_total (scores 1..24)
    n_colors: int = 3  # red, blue, green
    # SFT warm-up (on freshly generated examples, half direct, half CoT)
    sft_steps: int = 300  # a warm-up that is right about half the time: room to improve
    sft_batch: int = 32
    sft_lr: float = 2e-3
    # correctness pairs from the warm-up model's own samples, CoT and direct
    pair_questions: int = 120
    num_samples: int = 16  # K (the paper: 32)
    max_pairs: int = 5  # M per question and mode (the paper: 15; fewer keeps a CPU run short)
    temperature: float = 0.7
    top_k: int = 50
    gen_batch: int = 128
    # the arms and the learning-rate sweep
    arms: tuple[str, ...] = ("sft", "pref", "mpo", "dpo_sft")
    lrs: tuple[float, ...] = (1e-5, 3e-5, 1e-4)  # higher rates scored worse on validation
    epochs: float = 1.0
    pairs_per_step: int = 16
    beta: float = 0.1
    # tokens per packed micro-batch: on a CPU packed attention is dense over the micro-batch
    # (masked), so several small ones beat one big one (the step's loss is the same)
    max_tokens: int = 512
    # evaluation
    val_questions: int = 300
    test_questions: int = 1000
    max_new_tokens: int = 64  # the longest reference CoT is about 50 tokens
    # the CoT instruction (a short one: every token is paid for in every step on a CPU)
    instruction: str = MINI_COT_INSTRUCTION
    threads: int | None = 1  # torch threads (1 is fastest for this size on a shared CPU)
    quick: bool = False  # a smoke test: the results say so

    def __post_init__(self):
        unknown = [a for a in self.arms if a not in ARMS]
        if unknown or not self.arms:
            raise ValueError(f"arms must be among {list(ARMS)}, got {list(self.arms)}")
        if not self.lrs or any(lr <= 0 for lr in self.lrs):
            raise ValueError(f"lrs must be positive, got {list(self.lrs)}")
        if not self.seeds:
            raise ValueError("at least one seed")

    @classmethod
    def quick_config(cls, **overrides) -> MiniatureConfig:
        """A smoke test (about a minute on 2 cores): every stage on a few questions; its
        numbers mean nothing."""
        base = dict(seeds=(0,), sft_steps=100, pair_questions=12, num_samples=8, max_pairs=4,
                    pairs_per_step=2, lrs=(1e-4, 3e-4), val_questions=16, test_questions=24,
                    quick=True)
        return cls(**{**base, **overrides})

    def seed_identity(self) -> dict:
        """What a seed's results depend on (not which seeds are run): seeds pool only when
        this matches."""
        d = asdict(self)
        d.pop("seeds")
        d.pop("threads")
        return d


@dataclass(frozen=True)
class TrainSpec:
    """One training run of one arm at one learning rate."""

    arm: str
    loss_types: tuple[str, ...]
    loss_weights: tuple[float, ...]
    lr: float
    epochs: float
    pairs_per_step: int
    beta: float
    max_tokens: int
    seed: int


TrainFn = Callable[[Any, Any, Path, Path, TrainSpec], Any]


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


def direct_question(q: str = QUESTION) -> str:
    return f"<image>\n{q}\n{DIRECT_SUFFIX}"


def cot_prompt(q: str, instruction: str) -> str:
    return cot_question(f"<image>\n{q}", instruction)


# ---------------------------------------------------------------- SFT warm-up

def sft_warmup(model, gen: Generator, cfg: MiniatureConfig, rng: random.Random,
               log=print) -> list[float]:
    """`cfg.sft_steps` steps of SFT on fresh examples: half direct answers, half CoT with
    right steps (`shapes.cot_text`)."""
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
                rows.append(encode_row(gen, cot_prompt(QUESTION, cfg.instruction), [ex.image],
                                       cot_text(ex.counts)))
            else:
                rows.append(encode_row(gen, direct_question(), [ex.image], str(ex.score)))
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
            log(f"[warm-up] step {step + 1}/{cfg.sft_steps} loss "
                f"{sum(recent) / len(recent):.3f}")
    model.eval()
    return losses


# ---------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(gen: Generator, items: Sequence[dict], root: Path, instruction: str,
             max_new_tokens: int = 64) -> dict:
    """Greedy answers, direct and CoT, per question: ``direct`` / ``cot`` (right answer; CoT
    needs its "Final Answer:" line), ``steps`` (a right CoT answer with right steps,
    `shapes.check_steps`), ``lucky`` (a right CoT answer with a wrong step), ``format`` (no
    readable CoT answer): lists of 0/1 in the order of `items`; with their means under
    ``rates`` and the responses."""
    images = [load_images(it["image"], root) for it in items]
    direct = gen([Prompt(direct_question(it["question"]), im)
                  for it, im in zip(items, images, strict=True)],
                 desc="eval direct", do_sample=False, max_new_tokens=6)
    cot = gen([Prompt(cot_prompt(it["question"], instruction), im)
               for it, im in zip(items, images, strict=True)],
              desc="eval CoT", do_sample=False, max_new_tokens=max_new_tokens)
    out: dict[str, Any] = {k: [] for k in ("direct", "cot", "steps", "lucky", "format")}
    for it, d, c in zip(items, direct, cot, strict=True):
        out["direct"].append(int(match_answer(extract_answer(d, require_trigger=False) or "",
                                              it["answer"])))
        a = extract_answer(c)
        out["cot"].append(int(a is not None and match_answer(a, it["answer"])))
        chk = check_steps(c, it["counts"])
        out["steps"].append(int(chk.steps_ok and out["cot"][-1]))
        out["lucky"].append(int(out["cot"][-1] and not chk.steps_ok))
        out["format"].append(int(a is None))
    n = len(items)
    out["rates"] = {k: sum(out[k]) / n for k in ("direct", "cot", "steps", "lucky", "format")}
    out["n"] = n
    out["responses"] = {"direct": direct, "cot": cot}
    return out


def score(rates: dict) -> float:
    """The validation score every arm's learning rate is chosen by (rounded: equal counts of
    right answers tie whatever the float rounding)."""
    return round((rates["direct"] + rates["cot"]) / 2, 9)


def select_lr(val: dict[float, dict]) -> float:
    """The learning rate whose validation rates score best (`score`); ties: the smaller rate.
    `val` maps each learning rate to its validation ``rates``: nothing else is seen."""
    return min(val, key=lambda lr: (-score(val[lr]), lr))


# ---------------------------------------------------------------- training: the trainer

def mpo_trainer(model, processor, meta_path: Path, out_dir: Path, spec: TrainSpec,
                log=print) -> Any:
    """Train `model` in place with the trainer (`mpo_fast.train.train`) on the MMPR pairs of
    `meta_path`: the loss ``spec.loss_types`` / ``loss_weights`` with ``spec.beta``, the
    reference a frozen copy of the model at the start, AdamW at ``spec.lr`` with the trainer's
    warmup + cosine, ``spec.epochs`` passes of ``spec.pairs_per_step`` pairs per step, packed
    into micro-batches of ``spec.max_tokens``, fp32, one process.
    Into `out_dir`: config.json, metrics.jsonl (every step) and the final checkpoint only."""
    from mpo_fast.data.formats import load_dataset
    from mpo_fast.train import TrainConfig, train

    has_pairs = bool(json.loads(Path(meta_path).read_text()))
    examples = load_dataset(str(meta_path), on_error="raise", seed=spec.seed)[0] \
        if has_pairs else []
    if len(examples) < spec.pairs_per_step:
        log(f"[train] {len(examples)} pairs, fewer than one step of {spec.pairs_per_step}: "
            "nothing to train")
        return model
    train_cfg = TrainConfig(
        model="pairs-miniature (in memory)", data=str(meta_path), output_dir=str(out_dir),
        beta=spec.beta, loss_types=spec.loss_types, loss_weights=spec.loss_weights,
        reference="copy", lr=spec.lr, epochs=spec.epochs, pairs_per_step=spec.pairs_per_step,
        packing=True, max_tokens=spec.max_tokens, dtype="fp32", distributed="none",
        seed=spec.seed, log_every=1, save_every=0, keep_checkpoints=1, progress=False)
    attention = model.config.text_config._attn_implementation
    try:
        result = train(train_cfg, model=model, tokenizer=processor.tokenizer,
                       processor=processor, examples=examples, log=lambda *a, **k: None)
    finally:  # packed attention is for training only: generation needs a KV cache
        model.set_attn_implementation({"text_config": attention})
        model.eval()
    h = result.history
    if h:
        last = h[-max(1, len(h) // 10):]
        mean = lambda k: sum(r.get(k, 0.0) for r in last) / len(last)
        log(f"[train] {spec.arm} lr {spec.lr:g}: {len(h)} steps on {len(examples)} pairs; last "
            f"10%: loss {mean('loss'):.3f} reward acc {mean('rewards/accuracies'):.2f} margin "
            f"{mean('rewards/margins'):.3f} nll {mean('nll_loss'):.3f}")
    return model


# ---------------------------------------------------------------- statistics

def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def _se(xs: Sequence[float]) -> float | None:
    """Standard error of the mean (sample sd / sqrt(n)); None for fewer than 2 values."""
    n = len(xs)
    if n < 2:
        return None
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1) / n)


def paired_se(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]]) -> dict:
    """The difference a - b of two models scored on the same questions in the same seeds.

    a[s][i], b[s][i]: the score (0/1) of each model on question i in seed s. Per question, the
    difference averaged over seeds, d_i; the mean difference is mean_i d_i and its standard
    error sd(d_i) / sqrt(n) (paired: the questions' own difficulty cancels). ``seed_diffs``:
    each seed's mean difference, and ``seed_se`` their standard error (None for one seed):
    how much the training itself varies, which the question SE does not see."""
    if len(a) != len(b) or any(len(x) != len(y) for x, y in zip(a, b, strict=True)):
        raise ValueError("a and b must have the same seeds and questions")
    S, n = len(a), len(a[0])
    d = [sum(a[s][i] - b[s][i] for s in range(S)) / S for i in range(n)]
    seed_diffs = [_mean([x - y for x, y in zip(a[s], b[s], strict=True)]) for s in range(S)]
    return {"diff": _mean(d), "se": _se(d), "seed_diffs": seed_diffs, "seed_se": _se(seed_diffs),
            "n": n, "seeds": S}


def _accuracy(a: Sequence[Sequence[float]]) -> dict:
    """Mean over seeds and questions; SE over questions of the seed-averaged score."""
    S, n = len(a), len(a[0])
    per_q = [sum(a[s][i] for s in range(S)) / S for i in range(n)]
    return {"mean": _mean(per_q), "se": _se(per_q), "seeds": [_mean(x) for x in a]}


def aggregate(seed_results: Sequence[dict]) -> dict:
    """Pool the seeds' test results (each `seed.json`'s content): per model and metric the
    accuracy with its SE; per pair of models the paired difference (`paired_se`); the chosen
    learning rates."""
    if not seed_results:
        raise ValueError("no seeds to aggregate")
    models = [m for m in [WARMUP, *ARMS] if all(m in r["test"] for r in seed_results)]
    ids = seed_results[0]["test_ids"]
    if any(r["test_ids"] != ids for r in seed_results):
        raise ValueError("the seeds were tested on different questions")
    acc = {m: {k: _accuracy([r["test"][m][k] for r in seed_results]) for k in
               (*METRICS, "lucky", "format")} for m in models}
    diffs = {}
    for i, m in enumerate(models):
        for base in models[:i]:
            diffs[f"{m} - {base}"] = {k: paired_se([r["test"][m][k] for r in seed_results],
                                                   [r["test"][base][k] for r in seed_results])
                                      for k in METRICS}
    validation = {}
    for r in seed_results:
        for arm, by_lr in r.get("validation", {}).items():
            for lr, rates in by_lr.items():
                validation.setdefault(arm, {}).setdefault(lr, []).append(rates)
        if "validation_warmup" in r:
            validation.setdefault(WARMUP, {}).setdefault("-", []).append(r["validation_warmup"])
    validation = {arm: {lr: {k: _mean([x[k] for x in v]) for k in METRICS} | {"seeds": len(v)}
                        for lr, v in by_lr.items()} for arm, by_lr in validation.items()}
    return {"seeds": [r["seed"] for r in seed_results], "n": len(ids), "models": models,
            "accuracy": acc, "differences": diffs, "validation": validation,
            "chosen_lr": {m: [r["chosen_lr"][m] for r in seed_results] for m in models
                          if m != WARMUP},
            "pairs": {str(r["seed"]): r["pairs"] for r in seed_results},
            "times": {str(r["seed"]): r["times"] for r in seed_results}}


def _pct(x: float | None, sign: bool = False) -> str:
    if x is None:
        return "n/a"
    return f"{100 * x:+.1f}" if sign else f"{100 * x:.1f}"


def markdown(agg: dict, cfg: MiniatureConfig, wall_s: float | None = None) -> str:
    """The results as markdown tables (accuracy in %, +- one standard error)."""
    label = lambda m: "SFT warm-up (start of every arm)" if m == WARMUP else ARMS[m].label
    lines = []
    if cfg.quick:
        lines += ["**--quick: a smoke test. These numbers say nothing about the method.**", ""]
    seeds = agg["seeds"]
    lines += [f"Seeds {seeds}; n = {agg['n']} test questions (the same for every seed and "
              f"arm); learning rates swept: {list(cfg.lrs)}, chosen per arm and seed on "
              f"{cfg.val_questions} validation questions by mean(direct, CoT) accuracy.", "",
              "| model | direct | CoT | right answer, right steps | lucky CoT answers | "
              "chosen lr per seed |", "|---|---|---|---|---|---|"]
    for m in agg["models"]:
        a = agg["accuracy"][m]
        cells = [f"{_pct(a[k]['mean'])} ± {_pct(a[k]['se'])}" for k in (*METRICS, "lucky")]
        lrs = "-" if m == WARMUP else ", ".join(f"{x:g}" for x in agg["chosen_lr"][m])
        lines.append(f"| {label(m)} | " + " | ".join(cells) + f" | {lrs} |")
    lines += ["", "Paired differences (percentage points, per question averaged over seeds, "
              "± one paired SE over questions; in brackets each seed's own difference):", "",
              "| difference | direct | CoT | right answer, right steps |", "|---|---|---|---|"]
    short = {WARMUP: "warm-up", **{k: ARMS[k].label.split(" (")[0] for k in ARMS}}
    for key, d in agg["differences"].items():
        m, base = key.split(" - ")
        if not (base in (WARMUP, "sft") or (m == "mpo" and base in ("pref", "dpo_sft"))):
            continue
        cells = []
        for k in METRICS:
            x = d[k]
            per_seed = ", ".join(_pct(v, True) for v in x["seed_diffs"])
            cells.append(f"{_pct(x['diff'], True)} ± {_pct(x['se'])} [{per_seed}]")
        lines.append(f"| {short[m]} - {short[base]} | " + " | ".join(cells) + " |")
    if agg.get("validation"):
        lines += ["", f"Validation ({cfg.val_questions} questions, mean over seeds), direct / "
                  "CoT accuracy per learning rate:", "",
                  "| model | " + " | ".join(f"lr {lr:g}" for lr in cfg.lrs) + " |",
                  "|---|" + "---|" * len(cfg.lrs)]
        for m, by_lr in sorted(agg["validation"].items(), key=lambda kv: kv[0] != WARMUP):
            if m == WARMUP:
                v = by_lr["-"]
                lines.append(f"| {label(m)} (no training) | {_pct(v['direct'])} / "
                             f"{_pct(v['cot'])} |" + " |" * (len(cfg.lrs) - 1))
                continue
            cells = [f"{_pct(by_lr[f'{lr:g}']['direct'])} / {_pct(by_lr[f'{lr:g}']['cot'])}"
                     if f"{lr:g}" in by_lr else "-" for lr in cfg.lrs]
            lines.append(f"| {label(m)} | " + " | ".join(cells) + " |")
    pairs = agg["pairs"]
    lines += ["", "Pairs per seed (CoT + direct + CoT format): " + "; ".join(
        f"seed {s}: {p['cot']['pairs']} + {p['direct']['pairs']} + {p['cot']['format_pairs']} "
        f"(sample accuracy CoT {_pct(p['cot']['sample_accuracy'])}%, direct "
        f"{_pct(p['direct']['sample_accuracy'])}%; right steps among right CoT samples "
        f"{_pct(p['cot_chosen_steps_ok'])}%)".replace("n/a%", "n/a") for s, p in pairs.items())]
    if wall_s is not None:
        lines += ["", f"Wall time {wall_s / 60:.1f} min ({len(seeds)} seeds)."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the whole thing

def run_miniature(out_dir: str | Path = "runs/pairs-demo",
                  cfg: MiniatureConfig = MiniatureConfig(),
                  train_fn: TrainFn | None = None, log=print) -> dict:
    """Run every seed of `cfg` (the module docstring); returns (and writes) the pooled results
    (results.json, results.md in `out_dir`)."""
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(Path(out_dir), cfg, train_fn, log)
    finally:
        torch.set_num_threads(threads)


@dataclass
class _Task:
    root: Path
    cfg: MiniatureConfig
    _val: list[dict] | None = None
    _test: list[dict] | None = None
    reads: list[str] = field(default_factory=list)  # "val" / "test", in the order read

    def _split(self, name: str, n: int, salt: int) -> list[dict]:
        rng = random.Random(f"{self.cfg.task_seed}:{salt}")
        return write_split(self.root, name, n, rng, self.cfg.max_total, self.cfg.n_colors)

    def val(self) -> list[dict]:
        self.reads.append("val")
        if self._val is None:
            self._val = self._split("val", self.cfg.val_questions, 1)
        return self._val

    def test(self) -> list[dict]:
        self.reads.append("test")
        if self._test is None:
            self._test = self._split("test", self.cfg.test_questions, 2)
        return self._test


def _run(out: Path, cfg: MiniatureConfig, train_fn: TrainFn | None, log) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    task = _Task(out / "task", cfg)
    train = train_fn or (lambda m, p, meta, o, spec: mpo_trainer(m, p, meta, o, spec, log=log))
    tag = " (--quick: a smoke test)" if cfg.quick else ""
    log(f"[demo] {len(cfg.seeds)} seeds x {len(cfg.arms)} arms x {len(cfg.lrs)} learning rates"
        f"{tag}; {cfg.val_questions} validation and {cfg.test_questions} test questions")
    for seed in cfg.seeds:
        result = run_seed(out, cfg, seed, task, train, train_fn, log)
        (out / f"seed-{seed}" / "seed.json").write_text(json.dumps(result) + "\n")
        summary = _pool(out, cfg, time.perf_counter() - t0)
        log(summary["markdown"])
    return summary


def _pool(out: Path, cfg: MiniatureConfig, wall_s: float | None,
          sources: Sequence[Path] = ()) -> dict:
    """Pool every finished seed in `out` (and in `sources`) run with the same configuration,
    write results.json and results.md into `out`."""
    ident = json.loads(json.dumps(cfg.seed_identity()))
    found: dict[int, dict] = {}
    for folder in (out, *sources):
        for path in sorted(Path(folder).glob("seed-*/seed.json")):
            r = json.loads(path.read_text())
            if r["identity"] == ident and all(m in r["test"] for m in cfg.arms):
                found.setdefault(r["seed"], r)
    agg = aggregate([found[s] for s in sorted(found)])
    agg["config"] = ident
    agg["quick"] = cfg.quick
    agg["wall_s_this_process"] = wall_s
    md = markdown(agg, cfg, wall_s)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(agg, indent=2) + "\n")
    (out / "results.md").write_text(md)
    return {**agg, "markdown": md}


def pool_runs(out_dir: str | Path, sources: Sequence[str | Path], log=print) -> dict:
    """Pool the finished seeds of several runs of one configuration (e.g. one process per seed,
    ``--seeds 0 --out A``, ``--seeds 1 --out B``) into out_dir/results.json and results.md;
    runs nothing. The configuration is read from the first seed found."""
    first = next((json.loads(p.read_text()) for d in sources
                  for p in sorted(Path(d).glob("seed-*/seed.json"))), None)
    if first is None:
        raise ValueError(f"no finished seed (seed-*/seed.json) in {[str(d) for d in sources]}")
    ident = {k: tuple(v) if isinstance(v, list) else v for k, v in first["identity"].items()}
    seeds = sorted({json.loads(p.read_text())["seed"] for d in sources
                    for p in Path(d).glob("seed-*/seed.json")})
    cfg = MiniatureConfig(seeds=tuple(seeds), **ident)
    summary = _pool(Path(out_dir), cfg, None, [Path(d) for d in sources])
    log(summary["markdown"])
    return summary


def run_seed(out: Path, cfg: MiniatureConfig, seed: int, task: _Task, train: TrainFn,
             train_fn: TrainFn | None = None, log=print) -> dict:
    """One seed: warm-up, pairs (CoT and direct), every arm at every learning rate scored on
    validation, the choice, then the test split. Returns seed.json's content."""
    sdir = out / f"seed-{seed}"
    sdir.mkdir(parents=True, exist_ok=True)
    times: dict[str, Any] = {}
    t = time.perf_counter()
    torch.manual_seed(seed)
    rng = random.Random(seed)
    pair_items = write_split(sdir / "task", "pairs", cfg.pair_questions, rng, cfg.max_total,
                             cfg.n_colors)
    tok = build_tokenizer(task_corpus([cfg.instruction, "user", "assistant"], cfg.max_total,
                                      cfg.n_colors))
    model, processor = build_tiny_vlm(tok, seed=seed)
    sampling = SamplingConfig(temperature=cfg.temperature, top_k=cfg.top_k,
                              max_new_tokens=cfg.max_new_tokens)
    gen = Generator(model, processor, batch_size=cfg.gen_batch, sampling=sampling,
                    progress=False)
    log(f"[seed {seed}] tiny InternVL: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
        f"parameters, vocab {len(tok)}")
    sft_losses = sft_warmup(model, gen, cfg, rng, log)
    times["warmup_s"] = time.perf_counter() - t

    t = time.perf_counter()
    pairs_dir = sdir / "pairs"
    pairs = {}
    for mode in ("cot", "direct"):
        pc = CorrectnessConfig(num_samples=cfg.num_samples, max_pairs=cfg.max_pairs, seed=seed,
                               instruction=cfg.instruction, mode=mode)
        items = [{**it, "question": it["question"] if mode == "cot"
                  else f"{it['question']}\n{DIRECT_SUFFIX}"} for it in pair_items]
        pairs[mode] = run_correctness(items, gen, pairs_dir, f"shapes_{mode}", config=pc,
                                      image_root=sdir / "task", log=log)
    pairs["cot_chosen_steps_ok"] = _chosen_steps_ok(pairs_dir / "shapes_cot.samples.jsonl",
                                                    pair_items)
    times["pairs_s"] = time.perf_counter() - t
    meta = pairs_dir / "meta.json"

    start = copy.deepcopy(model.state_dict())
    val_items = task.val()
    val: dict[str, dict[float, dict]] = {}
    states: dict[tuple[str, float], dict] = {}
    times["train_s"], times["val_eval_s"] = {}, {}
    val_warmup = evaluate(gen, val_items, task.root, cfg.instruction, cfg.max_new_tokens)["rates"]
    log(f"[seed {seed}] warm-up: validation direct {val_warmup['direct']:.1%} CoT "
        f"{val_warmup['cot']:.1%} right steps {val_warmup['steps']:.1%} (for reference: not a "
        "candidate)")
    for arm in cfg.arms:
        val[arm] = {}
        for lr in cfg.lrs:
            t = time.perf_counter()
            model.load_state_dict(start)
            spec = TrainSpec(arm, ARMS[arm].loss_types, ARMS[arm].loss_weights, lr, cfg.epochs,
                             cfg.pairs_per_step, cfg.beta, cfg.max_tokens, seed)
            trained = train(model, processor, meta, sdir / "train" / f"{arm}-lr{lr:g}", spec)
            trained = model if trained is None else trained
            times["train_s"][f"{arm}@{lr:g}"] = time.perf_counter() - t
            t = time.perf_counter()
            r = evaluate(Generator(trained, processor, batch_size=cfg.gen_batch,
                                   progress=False), val_items, task.root, cfg.instruction,
                         cfg.max_new_tokens)
            times["val_eval_s"][f"{arm}@{lr:g}"] = time.perf_counter() - t
            val[arm][lr] = r["rates"]
            states[arm, lr] = copy.deepcopy(trained.state_dict())
            log(f"[seed {seed}] {arm} lr {lr:g}: validation direct {r['rates']['direct']:.1%} "
                f"CoT {r['rates']['cot']:.1%} right steps {r['rates']['steps']:.1%}")
    chosen = {arm: select_lr({lr: dict(v) for lr, v in val[arm].items()}) for arm in cfg.arms}
    log(f"[seed {seed}] chosen on validation: " + ", ".join(f"{a} {lr:g}"
                                                            for a, lr in chosen.items()))

    # the test split: read only now, after every arm's learning rate is chosen
    test_items = task.test()
    test = {}
    t = time.perf_counter()
    for name, state in [(WARMUP, start), *[(a, states[a, chosen[a]]) for a in cfg.arms]]:
        model.load_state_dict(state)
        model.eval()
        r = evaluate(Generator(model, processor, batch_size=cfg.gen_batch, progress=False),
                     test_items, task.root, cfg.instruction, cfg.max_new_tokens)
        test[name] = {k: r[k] for k in ("direct", "cot", "steps", "lucky", "format")}
        test[name]["examples"] = {k: v[:5] for k, v in r["responses"].items()}
        log(f"[seed {seed}] test {name}: direct {r['rates']['direct']:.1%} CoT "
            f"{r['rates']['cot']:.1%} right steps {r['rates']['steps']:.1%} lucky "
            f"{r['rates']['lucky']:.1%}")
    times["test_eval_s"] = time.perf_counter() - t
    return {"seed": seed, "identity": cfg.seed_identity(), "test_ids": [it["id"] for it in
                                                                        test_items],
            "test": test, "validation": {a: {f"{lr:g}": v for lr, v in d.items()}
                                         for a, d in val.items()},
            "validation_warmup": val_warmup,
            "chosen_lr": chosen, "pairs": pairs, "times": times,
            "warmup_final_loss": _mean(sft_losses[-20:]) if sft_losses else None,
            "train_fn": getattr(train_fn, "__name__", "mpo_trainer")}


def _chosen_steps_ok(samples_path: Path, items: Sequence[dict]) -> float | None:
    """Of the right CoT samples (the chosen side's pool), the fraction with right steps."""
    counts = {it["id"]: it["counts"] for it in items}
    ok = right = 0
    if not samples_path.exists():
        return None
    for line in samples_path.read_text().splitlines():
        s = json.loads(line)
        if s["correct"]:
            right += 1
            ok += check_steps(s["response"], counts[s["id"]]).steps_ok
    return ok / right if right else None

