"""From per-token log-probs to the combined loss, and the loss's gradient back to the tokens.

    forward   seq[s] = sum of token log-probs of sequence s (policy; reference too when given
              per token); then the pair terms (loss, metrics, coef[s] = dL/dseq[s]) from the
              sequence sums and the completion token counts; the BCO running mean is updated
              in between.
    backward  dL/dlogp[t] = upstream * coef[s(t)] (+ any gradient on the returned seq[s]).

Every step stays on the device (no host sync). With backend "triton" the three steps are the
kernels of kernels/loss_epilogue.py (the batch-sorting aot losses use the torch pair terms);
with "torch" they are torch ops, the pair terms from `mpo_fast.losses.combined_loss`
differentiated by autograd on [B]-sized tensors.

The kernel file knows no loss names; `kernel_bits` and `kernel_metric_slots` below are the one
map from this package's names to its bit and slot constants.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .layout import Segments
from .losses import ORPO_MAX_AVG_LOGP, LossConfig, bco_shift, combined_loss


@functools.cache
def _kernels():
    from .kernels import loss_epilogue

    return loss_epilogue


def kernel_bits() -> dict[str, int]:
    """loss_type -> its term bit in the fused epilogue. Types without one ("aot", "aot_pair":
    a batch sort) run the torch pair terms."""
    k = _kernels()
    bits = {"sigmoid": k.SIGMOID, "hinge": k.HINGE, "ipo": k.IPO, "robust": k.ROBUST,
            "bco_pair": k.BCO_PAIR, "sppo_hard": k.SPPO_HARD, "nca_pair": k.NCA_PAIR,
            "exo_pair": k.EXO_PAIR, "apo_zero": k.APO_ZERO, "apo_down": k.APO_DOWN,
            "discopop": k.DISCOPOP, "orpo": k.ORPO, "sft": k.SFT}
    return {name: int(bit) for name, bit in bits.items()}


def kernel_metric_slots() -> dict[str, int]:
    """metric name -> its slot in the fused epilogue's output vector."""
    k = _kernels()
    slots = {"rewards/chosen": k.REWARDS_CHOSEN, "rewards/rejected": k.REWARDS_REJECTED,
             "rewards/accuracies": k.REWARDS_ACCURACIES, "rewards/margins": k.REWARDS_MARGINS,
             "logps/chosen": k.LOGPS_CHOSEN, "logps/rejected": k.LOGPS_REJECTED,
             "nll_loss": k.NLL, "bco/delta": k.DELTA}
    return {name: int(slot) for name, slot in slots.items()}


@dataclass(frozen=True)
class _KernelLayout:
    """A LossConfig in the kernel's terms, on one device (made once: no per-call copy)."""

    types: int  # term bits
    weights: torch.Tensor  # fp32 [NUM_TERMS], indexed by bit
    order: torch.Tensor  # int64: output-vector slot of each of cfg.metric_names


@functools.lru_cache(maxsize=64)
def _kernel_layout(cfg: LossConfig, device: torch.device) -> _KernelLayout:
    k, bits, slots = _kernels(), kernel_bits(), kernel_metric_slots()
    weights = [0.0] * k.NUM_TERMS
    types = 0
    for name, w in zip(cfg.loss_types, cfg.loss_weights, strict=True):
        weights[bits[name]] = w
        types |= 1 << bits[name]
    order = [slots[n] if n in slots else k.NUM_METRICS + bits[n[len("loss/"):]]
             for n in cfg.metric_names]
    return _KernelLayout(types, torch.tensor(weights, device=device),
                         torch.tensor(order, device=device))


def fused_epilogue_supported(cfg: LossConfig, num_pairs: int) -> bool:
    """Whether the fused pair-terms kernel computes every term of `cfg` for this batch."""
    return set(cfg.loss_types) <= kernel_bits().keys() and num_pairs <= _kernels().MAX_PAIRS


class Epilogue(torch.autograd.Function):
    """(token log-probs [N] ...) -> (loss [], seq log-probs [2B], metric vector).

    forward(ctx, logp, ref_logp, ref_seq, count, segs, cfg, bco_state, backend, sft_tokens):
        logp [N] policy token log-probs (differentiable), ref_logp [N] or None reference token
        log-probs, ref_seq [2B] or None precomputed reference sequence log-probs, count [2B]
        completion tokens per sequence (fp32), segs the `Segments` of the N tokens, cfg a
        `LossConfig`, bco_state float64 [2] (used when cfg.running_delta), backend "triton"
        (kernels/loss_epilogue.py) or "torch", sft_tokens the token-mean SFT denominator
        (a float > 0) or None (the batch's chosen tokens). The metric vector follows
        cfg.metric_names.
    """

    @staticmethod
    def forward(ctx, logp, ref_logp, ref_seq, count, segs: Segments, cfg: LossConfig,
                bco_state, backend: str, sft_tokens: float | None = None):
        if backend == "triton":
            seq, ref_sums = _kernels().segment_sums(logp, ref_logp, segs.cu_seqlens,
                                                    segs.num_tokens)
        else:
            seq = segs.sum(logp)
            ref_sums = segs.sum(ref_logp) if ref_logp is not None else None
        ref = ref_seq.to(seq) if ref_seq is not None else ref_sums
        state = bco_state if cfg.running_delta else None
        if backend == "triton" and fused_epilogue_supported(cfg, seq.numel() // 2):
            loss, metrics, coef = _fused_pair_terms(seq, ref, count, cfg, state, sft_tokens)
        else:
            loss, metrics, coef = _torch_pair_terms(seq, ref, count, cfg, state, sft_tokens)
        ctx.segs, ctx.backend = segs, backend
        ctx.save_for_backward(coef)
        ctx.mark_non_differentiable(metrics)
        return loss, seq, metrics

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, grad_seq, _grad_metrics):
        (coef,) = ctx.saved_tensors
        per_seq = coef * grad_loss
        if grad_seq is not None:
            per_seq = per_seq + grad_seq
        segs = ctx.segs
        if ctx.backend == "triton":
            grad = _kernels().broadcast(per_seq.contiguous(), segs.cu_seqlens, segs.num_tokens)
        else:
            grad = segs.broadcast(per_seq)
        return grad, None, None, None, None, None, None, None, None


def _fused_pair_terms(seq, ref, count, cfg: LossConfig, bco_state, sft_tokens=None):
    layout = _kernel_layout(cfg, seq.device)
    if ref is None:
        ref = torch.zeros_like(seq)
    if bco_state is not None:
        delta = bco_shift(cfg, bco_state, cfg.beta * (seq - ref).mean()).float()
    else:
        delta = torch.zeros((), device=seq.device)
    loss, out, coef = _kernels().pair_terms(
        seq, ref, count, delta.reshape(1), layout.types, layout.weights, cfg.beta,
        cfg.label_smoothing, cfg.discopop_tau, ORPO_MAX_AVG_LOGP,
        sft_per_sequence=cfg.sft_normalize == "sequence", sft_tokens=sft_tokens or 0.0)
    return loss, out.index_select(0, layout.order), coef


def _torch_pair_terms(seq, ref, count, cfg: LossConfig, bco_state, sft_tokens=None):
    B = seq.numel() // 2
    with torch.enable_grad():
        c = seq[:B].detach().requires_grad_()
        r = seq[B:].detach().requires_grad_()
        loss, metrics = combined_loss(
            cfg, c, r, ref[:B] if ref is not None else None, ref[B:] if ref is not None else None,
            count[:B], count[B:], bco_state=bco_state, sft_tokens=sft_tokens)
        gc, gr = torch.autograd.grad(loss, (c, r), allow_unused=True)
    coef = torch.cat([torch.zeros_like(c) if gc is None else gc,
                      torch.zeros_like(r) if gr is None else gr])
    vec = torch.stack([metrics[name].to(seq) for name in cfg.metric_names])
    return loss.detach(), vec, coef
