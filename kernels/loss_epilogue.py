"""The loss epilogue: from per-token log-probs to the combined preference loss and back.

Three small kernels, in the order they run, none of which syncs with the host:

1. `_segment_sums_kernel` (one program per sequence s, tokens cu[s]:cu[s+1]):
       seq[s] = sum_t logp[t],  ref[s] = sum_t ref_logp[t],  count[s] = #{t: target[t] != ignore}
2. `_pair_terms_kernel` (ONE program for the whole batch, pairs (i, B + i) in lanes): every
   closed-form loss of mpo_fast.losses (all but the batch-sorting aot / aot_pair), weighted and
   averaged, the TRL metrics, and the per-sequence gradient coefficients
       coef[i] = dL/dc_i,  coef[B + i] = dL/dr_i
   in closed form (derivations beside each term). One program sees every pair, so the batch
   means, the SFT token count and the BCO shift need no second pass. B is at most a few
   thousand pairs; BLOCK_B = next power of two >= B keeps them all in registers.
3. `_broadcast_kernel` (backward, one program per sequence): grad_logp[t] = g[s] for t in s,
   where g = dL_total/dseq (coef * upstream grad, plus any gradient on the sequence log-probs).

Notation as in mpo_fast/losses.py: zc = c - c0, zr = r - r0, u = beta (zc - zr), s = sigmoid,
ls = logsigmoid, e = label smoothing, delta = BCO reward shift.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..losses import LOSS_TYPES, METRIC_NAMES, ORPO_MAX_AVG_LOGP

# Bit k of TYPES selects LOSS_TYPES[k]; the metrics vector is METRIC_NAMES (stored in that
# order below), then one "loss/<type>" per LOSS_TYPES entry.
TYPE_BITS = LOSS_TYPES
# _pair_terms_kernel tests these bit positions by number: a reordered table must fail here.
assert TYPE_BITS == ("sigmoid", "hinge", "ipo", "robust", "bco_pair", "sppo_hard", "nca_pair",
                     "aot", "aot_pair", "exo_pair", "apo_zero", "apo_down", "discopop", "orpo",
                     "sft"), TYPE_BITS
UNSUPPORTED = frozenset({"aot", "aot_pair"})  # need a batch sort: the torch path does them
NUM_METRICS = len(METRIC_NAMES)
MAX_PAIRS = 8192
TOKEN_BLOCK = 1024  # tokens per step in the segment kernels: one coalesced fp32 vector


@triton.jit
def _segment_sums_kernel(Logp, RefLogp, Targets, Cu, Seq, RefSeq, Count, ignore_index,
                         HAS_REF: tl.constexpr, BLOCK: tl.constexpr):
    s = tl.program_id(0)
    start = tl.load(Cu + s).to(tl.int64)
    end = tl.load(Cu + s + 1).to(tl.int64)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    ref_acc = tl.zeros((BLOCK,), dtype=tl.float32)
    cnt = tl.zeros((BLOCK,), dtype=tl.float32)
    for t0 in range(start, end, BLOCK):
        offs = t0 + tl.arange(0, BLOCK)
        m = offs < end
        acc += tl.load(Logp + offs, mask=m, other=0.0)
        tgt = tl.load(Targets + offs, mask=m, other=ignore_index)
        cnt += tl.where(m & (tgt != ignore_index), 1.0, 0.0)
        if HAS_REF:
            ref_acc += tl.load(RefLogp + offs, mask=m, other=0.0)
    tl.store(Seq + s, tl.sum(acc, axis=0))
    tl.store(Count + s, tl.sum(cnt, axis=0))
    if HAS_REF:
        tl.store(RefSeq + s, tl.sum(ref_acc, axis=0))


@triton.jit
def _broadcast_kernel(G, Cu, Out, BLOCK: tl.constexpr):
    s = tl.program_id(0)
    start = tl.load(Cu + s).to(tl.int64)
    end = tl.load(Cu + s + 1).to(tl.int64)
    g = tl.load(G + s)
    for t0 in range(start, end, BLOCK):
        offs = t0 + tl.arange(0, BLOCK)
        tl.store(Out + offs, tl.zeros((BLOCK,), dtype=tl.float32) + g, mask=offs < end)


@triton.jit
def _log1p(y):
    # log(1 + y) rounds 1 + y; a degree-7 series is exact to fp32 for 0 <= y < 0.05
    t = y * (1.0 - y * (1.0 / 2 - y * (1.0 / 3 - y * (1.0 / 4 - y * (1.0 / 5 - y * (
        1.0 / 6 - y / 7))))))
    return tl.where(y < 0.05, t, tl.log(1.0 + y))


@triton.jit
def _ls(x):
    return tl.minimum(x, 0.0) - _log1p(tl.exp(-tl.abs(x)))


@triton.jit
def _sig(x):
    z = tl.exp(-tl.abs(x))  # never overflows
    return tl.where(x >= 0, 1.0 / (1.0 + z), z / (1.0 + z))


@triton.jit
def _expm1(x):
    # exp(x) - 1 loses digits near 0; a degree-6 Taylor series is exact to fp32 for |x| < 0.1
    t = x * (1.0 + x * (0.5 + x * (1.0 / 6 + x * (1.0 / 24 + x * (1.0 / 120 + x / 720)))))
    return tl.where(tl.abs(x) < 0.1, t, tl.exp(x) - 1.0)


@triton.jit
def _add_term(k: tl.constexpr, loss, dzc, dzr, m, W, TermMetrics, inv_b, total, gc, gr):
    """Record term k's mean, add w_k * mean to the total, w_k / B * d/dz to the coefficients."""
    term = tl.sum(tl.where(m, loss, 0.0), axis=0) * inv_b
    w = tl.load(W + k)
    tl.store(TermMetrics + k, term)
    return total + w * term, gc + w * inv_b * dzc, gr + w * inv_b * dzr


@triton.jit
def _pair_terms_kernel(
    Seq, Ref, Count, Delta, W, Loss, Metrics, TermMetrics, Coef,
    B, beta, e, tau, orpo_cap,
    TYPES: tl.constexpr, BLOCK_B: tl.constexpr,
):
    i = tl.arange(0, BLOCK_B)
    m = i < B
    c = tl.load(Seq + i, mask=m, other=0.0)
    r = tl.load(Seq + B + i, mask=m, other=0.0)
    c0 = tl.load(Ref + i, mask=m, other=0.0)
    r0 = tl.load(Ref + B + i, mask=m, other=0.0)
    nc = tl.load(Count + i, mask=m, other=0.0)
    lc = tl.maximum(nc, 1.0)
    lr = tl.maximum(tl.load(Count + B + i, mask=m, other=0.0), 1.0)
    delta = tl.load(Delta)
    zc = c - c0
    zr = r - r0
    u = beta * (zc - zr)
    inv_b = 1.0 / B
    half_inv_beta = 0.5 / beta
    total = 0.0
    gc = tl.zeros((BLOCK_B,), dtype=tl.float32)
    gr = tl.zeros((BLOCK_B,), dtype=tl.float32)
    # Terms in u: dl/dzc = beta dl/du, dl/dzr = -beta dl/du.
    if (TYPES >> 0) & 1:  # sigmoid: -(1-e) ls(u) - e ls(-u)
        du = -(1.0 - e) * _sig(-u) + e * _sig(u)
        total, gc, gr = _add_term(0, -(1.0 - e) * _ls(u) - e * _ls(-u), beta * du, -beta * du,
                                  m, W, TermMetrics, inv_b, total, gc, gr)
    if (TYPES >> 1) & 1:  # hinge: relu(1 - u)
        du = tl.where(u < 1.0, -1.0, 0.0)
        total, gc, gr = _add_term(1, tl.maximum(1.0 - u, 0.0), beta * du, -beta * du,
                                  m, W, TermMetrics, inv_b, total, gc, gr)
    if (TYPES >> 2) & 1:  # ipo: x^2, x = zc/L_c - zr/L_r - 1/(2 beta)
        x = zc / lc - zr / lr - half_inv_beta
        total, gc, gr = _add_term(2, x * x, 2.0 * x / lc, -2.0 * x / lr,
                                  m, W, TermMetrics, inv_b, total, gc, gr)
    if (TYPES >> 3) & 1:  # robust: (-(1-e) ls(u) + e ls(-u)) / (1 - 2e)
        du = (-(1.0 - e) * _sig(-u) - e * _sig(u)) / (1.0 - 2.0 * e)
        loss = (-(1.0 - e) * _ls(u) + e * _ls(-u)) / (1.0 - 2.0 * e)
        total, gc, gr = _add_term(3, loss, beta * du, -beta * du,
                                  m, W, TermMetrics, inv_b, total, gc, gr)
    if (TYPES >> 4) & 1:  # bco_pair: -ls(a) - ls(-b), a = beta zc - delta, b = beta zr - delta
        a = beta * zc - delta
        b = beta * zr - delta
        total, gc, gr = _add_term(4, -_ls(a) - _ls(-b), -beta * _sig(-a), beta * _sig(b),
                                  m, W, TermMetrics, inv_b, total, gc, gr)
    if (TYPES >> 5) & 1:  # sppo_hard: (zc - h)^2 + (zr + h)^2, h = 1/(2 beta)
        xc = zc - half_inv_beta
        xr = zr + half_inv_beta
        total, gc, gr = _add_term(5, xc * xc + xr * xr, 2.0 * xc, 2.0 * xr,
                                  m, W, TermMetrics, inv_b, total, gc, gr)
    if (TYPES >> 6) & 1:  # nca_pair: -ls(a) - ls(-a)/2 - ls(-b)/2, a = beta zc, b = beta zr
        a = beta * zc
        b = beta * zr
        loss = -_ls(a) - 0.5 * _ls(-a) - 0.5 * _ls(-b)
        total, gc, gr = _add_term(6, loss, beta * (0.5 * _sig(a) - _sig(-a)), 0.5 * beta * _sig(b),
                                  m, W, TermMetrics, inv_b, total, gc, gr)
    if (TYPES >> 9) & 1:  # exo_pair: s(u)(ls(u) - log(1-e)) + s(-u)(ls(-u) - log e)
        # d/du = s(u) s(-u) (u - log(1-e) + log e)
        log_1me = tl.log(1.0 - e)
        log_e = tl.log(e)
        loss = _sig(u) * (_ls(u) - log_1me) + _sig(-u) * (_ls(-u) - log_e)
        du = _sig(u) * _sig(-u) * (u - log_1me + log_e)
        total, gc, gr = _add_term(9, loss, beta * du, -beta * du,
                                  m, W, TermMetrics, inv_b, total, gc, gr)
    if (TYPES >> 10) & 1:  # apo_zero: 1 - s(beta zc) + s(beta zr)
        sa = _sig(beta * zc)
        sb = _sig(beta * zr)
        total, gc, gr = _add_term(10, 1.0 - sa + sb, -beta * sa * (1.0 - sa),
                                  beta * sb * (1.0 - sb), m, W, TermMetrics, inv_b, total, gc, gr)
    if (TYPES >> 11) & 1:  # apo_down: s(beta zc) + 1 - s(u)
        sa = _sig(beta * zc)
        su = _sig(u)
        total, gc, gr = _add_term(11, sa + 1.0 - su, beta * (sa * (1.0 - sa) - su * (1.0 - su)),
                                  beta * su * (1.0 - su), m, W, TermMetrics, inv_b, total, gc, gr)
    if (TYPES >> 12) & 1:  # discopop: (1 - mu) (-ls(u)) + mu exp(-u), mu = s(u / tau)
        # d/du = mu (1-mu)/tau ls(u) - (1-mu) s(-u) + mu exp(-u) ((1-mu)/tau - 1)
        mu = _sig(u / tau)
        mexp = tl.exp(_ls(u / tau) - u)  # mu exp(-u) without inf * 0
        loss = (1.0 - mu) * -_ls(u) + mexp
        du = mu * (1.0 - mu) / tau * _ls(u) - (1.0 - mu) * _sig(-u) + mexp * ((1.0 - mu) / tau - 1.0)
        total, gc, gr = _add_term(12, loss, beta * du, -beta * du,
                                  m, W, TermMetrics, inv_b, total, gc, gr)
    if (TYPES >> 13) & 1:  # orpo: -beta ls(lo), lo = a - b - log(-expm1 a) + log(-expm1 b)
        # a = c/L_c and b = r/L_r capped at orpo_cap (no gradient past the cap);
        # d lo/da = -1/expm1(a), d lo/db = 1/expm1(b)
        a_raw = c / lc
        b_raw = r / lr
        a = tl.minimum(a_raw, orpo_cap)
        b = tl.minimum(b_raw, orpo_cap)
        ema = _expm1(a)
        emb = _expm1(b)
        lo = (a - b) - (tl.log(-ema) - tl.log(-emb))
        dlo = -beta * _sig(-lo)
        dc = tl.where(a_raw <= orpo_cap, dlo * (-1.0 / ema) / lc, 0.0)
        dr = tl.where(b_raw <= orpo_cap, dlo * (1.0 / emb) / lr, 0.0)
        total, gc, gr = _add_term(13, -beta * _ls(lo), dc, dr, m, W, TermMetrics, inv_b, total, gc, gr)

    # SFT: -(sum of chosen token log-probs) / (chosen tokens in the batch); also the nll metric.
    tokens = tl.maximum(tl.sum(tl.where(m, nc, 0.0), axis=0), 1.0)
    nll = -tl.sum(tl.where(m, c, 0.0), axis=0) / tokens
    if (TYPES >> 14) & 1:
        w = tl.load(W + 14)
        tl.store(TermMetrics + 14, nll)
        total += w * nll
        gc += -w / tokens

    tl.store(Loss, total)
    tl.store(Metrics + 0, tl.sum(tl.where(m, beta * zc, 0.0), axis=0) * inv_b)
    tl.store(Metrics + 1, tl.sum(tl.where(m, beta * zr, 0.0), axis=0) * inv_b)
    tl.store(Metrics + 2, tl.sum(tl.where(m & (zc > zr), 1.0, 0.0), axis=0) * inv_b)
    tl.store(Metrics + 3, tl.sum(tl.where(m, u, 0.0), axis=0) * inv_b)
    tl.store(Metrics + 4, tl.sum(tl.where(m, c, 0.0), axis=0) * inv_b)
    tl.store(Metrics + 5, tl.sum(tl.where(m, r, 0.0), axis=0) * inv_b)
    tl.store(Metrics + 6, nll)
    tl.store(Metrics + 7, delta)
    tl.store(Coef + i, gc, mask=m)
    tl.store(Coef + B + i, gr, mask=m)


def segment_sums(logp, ref_logp, targets, cu_seqlens, ignore_index):
    """(seq [S], ref_seq [S] or None, count [S]) fp32 for the S sequences of `cu_seqlens`."""
    S = cu_seqlens.numel() - 1
    seq = torch.empty(S, device=logp.device, dtype=torch.float32)
    count = torch.empty_like(seq)
    ref_seq = torch.empty_like(seq) if ref_logp is not None else None
    _segment_sums_kernel[(S,)](
        logp, ref_logp if ref_logp is not None else logp, targets, cu_seqlens,
        seq, ref_seq if ref_seq is not None else seq, count, ignore_index,
        HAS_REF=ref_logp is not None, BLOCK=TOKEN_BLOCK)
    return seq, ref_seq, count


def broadcast(g, cu_seqlens, num_tokens):
    """[N] fp32 with g[s] on every token of sequence s."""
    out = torch.empty(num_tokens, device=g.device, dtype=torch.float32)
    _broadcast_kernel[(g.numel(),)](g, cu_seqlens, out, BLOCK=TOKEN_BLOCK)
    return out


def encode_types(loss_types, loss_weights) -> tuple[int, list[float]]:
    """(TYPES bit mask, per-bit weights) for `_pair_terms_kernel`."""
    if set(loss_types) & UNSUPPORTED:
        raise ValueError(f"the fused epilogue has no {sorted(UNSUPPORTED)}: use the torch path")
    weights = [0.0] * len(TYPE_BITS)
    mask = 0
    for name, w in zip(loss_types, loss_weights, strict=True):
        k = TYPE_BITS.index(name)
        weights[k] = float(w)
        mask |= 1 << k
    return mask, weights


def pair_terms(seq, ref_seq, count, delta, types, type_weights, beta, label_smoothing, tau):
    """(loss [], metrics [NUM_METRICS + len(TYPE_BITS)], coef [2B]) for the batch, fp32.

    `types`, `type_weights` come from `encode_types` (weights as an fp32 tensor already on the
    device: a host-to-device copy here would sync); `delta` is a 0-dim device tensor.
    """
    B = seq.numel() // 2
    if B > MAX_PAIRS:
        raise ValueError(f"the fused epilogue takes at most {MAX_PAIRS} pairs, got {B}")
    dev = seq.device
    loss = torch.empty((), device=dev, dtype=torch.float32)
    metrics = torch.full((NUM_METRICS + len(TYPE_BITS),), float("nan"), device=dev)
    coef = torch.empty(2 * B, device=dev, dtype=torch.float32)
    _pair_terms_kernel[(1,)](
        seq, ref_seq, count, delta, type_weights, loss, metrics, metrics[NUM_METRICS:], coef,
        B, float(beta), float(label_smoothing), float(tau), ORPO_MAX_AVG_LOGP,
        TYPES=types, BLOCK_B=max(16, triton.next_power_of_2(B)))
    return loss, metrics, coef
