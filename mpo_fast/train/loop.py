"""The MPO training loop, top to bottom (DESIGN.md §5). One process or many (torchrun).

Every optimizer step trains on ``pairs_per_step`` whole preference pairs (the global batch,
dealt round-robin to the processes). Each process groups its pairs into packed micro-batches
under ``max_tokens`` (the planner), runs them with gradient accumulation, and the step's loss is
exactly the loss of the whole global batch, however it was split:

    L = sum_k w_k * mean over the step's pairs (loss_k)      (sigmoid, bco_pair, ...)
      + w_sft * mean over the step's pairs (-c_i / L_c_i)    (sft_normalize="sequence")
      or w_sft * (-(sum of chosen completion log-probs) / (chosen tokens in the step)) ("token")

A micro-batch contributes J = (its pairs / step pairs) * (its MPOLoss), exact for every
per-pair term and for the per-sequence SFT term; with "token" the loss is given its SFT
denominator from outside (``MPOLoss(..., sft_tokens=)``: (its pairs / step pairs) * the step's
chosen tokens), so the loss never has to be undone and redone. Backward on J * world (DDP and
FSDP2 average over processes).

The policy is an `MPOModel` (backbone + LM head + fused loss in one forward) wrapped by DDP or
FSDP2 (with ``lora_r``, a PEFT LoRA model: lora.py); the reference a frozen copy, a disk cache,
or the adapter-disabled PEFT policy (TR-DPO, ``ref_sync_every``: the copy is moved towards the
policy every N steps, `reference.sync`, and checkpointed). Held-out pairs are scored every
``eval_every`` steps and at the end (evaluate.py), every record also goes to the ``report_to``
trackers (report.py), and the run ends with ``<output_dir>/final`` (export.py).
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
import time
from dataclasses import dataclass, field

import torch

from ..console import RunError
from ..data.collate import PairTokenizer, collate, micro_batches, step_pairs
from ..data.formats import DataError
from ..measure import peak_bytes
from ..mpo import MPOLoss
from . import checkpoint, distributed, evaluate, export, lora, reference, report
from .config import TrainConfig, identity_changes
from .model import (
    MPOModel,
    backbone,
    check_packable,
    enable_checkpointing,
    load,
    logit_softcap,
    set_attention,
)

__all__ = ["NonFiniteError", "Result", "train"]


@dataclass
class Result:
    history: list[dict] = field(default_factory=list)  # the logged records, in order
    step: int = 0  # optimizer steps done (the data position)
    output_dir: str = ""
    checkpoint: str | None = None  # the last checkpoint written
    final: str | None = None  # <output_dir>/final: the trained model, tokenizer, generation config
    stopped_by: int | None = None  # the signal that ended the run early, if any
    model: torch.nn.Module | None = None  # the trained Hugging Face model (unwrapped)
    loss_fn: MPOLoss | None = None
    skipped_nonfinite: int = 0  # steps not applied: non-finite loss or gradient
    skipped_empty: int = 0  # steps not applied: every pair of the step was bad data


def train(cfg: TrainConfig, *, model=None, tokenizer=None, processor=None, examples=None,
          log=print) -> Result:
    """Train ``cfg.model`` on ``cfg.data`` (or the given model / tokenizer / examples), holding
    the output folder's lock throughout (one run writes a folder at a time)."""
    ctx = distributed.setup(cfg.distributed)
    say = log if ctx.main else (lambda *a, **k: None)
    out_dir = distributed.broadcast(cfg.output_dir or default_output_dir(), ctx)
    lock = lock_output(out_dir, ctx, say)
    try:
        return _train(cfg, ctx, say, out_dir, model, tokenizer, processor, examples)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: TrainConfig, ctx, say, out_dir: str, model, tokenizer, processor,
           examples) -> Result:
    torch.manual_seed(cfg.seed)  # the same initial weights on every process
    amp = torch.bfloat16 if cfg.dtype == "bf16" or (
        cfg.dtype == "auto" and ctx.device.type == "cuda") else None
    autocast = lambda: torch.autocast(ctx.device.type, dtype=amp, enabled=amp is not None)

    # ------------------------------------------------------------- model and data
    if model is None:
        model, tokenizer, processor = load(
            cfg.model, cfg.seed, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision,
            torch_dtype=cfg.torch_dtype, attn_implementation=cfg.attn_implementation,
            chat_template=cfg.chat_template)
    if examples is None:
        examples = load_examples(cfg, say)
    tokenize = PairTokenizer(tokenizer, processor, max_length=cfg.max_length)
    set_attention(model, cfg.packing, cfg.attn_implementation)
    if cfg.packing:
        check_packable(model)
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    if cfg.freeze_vision:
        backbone(model).vision_tower.requires_grad_(False)
    if cfg.lora_r:  # only the adapters train; the reference is the adapter-disabled policy
        if ctx.mode == "fsdp":
            raise ValueError("LoRA (--lora-r) is not supported with FSDP; use DDP")
        model = lora.wrap(model, cfg)
    model.to(ctx.device).train()
    ref = reference.make(cfg, model, examples, tokenize, ctx, out_dir, autocast, amp)
    loss_fn = MPOLoss(cfg.beta, cfg.loss_types, cfg.loss_weights, cfg.label_smoothing,
                      cfg.bco_delta, softcap=logit_softcap(model),
                      sft_normalize=cfg.sft_normalize, backend=cfg.backend)
    policy = distributed.wrap(MPOModel(model, loss_fn, amp).to(ctx.device), ctx)
    held_out = evaluate.held_out(cfg, model, tokenize, ctx, out_dir, autocast, amp, ref, say)

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
    result = Result(output_dir=out_dir, model=model, loss_fn=loss_fn)
    if not cfg.resume and checkpoint.latest(ckpt_dir):
        raise ValueError(f"{out_dir} already has checkpoints: resume with --resume auto, or "
                         "train into a new --output-dir")
    # the reference copy's weights go into checkpoints once TR-DPO syncing moves them
    ref_model = reference.synced_weights(ref) if ctx.mode != "fsdp" else None
    state = resume(cfg, ckpt_dir, distributed.unwrap(policy), optimizer, scheduler, ctx, say,
                   ref_model)
    if state.get("reference_saved") and not state.get("reference_loaded"):
        say(f"warning: {state['path']} holds a synced reference (ref_sync_every) that this "
            f"run's reference ({cfg.reference}) cannot take: it is the initial model again")
    save_ref = ref_model if cfg.ref_sync_every or state.get("reference_loaded") else None
    step = saved = state.get("step", 0)
    result.checkpoint = state.get("path")
    skipped = {"nonfinite": state.get("skipped_nonfinite", 0),
               "empty": state.get("skipped_empty", 0)}
    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    if ctx.main:
        write_run_record(cfg, out_dir, state.get("path"))
        trim_metrics(metrics_path, step)
    metrics_file = open(metrics_path, "a") if ctx.main else None
    bad: set[int] = set()
    bar = progress_bar(cfg, ctx, total, step)
    best = evaluate.Best(cfg, state.get("best"))
    trackers = report.Reporter(cfg, out_dir, step, ctx.main)  # --report-to

    def write_record(record: dict) -> None:
        result.history.append(record)
        if metrics_file:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
        trackers.log(record)

    def run_state() -> dict:  # trainer_state.json: ours, and the HF Trainer's names
        return export.trainer_state(
            step, total, result.history, cfg.pairs_per_step, len(examples),
            best=best.state, pairs_seen=step * cfg.pairs_per_step, bad_pairs=len(bad),
            skipped_nonfinite=skipped["nonfinite"], skipped_empty=skipped["empty"],
            config=cfg.to_dict())

    def save_checkpoint() -> str:
        return checkpoint.save(
            ckpt_dir, step, policy=distributed.unwrap(policy), optimizer=optimizer,
            scheduler=scheduler, ctx=ctx, config=getattr(model, "config", None),
            keep=cfg.keep_checkpoints, state=run_state(), reference=save_ref,
            files=lambda folder: export.write_model_files(folder, model, tokenizer, processor))

    # ------------------------------------------------------------- the loop
    nonfinite_in_a_row, stopping = 0, False
    with checkpoint.StopSignal(cfg.stop_signals) as stop:
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
            if stopping:
                break
            # what a step that does not count must leave as it was: the BCO running mean
            # (updated inside every forward) and, for a stop mid-step, the RNG streams
            before = loss_fn.bco_state.clone(), checkpoint.rng_state()
            groups = micro_batches(pairs, cfg.max_tokens, count=count)
            sums, tokens, processed, names = None, 0, 0, []
            for k, group in enumerate(groups):
                if k and distributed.any_true(ctx, stop.requested):
                    stopping = True  # honoured now, not after the rest of the step
                    break
                batch = collate([pairs[i] for i in group], pad_id=tokenize.pad_id,
                                packed=cfg.packing).to(ctx.device)
                ref_logps = ref.logps(batch) if ref is not None else None
                with distributed.sync_grads(policy, ctx, k == len(groups) - 1), autocast():
                    out = policy(batch, ref_logps,
                                 sft_tokens(batch, n_pairs, n_chosen, loss_fn))
                J = objective(out, batch, n_pairs)
                (J * ctx.world).backward()
                frac = batch.num_pairs / n_pairs
                row = torch.stack([J.detach(), *(frac * v.float() for v in out.metrics.values())])
                sums = row if sums is None else sums + row
                names = list(out.metrics)
                tokens += batch.num_tokens
                processed += batch.num_tokens if batch.packed else batch.padded_tokens
            if stopping:  # the partial step is dropped: resume redoes it from its start
                optimizer.zero_grad(set_to_none=True)
                loss_fn.bco_state.copy_(before[0])
                checkpoint.set_rng_state(before[1])
                break
            totals, grad_norm = None, math.nan
            if n_pairs:
                totals = distributed.all_sum(torch.cat([sums.double().cpu(), torch.tensor(
                    [tokens, processed], dtype=torch.float64)]).to(ctx.device), ctx).tolist()
                grad_norm = float(torch.nn.utils.clip_grad_norm_(
                    params, cfg.max_grad_norm or math.inf))
            skip = step_fault(n_pairs, totals, grad_norm, loss_fn)
            if skip is None:
                optimizer.step()
                nonfinite_in_a_row = 0
            else:  # no update; the data and the schedule move on
                skipped[skip] += 1
                loss_fn.bco_state.copy_(before[0])
                nonfinite_in_a_row += skip == "nonfinite"
                say(f"\nstep {step + 1}: " + ("every pair of it is bad data" if skip == "empty"
                    else f"non-finite loss {totals[0]} or gradient norm {grad_norm}")
                    + "; skipped (no update)")
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if cfg.ref_sync_every and step % cfg.ref_sync_every == 0:  # TR-DPO (skipped or not)
                reference.sync(ref, model, cfg.ref_sync_alpha)

            # --------------------------------------------------------- log
            if skip or step % cfg.log_every == 0 or step == total:
                dt = time.perf_counter() - t0
                record = {"step": step, "skipped": skip} if skip else {
                    "step": step, "loss": totals[0],
                    **dict(zip(names, totals[1:-2], strict=True)),
                    "grad_norm": grad_norm, "tokens_per_s": totals[-2] / dt,
                    "padding_fraction": 1 - totals[-2] / max(totals[-1], 1),
                    "peak_mem_mib": peak_bytes(ctx.device) / 2**20}
                record.update({"lr": scheduler.get_last_lr()[0], "pairs": n_pairs,
                               "micro_batches": count, "step_time_s": dt,
                               "skipped_nonfinite": skipped["nonfinite"],
                               "skipped_empty": skipped["empty"]})
                write_record(record)
                if bar is not None:
                    bar.set_postfix({k: f"{record[k]:.3g}" for k in (
                        "loss", "rewards/accuracies", "tokens_per_s") if k in record})
                elif ctx.main:  # no bar (--no-progress, a log file): one line per record
                    print(log_line(cfg, record, total), flush=True)
            if bar is not None:
                bar.update(1)
            if nonfinite_in_a_row >= cfg.max_nonfinite_steps:
                raise NonFiniteError(
                    f"{nonfinite_in_a_row} optimizer steps in a row (up to step {step}) had a "
                    "non-finite loss or gradient; stopping. None of them changed the weights; "
                    f"the last checkpoint is {result.checkpoint or 'none yet'}. Lower the lr, "
                    "check the data, or raise --max-nonfinite-steps")

            # --------------------------------------------------------- checkpoint
            if step == total or (cfg.save_every and step % cfg.save_every == 0):
                result.checkpoint, saved = save_checkpoint(), step

            # --------------------------------------------------------- evaluate
            if held_out and (step == total or (cfg.eval_every and step % cfg.eval_every == 0)):
                record = {"step": step, **held_out.run(distributed.unwrap(policy))}
                write_record(record)
                line = log_line(cfg, record, total, prefix="eval/")
                if bar is not None:
                    bar.write(line)
                elif ctx.main:
                    print(line, flush=True)
                if best.improves(record):  # kept as <output_dir>/best, from its checkpoint
                    if saved != step:
                        result.checkpoint, saved = save_checkpoint(), step
                    best.state["path"] = os.path.join(out_dir, "best")
                    if ctx.main:
                        export.export(out_dir, "best", model, tokenizer, processor, run_state(),
                                      cfg.lora_save, checkpoint=result.checkpoint)
                    distributed.barrier(ctx)
                    say(f"best so far: {best.describe()}")
    if stopping:
        # nothing trained yet: no checkpoint (a fresh start is the exact resume; an optimizer
        # loaded from an empty state would be stepped once by set_state_dict's initialization)
        if step > 0 and (saved != step or result.checkpoint is None):
            result.checkpoint = save_checkpoint()
        result.stopped_by = stop.signum or -1
        say(f"\nstopped by a signal at step {step}; checkpoint {result.checkpoint}")
    elif step == total and ctx.main and result.checkpoint:  # the trained model, self-contained
        result.final = export.export(out_dir, "final", model, tokenizer, processor,
                                     run_state(), cfg.lora_save, checkpoint=result.checkpoint)
        say(f"final model: {result.final}")
    distributed.barrier(ctx)
    if bar is not None:
        bar.close()
    if metrics_file:
        metrics_file.close()
    trackers.close()
    if bad:
        say(f"skipped {len(bad)} bad pairs while training")
    if skipped["nonfinite"] or skipped["empty"]:
        say(f"skipped {skipped['nonfinite']} steps with a non-finite loss or gradient and "
            f"{skipped['empty']} steps without a usable pair (no update in either)")
    result.step = step
    result.skipped_nonfinite, result.skipped_empty = skipped["nonfinite"], skipped["empty"]
    distributed.teardown(ctx)
    return result


class NonFiniteError(RunError):
    """Too many optimizer steps in a row with a non-finite loss or gradient."""


def step_fault(n_pairs: int, totals, grad_norm: float, loss_fn: MPOLoss) -> str | None:
    """Why this step must not update anything: "empty" (no usable pair), "nonfinite" (loss,
    gradient norm or BCO state not finite), or None. The same answer on every rank: the
    totals are all-reduced and the gradients synchronized."""
    if not n_pairs:
        return "empty"
    if not (math.isfinite(totals[0]) and math.isfinite(grad_norm)
            and bool(torch.isfinite(loss_fn.bco_state).all())):
        return "nonfinite"
    return None


def lock_output(out_dir: str, ctx, say):
    """Rank 0 takes ``out_dir``'s run lock; every rank raises if another run holds it."""
    lock, refusal = None, None
    if ctx.main:
        try:
            lock = checkpoint.RunLock(out_dir, say).acquire()
        except RuntimeError as err:
            refusal = str(err)
    refusal = distributed.broadcast(refusal, ctx)
    if refusal:
        raise RunError(refusal)
    return lock


def resume(cfg: TrainConfig, ckpt_dir: str, policy, optimizer, scheduler, ctx, say,
           ref_model=None) -> dict:
    """Load the checkpoint ``cfg.resume`` names ("auto": the newest intact one in ``ckpt_dir``;
    one that fails its manifest or holds anything but tensors is set aside as
    ``corrupt-step-<n>``, saying why) after checking it comes from a run with this
    configuration (its synced reference weights, if any, into ``ref_model``). Returns its
    trainer state plus ``path``, or {} for a fresh start."""
    if not cfg.resume:
        return {}
    paths = checkpoint.candidates(ckpt_dir) if cfg.resume == "auto" else [cfg.resume]
    for path in paths:
        try:
            check_identity(cfg, checkpoint.read_state(path), path, say)
            state = checkpoint.load(path, policy=policy, optimizer=optimizer,
                                    scheduler=scheduler, ctx=ctx, reference=ref_model)
        except checkpoint.CheckpointError as err:
            if cfg.resume != "auto":
                raise
            distributed.barrier(ctx)
            if ctx.main:
                say(f"not resuming from {path}: {err}; set aside as "
                    f"{checkpoint.set_aside(path, 'corrupt')}")
            distributed.barrier(ctx)
            continue
        if path != paths[0]:
            say(f"resuming from {path}, the newest intact checkpoint")
        newer = [c for c in checkpoint.candidates(ckpt_dir)
                 if os.path.basename(c) > f"{checkpoint.PREFIX}{state['step']:08d}"]
        if ctx.main:  # from a later point of the run than this one: kept, out of the way
            for c in newer:
                say(f"{c} is past the resumed step: set aside as "
                    f"{checkpoint.set_aside(c, 'superseded')}")
        distributed.barrier(ctx)
        say(f"resumed from {path} at step {state['step']}")
        return {**state, "path": path}
    if paths:
        raise checkpoint.CheckpointError(f"no intact checkpoint left in {ckpt_dir} (see above)")
    return {}


def check_identity(cfg: TrainConfig, state: dict, path: str, say) -> None:
    """Refuse (ValueError) a checkpoint whose run had other data, model, seed, loss or
    optimizer settings, unless ``cfg.resume_force``."""
    changes = identity_changes(state.get("config", {}), cfg.to_dict())
    if not changes:
        return
    listing = "; ".join(f"{k}: {a!r} then, {b!r} now" for k, (a, b) in changes.items())
    if cfg.resume_force:
        say(f"warning: --resume-force: continuing {path} with other settings ({listing})")
        return
    raise ValueError(f"{path} was written by a run with other settings ({listing}): resume "
                     "with the same settings, train into a new --output-dir, or pass "
                     "--resume-force to continue it anyway")


def write_run_record(cfg: TrainConfig, out_dir: str, resumed_from: str | None) -> None:
    """``config.json`` (the settings) and ``run.json`` (who runs it: pid, host, start, the
    command, the checkpoint it resumed from) in the output folder."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg.to_dict(), f, indent=1)
    run = {"pid": os.getpid(), "host": socket.gethostname(),
           "started": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv,
           "resumed_from": resumed_from, "config": cfg.to_dict()}
    with open(os.path.join(out_dir, "run.json"), "w", encoding="utf-8") as f:
        json.dump(run, f, indent=1)


def trim_metrics(path: str, step: int) -> None:
    """Keep only the records of steps up to ``step`` (where training starts): a resumed run
    writes the later ones again, so no step is ever recorded twice. A line cut by a kill is
    dropped."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                if json.loads(line)["step"] <= step:
                    keep.append(line.rstrip("\n") + "\n")
            except (ValueError, KeyError, TypeError):
                continue
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(keep)
    os.replace(path + ".tmp", path)


def sft_tokens(batch, step_pairs_total: int, step_chosen_total: int, loss_fn: MPOLoss
               ) -> float | None:
    """The token-mean SFT denominator this micro-batch's `MPOLoss` gets from outside: its
    share (pairs / step pairs) of the step's chosen tokens, so that `objective`'s scaling by
    the same share gives w_sft * (-(its chosen log-probs) / step chosen tokens). None when the
    SFT term is not a token mean."""
    cfg = loss_fn.loss_config
    if "sft" not in cfg.loss_types or cfg.sft_normalize != "token":
        return None
    return max(step_chosen_total, 1) * batch.num_pairs / step_pairs_total


def objective(out, batch, step_pairs_total: int):
    """This micro-batch's share J of the step's loss (see the module docstring): the sum of
    the step's J over micro-batches and processes is the loss of the step's whole batch (the
    forward got `sft_tokens`)."""
    return batch.num_pairs / step_pairs_total * out.loss


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


def load_examples(cfg: TrainConfig, say, source: str | None = None,
                  held_out: bool = False) -> list:
    """The pairs of ``source`` (default ``cfg.data``): the bundled task for "tiny" (its
    held-out prompts, never seen in training, for ``held_out``), else MMPR / HF preference
    files or a `datasets` dataset (its ``data_split``; ``eval_split`` for ``held_out``)."""
    source = source or cfg.data
    if source == "tiny":
        from ..data import tiny

        train_set = tiny.make_task(tiny.TRAIN_PAIRS, seed=cfg.seed + 1)
        if not held_out:
            return train_set
        return tiny.make_task(tiny.HELD_OUT_PAIRS, seed=cfg.seed + 2,
                              exclude=frozenset(e.prompt for e in train_set))
    from ..data.formats import load_dataset

    examples, report = load_dataset(source, on_error=cfg.on_bad_data, seed=cfg.seed,
                                    allow_outside_root=cfg.allow_outside_root,
                                    split=cfg.eval_split if held_out else cfg.data_split,
                                    config=cfg.data_config or None)
    say(f"{'eval data' if held_out else 'data'}: {report.summary()}")
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


def progress_bar(cfg: TrainConfig, ctx, total: int, step: int):
    if not (cfg.progress and ctx.main):
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    tty = sys.stderr.isatty()  # in a log file, a line every 15 s instead of every redraw
    return tqdm(total=total, initial=step, desc=run_name(cfg), unit="step", dynamic_ncols=True,
                mininterval=0.5 if tty else 15.0)


def run_name(cfg: TrainConfig) -> str:
    """"mpo" for the paper's three losses, else the losses trained ("sft" for a warm-up)."""
    mpo = ("sigmoid", "bco_pair", "sft")
    return "mpo" if tuple(cfg.loss_types) == mpo else "+".join(cfg.loss_types)


def log_line(cfg: TrainConfig, record: dict, total: int, prefix: str = "") -> str:
    """One metrics record as a line of text, for runs without a progress bar (and for every
    evaluation: ``prefix`` "eval/")."""
    shown = [f"{prefix}{key} {record[prefix + key]:.4g}" for key in (
        "loss", "rewards/accuracies", "rewards/margins", "nll_loss", "lr", "tokens_per_s")
        if prefix + key in record]
    name = "eval" if prefix else run_name(cfg)
    return f"{name} step {record['step']}/{total}: " + ", ".join(shown)


def default_output_dir() -> str:
    return os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
