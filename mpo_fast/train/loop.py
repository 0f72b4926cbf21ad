"""The MPO training loop, top to bottom (DESIGN.md §5). One process or many (torchrun).

Every optimizer step trains on ``pairs_per_step`` whole preference pairs (the global batch,
dealt round-robin to the processes). Each process groups its pairs into packed micro-batches
under ``max_tokens`` (the planner), runs them with gradient accumulation, and the step's loss is
exactly the loss of the whole global batch, however it was split:

    L = sum_k w_k * mean over the step's pairs (loss_k)      (sigmoid, bco_pair, ...)
      + w_sft * mean over the step's pairs (-c_i / L_c_i)    (sft_normalize="sequence")
      or w_sft * (-(sum of chosen completion log-probs) / (chosen tokens in the step)) ("token")

A micro-batch contributes J = (its pairs / step pairs) * (its MPOLoss), exact for every
per-pair term and for the per-sequence SFT term; with "token" its SFT term is swapped for
w_sft * (-(its chosen log-probs) / step chosen tokens), differentiable through
``out.chosen_logps``. Backward on J * world (DDP and FSDP2 average over processes).

The policy is an `MPOModel` (backbone + LM head + fused loss in one forward) wrapped by DDP or
FSDP2; the reference a frozen copy, a disk cache, or the adapter-disabled PEFT policy.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field

import torch

from ..data.collate import PairTokenizer, collate, micro_batches, step_pairs
from ..data.formats import DataError
from ..mpo import MPOLoss
from . import checkpoint, distributed, reference
from .config import TrainConfig
from .model import (
    MPOModel,
    backbone,
    check_packable,
    enable_checkpointing,
    load,
    logit_softcap,
    set_attention,
)

__all__ = ["Result", "train"]


@dataclass
class Result:
    history: list[dict] = field(default_factory=list)  # the logged records, in order
    step: int = 0  # optimizer steps done (the data position)
    output_dir: str = ""
    checkpoint: str | None = None  # the last checkpoint written
    stopped_by: int | None = None  # the signal that ended the run early, if any
    model: torch.nn.Module | None = None  # the trained Hugging Face model (unwrapped)
    loss_fn: MPOLoss | None = None


def train(cfg: TrainConfig, *, model=None, tokenizer=None, processor=None, examples=None,
          log=print) -> Result:
    """Train ``cfg.model`` on ``cfg.data`` (or the given model / tokenizer / examples)."""
    # ------------------------------------------------------------- processes and output
    ctx = distributed.setup(cfg.distributed)
    say = log if ctx.main else (lambda *a, **k: None)
    out_dir = distributed.broadcast(cfg.output_dir or default_output_dir(), ctx)
    torch.manual_seed(cfg.seed)  # the same initial weights on every process
    amp = torch.bfloat16 if cfg.dtype == "bf16" or (
        cfg.dtype == "auto" and ctx.device.type == "cuda") else None
    autocast = lambda: torch.autocast(ctx.device.type, dtype=amp, enabled=amp is not None)

    # ------------------------------------------------------------- model and data
    if model is None:
        model, tokenizer, processor = load(cfg.model, cfg.seed)
    if examples is None:
        examples = load_examples(cfg, say)
    tokenize = PairTokenizer(tokenizer, processor, max_length=cfg.max_length)
    set_attention(model, cfg.packing)
    if cfg.packing:
        check_packable(model)
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    if cfg.freeze_vision:
        backbone(model).vision_tower.requires_grad_(False)
    model.to(ctx.device).train()
    ref = reference.make(cfg, model, examples, tokenize, ctx, out_dir, autocast, amp)
    loss_fn = MPOLoss(cfg.beta, cfg.loss_types, cfg.loss_weights, cfg.label_smoothing,
                      cfg.bco_delta, softcap=logit_softcap(model),
                      sft_normalize=cfg.sft_normalize)
    policy = distributed.wrap(MPOModel(model, loss_fn, amp).to(ctx.device), ctx)

    # ------------------------------------------------------------- optimizer and schedule
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
         {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
        lr=cfg.lr, betas=cfg.adam_betas)
    total = cfg.max_steps or max(1, int(cfg.epochs * (len(examples) // cfg.pairs_per_step)))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, total))

    # ------------------------------------------------------------- resume
    ckpt_dir = os.path.join(out_dir, "checkpoints")
    step, result = 0, Result(output_dir=out_dir, model=model, loss_fn=loss_fn)
    start = checkpoint.latest(ckpt_dir) if cfg.resume == "auto" else cfg.resume or None
    if not cfg.resume and checkpoint.latest(ckpt_dir):
        raise ValueError(f"{out_dir} already has checkpoints: resume with --resume auto, or "
                         "train into a new --output-dir")
    if start:
        step = checkpoint.load(start, policy=distributed.unwrap(policy), optimizer=optimizer,
                               scheduler=scheduler, ctx=ctx)["step"]
        say(f"resumed from {start} at step {step}")
    if ctx.main:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
            json.dump(cfg.to_dict(), f, indent=1)
    metrics_file = open(os.path.join(out_dir, "metrics.jsonl"), "a") if ctx.main else None
    bad: set[int] = set()
    bar = progress_bar(cfg, ctx, total, step)

    # ------------------------------------------------------------- the loop
    with checkpoint.StopSignal() as stop:
        while step < total:
            t0 = time.perf_counter()
            ids = step_pairs(step, len(examples), cfg.pairs_per_step, cfg.seed, ctx.rank,
                             ctx.world)
            pairs = [p for p in (tokenize_pair(tokenize, examples, i, cfg, bad, say)
                                 for i in ids) if p is not None]
            groups = micro_batches(pairs, cfg.max_tokens)
            chosen = sum(len(p.chosen) - (0 if p.prompt else 1) for p in pairs)
            count, n_pairs, n_chosen, stopping = distributed.agree(
                ctx, len(groups), len(pairs), chosen, stop.requested)
            groups = micro_batches(pairs, cfg.max_tokens, count=count)
            sums, tokens, processed = None, 0, 0
            for k, group in enumerate(groups):
                batch = collate([pairs[i] for i in group], pad_id=tokenize.pad_id,
                                packed=cfg.packing).to(ctx.device)
                ref_logps = ref.logps(batch) if ref is not None else None
                with distributed.sync_grads(policy, ctx, k == len(groups) - 1), autocast():
                    out = policy(batch, ref_logps)
                J = objective(out, batch, n_pairs, n_chosen, loss_fn)
                (J * ctx.world).backward()
                frac = batch.num_pairs / n_pairs
                row = torch.stack([J.detach(), *(frac * v.float() for v in out.metrics.values())])
                sums = row if sums is None else sums + row
                tokens += batch.num_tokens
                processed += batch.num_tokens if batch.packed else batch.padded_tokens
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            # --------------------------------------------------------- log
            if step % cfg.log_every == 0 or step == total or stopping:
                totals = distributed.all_sum(torch.cat([sums.double().cpu(), torch.tensor(
                    [tokens, processed], dtype=torch.float64)]).to(ctx.device), ctx).tolist()
                dt = time.perf_counter() - t0
                record = {"step": step, "loss": totals[0],
                          **dict(zip(out.metrics, totals[1:-2], strict=True)),
                          "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                          "tokens_per_s": totals[-2] / dt,
                          "padding_fraction": 1 - totals[-2] / max(totals[-1], 1),
                          "peak_mem_mib": peak_memory_mib(ctx.device), "pairs": n_pairs,
                          "micro_batches": count, "step_time_s": dt}
                result.history.append(record)
                if metrics_file:
                    metrics_file.write(json.dumps(record) + "\n")
                    metrics_file.flush()
                if bar is not None:
                    bar.set_postfix({k: f"{record[k]:.3g}" for k in (
                        "loss", "rewards/accuracies", "tokens_per_s") if k in record})
                elif ctx.main:  # no bar (--no-progress, a log file): one line per record
                    print(log_line(cfg, record, total), flush=True)
            if bar is not None:
                bar.update(1)

            # --------------------------------------------------------- checkpoint
            if stopping or step == total or (cfg.save_every and step % cfg.save_every == 0):
                result.checkpoint = checkpoint.save(
                    ckpt_dir, step, policy=distributed.unwrap(policy), optimizer=optimizer,
                    scheduler=scheduler, ctx=ctx, config=getattr(model, "config", None),
                    keep=cfg.keep_checkpoints,
                    state={"pairs_seen": step * cfg.pairs_per_step, "bad_pairs": len(bad),
                           "config": cfg.to_dict()})
            if stopping:
                result.stopped_by = stop.signum or -1
                say(f"\nstopped by a signal at step {step}; checkpoint {result.checkpoint}")
                break
    if bar is not None:
        bar.close()
    if metrics_file:
        metrics_file.close()
    if bad:
        say(f"skipped {len(bad)} bad pairs while training")
    result.step = step
    distributed.teardown(ctx)
    return result


def objective(out, batch, step_pairs_total: int, step_chosen_total: int, loss_fn: MPOLoss):
    """This micro-batch's share J of the step's loss (see the module docstring): the sum of
    the step's J over micro-batches and processes is the loss of the step's whole batch."""
    frac = batch.num_pairs / step_pairs_total
    J = frac * out.loss
    cfg = loss_fn.loss_config
    if "sft" in cfg.loss_types and cfg.sft_normalize == "token":
        w = cfg.loss_weights[cfg.loss_types.index("sft")]
        c = out.chosen_logps.sum()
        J = J + w * (frac * c / max(batch.chosen_tokens, 1) - c / max(step_chosen_total, 1))
    return J


def lr_factor(cfg: TrainConfig, total: int):
    """Linear warmup over warmup_ratio of the steps, then cosine to min_lr_ratio (or flat)."""
    warmup = math.ceil(cfg.warmup_ratio * total)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.lr_schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine

    return factor


def load_examples(cfg: TrainConfig, say) -> list:
    """The training pairs: the bundled task for "tiny", else MMPR / HF preference files."""
    if cfg.data == "tiny":
        from ..data import tiny

        return tiny.make_task(tiny.TRAIN_PAIRS, seed=cfg.seed + 1)
    from ..data.formats import load_dataset

    examples, report = load_dataset(cfg.data, on_error=cfg.on_bad_data, seed=cfg.seed,
                                    allow_outside_root=cfg.allow_outside_root)
    say(f"data: {report.summary()}")
    return examples


def tokenize_pair(tokenize: PairTokenizer, examples, i: int, cfg: TrainConfig, bad: set, say):
    """Tokenize pair i; a bad one (e.g. truncation through image tokens) is skipped and
    reported once (on_bad_data="skip"), or raised."""
    if i in bad:
        return None
    try:
        return tokenize(examples[i], i)
    except DataError as err:
        if cfg.on_bad_data == "raise":
            raise
        bad.add(i)
        say(f"skipping bad pair: {err}")
        return None


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory so far: the CUDA allocator's on GPU, the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def progress_bar(cfg: TrainConfig, ctx, total: int, step: int):
    if not (cfg.progress and ctx.main):
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    import sys

    tty = sys.stderr.isatty()  # in a log file, a line every 15 s instead of every redraw
    return tqdm(total=total, initial=step, desc=run_name(cfg), unit="step", dynamic_ncols=True,
                mininterval=0.5 if tty else 15.0)


def run_name(cfg: TrainConfig) -> str:
    """"mpo" for the paper's three losses, else the losses trained ("sft" for a warm-up)."""
    mpo = ("sigmoid", "bco_pair", "sft")
    return "mpo" if tuple(cfg.loss_types) == mpo else "+".join(cfg.loss_types)


def log_line(cfg: TrainConfig, record: dict, total: int) -> str:
    """One metrics record as a line of text, for runs without a progress bar."""
    shown = [f"{key} {record[key]:.4g}" for key in (
        "loss", "rewards/accuracies", "rewards/margins", "nll_loss", "lr", "tokens_per_s")
        if key in record]
    return f"{run_name(cfg)} step {record['step']}/{total}: " + ", ".join(shown)


def default_output_dir() -> str:
    return os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
