"""From per-token log-probs to the combined loss, and the loss's gradient back to the tokens.

    forward   seq[s] = sum of token log-probs of sequence s (policy; reference too when given
              per token), count[s] = its completion tokens; then the pair terms (loss,
              metrics, coef[s] = dL/dseq[s]); the BCO running mean is updated in between.
    backward  dL/dlogp[t] = upstream * coef[s(t)] (+ any gradient on the returned seq[s]).

Every step stays on the device (no host sync). On CUDA the three steps are the Triton kernels
of `mpo_fast.kernels.loss_epilogue`; elsewhere (and for the batch-sorting aot losses) they are
torch ops, with the pair terms from `mpo_fast.losses.preference_loss` differentiated by
autograd on [B]-sized tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .losses import LOSS_TYPES, METRIC_NAMES, NO_REFERENCE, preference_loss, update_bco_state


@dataclass(frozen=True)
class LossConfig:
    loss_types: tuple[str, ...]
    loss_weights: tuple[float, ...]
    beta: float
    label_smoothing: float
    discopop_tau: float
    ignore_index: int
    running_delta: bool  # BCO reward shift from the running mean (else delta = 0)
    _device_weights: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def needs_reference(self) -> bool:
        return not set(self.loss_types) <= NO_REFERENCE

    def metric_names(self) -> list[str]:
        return [*METRIC_NAMES, *(f"loss/{t}" for t in LOSS_TYPES)]

    def kernel_types(self, device: torch.device) -> tuple[int, torch.Tensor]:
        """(bit mask, weights on `device`), made once per device (no per-call copy)."""
        from .kernels.loss_epilogue import encode_types

        if device not in self._device_weights:
            mask, weights = encode_types(self.loss_types, self.loss_weights)
            self._device_weights[device] = (mask, torch.tensor(weights, device=device))
        return self._device_weights[device]


def fused_epilogue_supported(cfg: LossConfig, num_pairs: int) -> bool:
    from .kernels.loss_epilogue import MAX_PAIRS, UNSUPPORTED

    return not set(cfg.loss_types) & UNSUPPORTED and num_pairs <= MAX_PAIRS


class Epilogue(torch.autograd.Function):
    """(token log-probs [N] ...) -> (loss [], seq log-probs [2B], metric vector).

    forward(ctx, logp, ref_logp, ref_seq, targets, segs, cfg, bco_state, backend):
        logp [N] policy token log-probs (differentiable), ref_logp [N] or None reference token
        log-probs, ref_seq [2B] or None precomputed reference sequence log-probs, targets [N]
        (for the completion token counts), bco_state float64 [2] or None, backend "triton"
        (the kernels of `mpo_fast.kernels.loss_epilogue`) or "torch".
    """

    @staticmethod
    def forward(ctx, logp, ref_logp, ref_seq, targets, segs, cfg, bco_state, backend):
        if backend == "triton":
            from .kernels import loss_epilogue as k

            seq, ref_sums, count = k.segment_sums(logp, ref_logp, targets, segs.cu_seqlens,
                                                  cfg.ignore_index)
        else:
            seq = segs.sum(logp)
            ref_sums = segs.sum(ref_logp) if ref_logp is not None else None
            count = segs.sum((targets != cfg.ignore_index).to(logp.dtype))
        ref = ref_seq.to(seq) if ref_seq is not None else ref_sums
        if backend == "triton" and fused_epilogue_supported(cfg, seq.numel() // 2):
            loss, metrics, coef = _fused_pair_terms(seq, ref, count, cfg, bco_state)
        else:
            loss, metrics, coef = _torch_pair_terms(seq, ref, count, cfg, bco_state)
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
        if ctx.backend == "triton":
            from .kernels.loss_epilogue import broadcast

            grad = broadcast(per_seq.contiguous(), ctx.segs.cu_seqlens, ctx.segs.num_tokens)
        else:
            grad = ctx.segs.broadcast(per_seq)
        return grad, None, None, None, None, None, None, None


def _fused_pair_terms(seq, ref, count, cfg, bco_state):
    from .kernels.loss_epilogue import pair_terms

    if ref is None:
        ref = torch.zeros_like(seq)
    if bco_state is not None:
        z = seq - ref
        delta = update_bco_state(bco_state, cfg.beta * z.mean()).float()
    else:
        delta = torch.zeros((), device=seq.device)
    types, weights = cfg.kernel_types(seq.device)
    return pair_terms(seq, ref, count, delta.reshape(1), types, weights, cfg.beta,
                      cfg.label_smoothing, cfg.discopop_tau)


def _torch_pair_terms(seq, ref, count, cfg, bco_state):
    B = seq.numel() // 2
    with torch.enable_grad():
        c = seq[:B].detach().requires_grad_()
        r = seq[B:].detach().requires_grad_()
        loss, metrics = preference_loss(
            c, r, ref[:B] if ref is not None else None, ref[B:] if ref is not None else None,
            loss_types=cfg.loss_types, loss_weights=cfg.loss_weights, beta=cfg.beta,
            label_smoothing=cfg.label_smoothing, chosen_lengths=count[:B],
            rejected_lengths=count[B:], bco_state=bco_state, discopop_tau=cfg.discopop_tau)
        gc, gr = torch.autograd.grad(loss, (c, r), allow_unused=True)
    coef = torch.cat([torch.zeros_like(c) if gc is None else gc,
                      torch.zeros_like(r) if gr is None else gr])
    vec = torch.stack([metrics.get(name, seq.new_tensor(float("nan"))).to(seq)
                       for name in cfg.metric_names()])
    return loss.detach(), vec, coef
