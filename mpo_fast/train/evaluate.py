"""Held-out pairs during training (``--eval-data``): the loss and every `MPOLoss` metric,
logged as ``eval/<name>``, and the best model kept by a chosen metric (``--best-metric``).

    held_out(cfg, ...)  -> EvalSet | None   tokenized once, before training (bad pairs skipped,
                                            as in training); its reference: the training one,
                                            or for ``--reference cached`` its own cache file
    EvalSet.run(policy) -> {"eval/loss", "eval/rewards/accuracies", ..., "eval/pairs"}
    Best(cfg, state)                        which eval record is the best so far

Evaluation changes nothing training reads: no gradient, the policy (and `MPOLoss`) in eval
mode, so the BCO running mean is read but never updated (`MPOLoss` scores with a clone), and
no random number is drawn (dropout is off). The loss is exactly the one a training step on the
same pairs would report (each micro-batch weighted by its share of the pairs; the token-mean
SFT denominator from outside, as in training). Under torchrun every rank scores a share and the
sums are all-reduced.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..data.collate import collate, micro_batches
from ..data.formats import DataError
from . import distributed, reference

__all__ = ["Best", "EvalSet", "held_out"]


@dataclass
class EvalSet:
    pairs: list  # TokenizedPair, this rank's share
    ref: object  # the reference (``logps(batch)``) or None
    cfg: object
    ctx: object
    pad_id: int
    autocast: object

    @torch.no_grad()
    def run(self, policy) -> dict:
        """``eval/<metric>`` of the held-out pairs under ``policy`` (the unwrapped `MPOModel`)."""
        from .loop import sft_tokens

        cfg, ctx, mine = self.cfg, self.ctx, self.pairs
        groups = micro_batches(mine, cfg.max_tokens)
        chosen = sum(len(p.chosen) - (0 if p.prompt else 1) for p in mine)
        count, n_pairs, n_chosen, _ = distributed.agree(ctx, len(groups), len(mine), chosen,
                                                        False)
        groups = micro_batches(mine, cfg.max_tokens, count=count)  # the same calls on each rank
        was_training = policy.training
        policy.eval()
        sums, names = None, []
        try:
            for group in groups:
                batch = collate([mine[i] for i in group], pad_id=self.pad_id,
                                packed=cfg.packing).to(ctx.device)
                ref_logps = self.ref.logps(batch) if self.ref is not None else None
                with self.autocast():
                    out = policy(batch, ref_logps,
                                 sft_tokens(batch, n_pairs, n_chosen, policy.loss_fn))
                frac = batch.num_pairs / n_pairs
                row = torch.stack([frac * out.loss.detach().float(),
                                   *(frac * v.float() for v in out.metrics.values())])
                sums = row if sums is None else sums + row
                names = list(out.metrics)
        finally:
            policy.train(was_training)
        if sums is None:
            sums = torch.zeros(1)
        totals = distributed.all_sum(sums.double().to(ctx.device), ctx).tolist()
        record = dict(zip(["eval/loss", *(f"eval/{k}" for k in names)], totals, strict=True))
        return {**record, "eval/pairs": n_pairs}


def held_out(cfg, model, tokenize, ctx, out_dir: str, autocast, amp, train_ref, say
             ) -> EvalSet | None:
    """The evaluation set of ``cfg.eval_data`` (None without one): its first ``eval_pairs``
    pairs (0: all), tokenized, this rank's share; made before training (the cached
    reference's log-probs come from the initial model, as the training pairs')."""
    if not cfg.eval_data:
        return None
    from .loop import load_examples

    examples = load_examples(cfg, say, source=cfg.eval_data, held_out=True)
    if cfg.eval_pairs:
        examples = examples[:cfg.eval_pairs]
    pairs = []
    for i, example in enumerate(examples):
        try:
            pairs.append(tokenize(example, i))
        except DataError as err:
            if cfg.on_bad_data == "raise":
                raise
            say(f"skipping bad held-out pair: {err}")
    if not pairs:
        raise ValueError(f"eval_data {cfg.eval_data}: no usable pair to evaluate on")
    ref = train_ref
    if isinstance(train_ref, reference.CachedReference):  # looked up by index: its own table
        ref = reference.make(cfg, model, examples, tokenize, ctx, out_dir, autocast, amp)
    say(f"evaluating on {len(pairs)} held-out pairs"
        + (f" every {cfg.eval_every} steps and" if cfg.eval_every else "") + " at the end")
    return EvalSet(pairs[ctx.rank::ctx.world], ref, cfg, ctx, tokenize.pad_id, autocast)


class Best:
    """The best evaluation so far by ``cfg.best_metric``: higher is better when
    ``cfg.greater_is_better`` says so; when unset, lower for a name ending in "loss", higher
    otherwise (the Hugging Face Trainer's rule)."""

    def __init__(self, cfg, saved: dict | None):
        self.metric = cfg.best_metric
        self.greater = cfg.greater_is_better
        if self.greater is None:
            self.greater = not self.metric.endswith("loss")
        self.state = dict(saved or {})  # metric, value, step, path

    def improves(self, record: dict) -> bool:
        if not self.metric:
            return False
        if self.metric not in record:
            raise ValueError(f"best_metric {self.metric!r} is not one of the evaluation's "
                             f"metrics {sorted(k for k in record if k != 'step')}")
        value = record[self.metric]
        if not math.isfinite(value):
            return False
        old = self.state.get("value")
        if old is not None and self.state.get("metric") == self.metric and not (
                value > old if self.greater else value < old):
            return False
        self.state = {"metric": self.metric, "value": value, "step": record["step"],
                      "greater_is_better": self.greater}
        return True

    def describe(self) -> str:
        return (f"{self.metric} {self.state['value']:.4g} at step {self.state['step']} "
                f"({'higher' if self.greater else 'lower'} is better)")
