"""Single-pass pair-local mode of `MPOLoss`: the loss gradient inside the forward, 8NHV.

The two-pass path (forward, then a backward that recomputes the logits) is what a loss whose
gradient couples the whole batch needs: the paper's BCO shift is the running mean *including
this batch's rewards*, so no pair's gradient is known until every pair has been scored. When
every configured term's gradient depends only on its own pair (`blocker` is None) the
gradient of a pair is known as soon as the pair is scored, so each group of whole pairs is
done in one pass over the vocabulary (`torch_backend.single_pass_group`):

    reference forward (no grad, as in the two-pass path)
    for each group of whole pairs (a token budget bounds its kept logits [n_g, V] fp32):
        logits (kept) -> row log-sum-exp, target logit -> token log-probs -> the group's
        sequence log-probs c_i, r_i -> g = dL/dlogp (closed form per pair, batch constants
        known up front: B, the SFT token count, the lagged BCO shift) -> dZ -> dH, dW, db
    the loss and metrics from the sequence log-probs, by the same epilogue as the two-pass
    path (so `loss`, `metrics` and `chosen_logps` match it)

FLOPs (units of NHV): reference 2, logits 2, dH 2, dW 2 = 8 (two-pass: 10). The gradients are
computed for an upstream gradient of 1 and scaled by the scalar that reaches `loss` in the
backward (as Liger's fused losses do), so micro-batch scaling (``loss * f``) is exact.

Limits of the mode (why it is opt-in): gradients flow only through ``out.loss``. The
returned sequence log-probs are values; a backward through them raises (use the two-pass
path to differentiate them). Pair-local terms: every loss type except "aot" / "aot_pair"
(they sort across the batch), and "bco_pair" only with ``bco_delta="none"`` or ``"lagged"``
(the running mean of *previous* steps: a deviation from the paper, whose delta includes the
current batch). A pair with more tokens than the group budget is scored in two passes
(forward, then the usual backward with its gradient), exact and within the workspace.

dW across groups (half-precision weights; fp32 weights accumulate in place, exactly): each
group's dW is an fp32 product, added into

    "split" (default)  the gradient (the rounded sum) plus a remainder buffer of the same
                       dtype (`torch_backend.split_add`): about one rounding in all, like the
                       two-pass path, for V*H*2 bytes more;
    "fp32"             an fp32 [V, H] buffer, rounded once at the end: V*H*4 bytes more;
    "weight"           the gradient itself: no extra memory, one rounding per group, so the
                       error grows with the number of groups G.

Measured against float64 (bench/dw_accum.py, CPU, N=4096 x H=256 x V=8192 bf16, relative
Frobenius error of dW): two-pass 1.66e-3; single pass "fp32" and "split" 1.66e-3 at every G;
"weight" 1.66e-3 (G=1), 3.0e-3 (4), 4.9e-3 (16), 6.9e-3 (64). The issue's bar for bf16 is
2.4e-3, so the default is "split": exact-as-two-pass at half the fp32 buffer's memory.
"""

from __future__ import annotations

import torch

from . import torch_backend
from .epilogue import _fused_pair_terms, _torch_pair_terms, fused_epilogue_supported
from .layout import Segments
from .logprobs import _backend_module
from .losses import LOSSES, LossConfig, Pairs

BATCH_COUPLED = ("aot", "aot_pair")  # sort across the batch: no pair-local gradient
SINGLE_PASS = ("auto", True, False)
DW_ACCUM = ("split", "fp32", "weight")


def blocker(cfg: LossConfig) -> str | None:
    """None when every term of `cfg` has a pair-local gradient, else why not (names the loss)."""
    coupled = [t for t in cfg.loss_types if t in BATCH_COUPLED]
    if coupled:
        return (f"loss_types {coupled} sort the batch's rewards, so each pair's gradient "
                "depends on every pair")
    if "bco_pair" in cfg.loss_types and cfg.bco_delta == "running_mean":
        return ("bco_pair with bco_delta='running_mean' (the paper's shift) includes the "
                "current batch's rewards, so each pair's gradient waits for the whole batch; "
                "bco_delta='lagged' (previous steps' mean) or 'none' is pair-local")
    return None


def check_options(single_pass, dw_accum, cfg: LossConfig) -> None:
    if single_pass not in SINGLE_PASS or not isinstance(single_pass, (bool, str)):
        raise ValueError(f"single_pass must be 'auto', True or False, got {single_pass!r}")
    if dw_accum not in DW_ACCUM:
        raise ValueError(f"dw_accum must be one of {DW_ACCUM}, got {dw_accum!r}")
    why = blocker(cfg)
    if single_pass is True and why is not None:
        raise ValueError(f"single_pass=True needs pair-local losses: {why}")


def applies(single_pass, cfg: LossConfig, backend: str, *tensors) -> bool:
    """Whether this call runs in one pass: asked for (True, or "auto" on the torch backend,
    the one where it is measured faster), some input needs a gradient, pair-local losses."""
    if single_pass is False or not torch.is_grad_enabled():
        return False
    if not any(t is not None and t.requires_grad for t in tensors):
        return False
    if single_pass == "auto" and (backend != "torch" or blocker(cfg) is not None):
        return False
    return True


def group_loss(cfg: LossConfig, c, r, c0, r0, len_c, len_r, B: int, sft_tokens, delta):
    """The part of the batch loss that pairs (c, r) contribute: per-pair terms sum / B, the
    SFT term over the batch's denominator. Its gradient is the pairs' dL/dc, dL/dr."""
    pairs = Pairs(c, r, c0, r0, len_c.clamp(min=1), len_r.clamp(min=1), cfg.beta,
                  cfg.label_smoothing, delta, cfg.discopop_tau)
    total = torch.zeros((), dtype=c.dtype, device=c.device)
    for name, w in zip(cfg.loss_types, cfg.loss_weights, strict=True):
        if name != "sft":
            term = LOSSES[name](pairs).sum() / B
        elif cfg.sft_normalize == "sequence":
            term = (-c / len_c.clamp(min=1)).sum() / B
        else:
            term = -c.sum() / sft_tokens
        total = total + w * term
    return total


def plan_groups(pair_tokens: list[int], cap: int) -> list[tuple[int, int]]:
    """Consecutive pairs [p0, p1) whose tokens sum to at most `cap` (a longer pair alone)."""
    groups, p0, tokens = [], 0, 0
    for p, n in enumerate(pair_tokens):
        if p > p0 and tokens + n > cap:
            groups.append((p0, p))
            p0, tokens = p, 0
        tokens += n
    if p0 < len(pair_tokens):
        groups.append((p0, len(pair_tokens)))
    return groups


class _SinglePass(torch.autograd.Function):
    """(hidden [N, H], weight, bias) -> (loss, seq [2B], metric vector); grads from forward."""

    @staticmethod
    def forward(ctx, job, hidden, weight, bias):
        needs = ctx.needs_input_grad[1:4]
        loss, seq, metrics, grads = job.run(hidden, weight, bias, needs)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(metrics)
        ctx.save_for_backward(*[g for g in grads if g is not None])
        ctx.present = [g is not None for g in grads]
        return loss, seq, metrics

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, grad_seq, _grad_metrics):
        if grad_seq is not None:
            raise RuntimeError(
                "MPOLoss(single_pass=True) computes its gradients in the forward, for `loss` "
                "only: chosen_logps / rejected_logps carry no gradient of their own. Use "
                "single_pass=False to backpropagate through them")
        saved = iter(ctx.saved_tensors)
        grads = [next(saved) if p else None for p in ctx.present]
        if grad_loss is None:
            return None, None, None, None
        return (None, *[None if g is None else g * grad_loss.to(g.dtype) for g in grads])


class SinglePassJob:
    """Everything of one `MPOLoss` call but the differentiable tensors."""

    def __init__(self, *, rows, targets, segs: Segments, ref, count, cfg: LossConfig,
                 bco_state, backend: str, inv_temp: float, softcap, sft_tokens, dw_accum,
                 budget=None):
        self.rows, self.targets, self.segs = rows, targets, segs
        self.ref, self.count, self.cfg, self.bco_state = ref, count, cfg, bco_state
        self.backend, self.inv_temp, self.softcap = backend, inv_temp, softcap
        self.sft_tokens, self.dw_accum, self.budget = sft_tokens, dw_accum, budget

    def run(self, hidden, weight, bias, needs):
        # the backend's group pass (Triton: kernels/single_pass.py; else the torch twin)
        self.impl = _backend_module(self.backend, hidden)
        group = getattr(self.impl, "single_pass_group", torch_backend.single_pass_group)
        cfg, B = self.cfg, self.segs.num_seqs // 2
        (V, H), dev = weight.shape, hidden.device
        acc = torch_backend.accum_dtype(hidden.dtype)
        need_h, need_w, need_b = needs
        gh = torch.zeros_like(hidden) if need_h else None
        gw = torch.zeros_like(weight) if need_w else None
        dw = None  # dW's accumulator beside gw (module doc): fp32, or split's remainder
        if need_w and weight.dtype != acc and self.dw_accum != "weight":
            dw = torch.zeros((V, H), device=dev,
                             dtype=acc if self.dw_accum == "fp32" else weight.dtype)
        gb = torch.zeros(V, device=dev, dtype=acc) if need_b else None

        # batch constants of the pair-local gradient, known before any pair is scored
        count = self.count.to(acc)
        ref = self.ref.to(acc) if self.ref is not None else torch.zeros(2 * B, device=dev,
                                                                        dtype=acc)
        sft_tokens = (torch.tensor(float(self.sft_tokens), dtype=acc, device=dev)
                      if self.sft_tokens is not None else count[:B].sum().clamp(min=1))
        delta = torch.zeros((), dtype=acc, device=dev)
        if "bco_pair" in cfg.loss_types and cfg.bco_delta == "lagged":
            delta = self.bco_state[0].to(acc).clone()  # previous steps' mean (updated later)

        # the scored rows, ordered by pair (chosen tokens, then rejected), cut into groups
        row_seq = self.segs.seq_ids.index_select(0, self.rows)
        order = torch.argsort(row_seq % B, stable=True)
        pair_tokens = (self.count[:B] + self.count[B:]).long().tolist()  # one host read
        offsets = [0]
        for n in pair_tokens:
            offsets.append(offsets[-1] + n)
        cap = getattr(self.impl, "group_tokens", torch_backend.group_tokens)(
            V, H, hidden.dtype, self.softcap is not None, self.budget)
        seq = torch.zeros(2 * B, device=dev, dtype=acc)
        for p0, p1 in plan_groups(pair_tokens, cap):
            idx = order[offsets[p0]:offsets[p1]]
            rows, y, s_of = self.rows[idx], self.targets[idx], row_seq[idx]
            if rows.numel() == 0:  # pairs without completion tokens: no gradient to make
                continue
            members = torch.cat([torch.arange(p0, p1, device=dev),
                                 torch.arange(B + p0, B + p1, device=dev)])

            def token_grad(logp, s_of=s_of, members=members, p0=p0, p1=p1):
                seq.index_add_(0, s_of, logp)
                with torch.enable_grad():
                    c = seq[p0:p1].detach().requires_grad_()
                    r = seq[B + p0:B + p1].detach().requires_grad_()
                    loss = group_loss(cfg, c, r, ref[p0:p1], ref[B + p0:B + p1],
                                      count[p0:p1], count[B + p0:B + p1], B, sft_tokens, delta)
                    gc, gr = torch.autograd.grad(loss, (c, r))
                coef = torch.zeros(2 * B, device=dev, dtype=acc)
                coef[members] = torch.cat([gc, gr])
                return coef.index_select(0, s_of)

            if rows.numel() <= cap:
                group(hidden, weight, bias, rows, y, self.inv_temp, self.softcap, token_grad,
                      (gh, gw, gb), dw)
            else:  # one pair longer than the budget: forward, then the usual backward
                self._two_pass_pair(hidden, weight, bias, rows, y, token_grad, needs,
                                    (gh, gw, gb, dw))
        if dw is not None and dw.dtype == acc:
            gw.copy_(dw)
        loss, metrics = self._epilogue(seq, ref, self.count)
        gb = None if gb is None else gb.to(weight.dtype)
        return loss, seq, metrics, (gh, gw, gb)

    def _two_pass_pair(self, hidden, weight, bias, rows, y, token_grad, needs, grads):
        gh, gw, gb, dw = grads
        lse, zy = self.impl.forward(hidden, weight, bias, rows, y, self.inv_temp, self.softcap)
        g = token_grad(zy - lse)
        h, w, b = self.impl.backward(hidden, weight, bias, rows, y, lse, g.to(lse.dtype),
                                     self.inv_temp, self.softcap, needs)
        if h is not None:
            gh.index_copy_(0, rows, h.index_select(0, rows))
        if w is not None and dw is None:
            gw.add_(w)
        elif w is not None and dw.dtype == gw.dtype:  # split, a vocab chunk at a time
            for v0 in range(0, w.shape[0], 4096):
                torch_backend.split_add(gw[v0:v0 + 4096], dw[v0:v0 + 4096],
                                        w[v0:v0 + 4096].to(torch.float32))
        elif w is not None:
            dw.add_(w.to(dw.dtype))
        if b is not None:
            gb.add_(b.to(gb.dtype))

    def _epilogue(self, seq, ref, count):
        """Loss and metrics from the sequence log-probs, as the two-pass path computes them
        (the BCO state is updated here, after the pass: the lagged shift used above is the
        mean of the previous steps)."""
        cfg = self.cfg
        state = self.bco_state if cfg.running_delta else None
        if self.backend == "triton" and fused_epilogue_supported(cfg, seq.numel() // 2):
            loss, vec, _ = _fused_pair_terms(seq, ref, count, cfg, state, self.sft_tokens)
        else:
            loss, vec, _ = _torch_pair_terms(seq, ref, count, cfg, state, self.sft_tokens)
        return loss, vec


def single_pass_loss(job: SinglePassJob, hidden, weight, bias):
    """(loss, seq [2B], metric vector) with the gradients of `loss` made in the forward."""
    return _SinglePass.apply(job, hidden, weight, bias)
