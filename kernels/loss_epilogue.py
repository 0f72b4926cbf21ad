"""The loss epilogue: from per-token log-probs to the combined preference loss and back.

Three small kernels, in the order they run, none of which syncs with the host:

1. `_segment_sums_kernel` (one program per sequence s, tokens cu[s]:cu[s+1]):
       seq[s] = sum_t logp[t],  ref[s] = sum_t ref_logp[t]
2. `_pair_terms_kernel` (ONE program for the whole batch, pairs (i, B + i) in lanes): every
   loss term whose bit is set in TYPES (all closed-form; a batch sort has no kernel here),
   weighted and averaged, the preference metrics, and the per-sequence gradient coefficients
       coef[i] = dL/dc_i,  coef[B + i] = dL/dr_i
   in closed form (derivations beside each term). One program sees every pair, so the batch
   means, the SFT token count and the BCO shift need no second pass. The SFT term is either
   the token mean -sum(c) / sum(L_c) or, with SFT_PER_SEQUENCE, the mean over pairs of
   -c_i / L_c_i (each answer by its own length). B is at most MAX_PAIRS, a runtime
   argument: the program loops over blocks of PAIR_BLOCK pairs (a first loop sums the SFT
   token count), so one compiled kernel serves every batch size.
3. `_broadcast_kernel` (backward, one program per sequence): grad_logp[t] = g[s] for t in s,
   where g = dL_total/dseq (coef * upstream grad, plus any gradient on the sequence log-probs).

This file knows no loss names: the caller maps its names to the bit constants below, passes
the weights indexed by bit and reads the output vector by the slot constants. Offsets are
clamped to [0, N], so offsets that overrun the tokens never read or write out of bounds.

Notation: c, r = chosen / rejected sequence log-probs, c0, r0 the reference's, L_c, L_r their
completion token counts, zc = c - c0, zr = r - r0, u = beta (zc - zr), s = sigmoid,
ls = logsigmoid, e = label smoothing, delta = BCO reward shift.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Term bits: bit K of the TYPES constexpr turns term K on; its weight is W[K] and its batch mean
# goes to out[NUM_METRICS + K]. Each is tested by name in _pair_terms_kernel (kernels read
# only tl.constexpr globals; int(SIGMOID) is the plain number).
SIGMOID = tl.constexpr(0)  # -(1-e) ls(u) - e ls(-u)
HINGE = tl.constexpr(1)  # relu(1 - u)
IPO = tl.constexpr(2)  # (zc/L_c - zr/L_r - 1/(2 beta))^2
ROBUST = tl.constexpr(3)  # (-(1-e) ls(u) + e ls(-u)) / (1 - 2e)
BCO_PAIR = tl.constexpr(4)  # -ls(beta zc - delta) - ls(-(beta zr - delta))
SPPO_HARD = tl.constexpr(5)  # (zc - 1/(2 beta))^2 + (zr + 1/(2 beta))^2
NCA_PAIR = tl.constexpr(6)  # -ls(beta zc) - ls(-beta zc)/2 - ls(-beta zr)/2
EXO_PAIR = tl.constexpr(7)  # s(u)(ls(u) - log(1-e)) + s(-u)(ls(-u) - log e)
APO_ZERO = tl.constexpr(8)  # 1 - s(beta zc) + s(beta zr)
APO_DOWN = tl.constexpr(9)  # s(beta zc) + 1 - s(u)
DISCOPOP = tl.constexpr(10)  # (1 - m)(-ls(u)) + m exp(-u), m = s(u / tau)
ORPO = tl.constexpr(11)  # -beta ls(log-odds of the average log-probs c/L_c vs r/L_r)
SFT = tl.constexpr(12)  # -sum(c) / sum(L_c), or mean(-c / L_c) with SFT_PER_SEQUENCE
NUM_TERMS = 13
ALL_TERMS = (1 << NUM_TERMS) - 1

# Slots of the output vector before the NUM_TERMS term means (batch means over pairs).
REWARDS_CHOSEN = tl.constexpr(0)  # beta zc
REWARDS_REJECTED = tl.constexpr(1)  # beta zr
REWARDS_ACCURACIES = tl.constexpr(2)  # zc > zr
REWARDS_MARGINS = tl.constexpr(3)  # u
LOGPS_CHOSEN = tl.constexpr(4)  # c
LOGPS_REJECTED = tl.constexpr(5)  # r
NLL = tl.constexpr(6)  # the SFT term (either normalization), also when it is not weighted in
DELTA = tl.constexpr(7)  # the BCO shift used
NUM_METRICS = 8
TERM_LANES = tl.constexpr(16)  # >= NUM_TERMS: the kernel's per-term sums, lane = bit
METRIC_LANES = tl.constexpr(8)  # = NUM_METRICS: its metric sums, lane = slot
# Pairs per step of the pair-terms kernel's loop: a fixed block, so one compiled kernel serves
# every pair count (B is a runtime argument, not specialized on); 256 lanes keep the ~30 live
# per-pair vectors of one program in registers.
PAIR_BLOCK = 256

MAX_PAIRS = 8192
TOKEN_BLOCK = 1024  # tokens per step in the segment kernels: one coalesced fp32 vector


@triton.jit
def _bounds(Cu, s, N):
    """Tokens [start, end) of sequence s, clamped to [0, N]."""
    start = tl.maximum(tl.minimum(tl.load(Cu + s), N), 0).to(tl.int64)
    end = tl.maximum(tl.minimum(tl.load(Cu + s + 1), N), 0).to(tl.int64)
    return start, end


@triton.jit(do_not_specialize=["N"])
def _segment_sums_kernel(Logp, RefLogp, Cu, Seq, RefSeq, N,
                         HAS_REF: tl.constexpr, BLOCK: tl.constexpr):
    s = tl.program_id(0)
    start, end = _bounds(Cu, s, N)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    ref_acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for t0 in range(start, end, BLOCK):
        offs = t0 + tl.arange(0, BLOCK)
        m = offs < end
        acc += tl.load(Logp + offs, mask=m, other=0.0)
        if HAS_REF:
            ref_acc += tl.load(RefLogp + offs, mask=m, other=0.0)
    tl.store(Seq + s, tl.sum(acc, axis=0))
    if HAS_REF:
        tl.store(RefSeq + s, tl.sum(ref_acc, axis=0))


@triton.jit(do_not_specialize=["N"])
def _broadcast_kernel(G, Cu, Out, N, BLOCK: tl.constexpr):
    s = tl.program_id(0)
    start, end = _bounds(Cu, s, N)
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
def _lane_add(acc, K, part, LANES: tl.constexpr):
    """acc[K] += part for a [LANES] accumulator (lane K holds one named sum)."""
    return acc + tl.where(tl.arange(0, LANES) == K, part, 0.0)


@triton.jit
def _add_term(K: tl.constexpr, loss, dzc, dzr, m, W, terms, inv_b, total, gc, gr):
    """Add this block's term-K losses to its sum (lane K of `terms`) and w_K / B of them to
    the total; w_K / B * d/dz to the block's coefficients."""
    part = tl.sum(tl.where(m, loss, 0.0), axis=0)
    w = tl.load(W + K)
    terms = _lane_add(terms, K, part, TERM_LANES)
    return total + w * part * inv_b, terms, gc + w * inv_b * dzc, gr + w * inv_b * dzr


@triton.jit(do_not_specialize=["B"])
def _pair_terms_kernel(
    Seq, Ref, Count, Delta, W, Loss, Metrics, TermMetrics, Coef,
    B, beta, e, tau, orpo_cap, sft_tokens,
    TYPES: tl.constexpr, SFT_PER_SEQUENCE: tl.constexpr, BLOCK_B: tl.constexpr,
):
    types = tl.constexpr(TYPES)  # (a plain int under the interpreter: `>>` needs a constexpr)
    lane = tl.arange(0, BLOCK_B)
    inv_b = 1.0 / B
    half_inv_beta = 0.5 / beta
    delta = tl.load(Delta)
    zero = tl.sum(tl.zeros((BLOCK_B,), dtype=tl.float32), axis=0)  # an fp32 scalar
    # Pass 1 (token-mean SFT only): its denominator, the batch's chosen tokens unless given.
    tokens = zero + 1.0
    if not SFT_PER_SEQUENCE:
        counted = tl.zeros((BLOCK_B,), dtype=tl.float32)
        for b0 in range(0, B, BLOCK_B):
            counted += tl.load(Count + b0 + lane, mask=b0 + lane < B, other=0.0)
        tokens = tl.maximum(tl.sum(counted, axis=0), 1.0)
        tokens = tl.where(sft_tokens > 0.0, sft_tokens, tokens)
    # Pass 2: BLOCK_B pairs at a time; sums over pairs in lanes (terms: lane = bit,
    # sums: lane = metric slot), coefficients stored per block.
    total = zero
    terms = tl.zeros((TERM_LANES,), dtype=tl.float32)
    sums = tl.zeros((METRIC_LANES,), dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        total, terms, sums = _pair_block(
            Seq, Ref, Count, W, Coef, b0 + lane, B, beta, e, tau, orpo_cap, delta, tokens,
            inv_b, half_inv_beta, total, terms, sums, types, SFT_PER_SEQUENCE, BLOCK_B)

    if SFT_PER_SEQUENCE:  # mean_i(-c_i / L_c_i)
        nll = -tl.sum(tl.where(tl.arange(0, METRIC_LANES) == NLL, sums, 0.0), axis=0) * inv_b
    else:  # -sum(c) / T
        nll = -tl.sum(tl.where(tl.arange(0, METRIC_LANES) == LOGPS_CHOSEN, sums, 0.0),
                      axis=0) / tokens
    term_lane = tl.arange(0, TERM_LANES)
    if (types >> SFT) & 1:
        total += tl.load(W + SFT) * nll
        terms = tl.where(term_lane == SFT, nll / inv_b, terms)
    active = ((tl.full((TERM_LANES,), TYPES, tl.int32) >> term_lane) & 1) == 1
    tl.store(TermMetrics + term_lane, terms * inv_b, mask=active)
    slot = tl.arange(0, METRIC_LANES)
    means = tl.where(slot == NLL, nll, sums * inv_b)
    tl.store(Metrics + slot, tl.where(slot == DELTA, delta, means))
    tl.store(Loss, total)


@triton.jit
def _pair_block(
    Seq, Ref, Count, W, Coef, i, B, beta, e, tau, orpo_cap, delta, tokens, inv_b,
    half_inv_beta, total, terms, sums,
    types: tl.constexpr, SFT_PER_SEQUENCE: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """Pairs i (a block, masked past B): their terms, metric sums and coefficients."""
    m = i < B
    c = tl.load(Seq + i, mask=m, other=0.0)
    r = tl.load(Seq + B + i, mask=m, other=0.0)
    c0 = tl.load(Ref + i, mask=m, other=0.0)
    r0 = tl.load(Ref + B + i, mask=m, other=0.0)
    nc = tl.load(Count + i, mask=m, other=0.0)
    lc = tl.maximum(nc, 1.0)
    lr = tl.maximum(tl.load(Count + B + i, mask=m, other=0.0), 1.0)
    zc = c - c0
    zr = r - r0
    u = beta * (zc - zr)
    gc = tl.zeros((BLOCK_B,), dtype=tl.float32)
    gr = tl.zeros((BLOCK_B,), dtype=tl.float32)
    # Terms in u: dl/dzc = beta dl/du, dl/dzr = -beta dl/du.
    if (types >> SIGMOID) & 1:
        du = -(1.0 - e) * _sig(-u) + e * _sig(u)
        loss = -(1.0 - e) * _ls(u) - e * _ls(-u)
        total, terms, gc, gr = _add_term(SIGMOID, loss, beta * du, -beta * du,
                                  m, W, terms, inv_b, total, gc, gr)
    if (types >> HINGE) & 1:
        du = tl.where(u < 1.0, -1.0, 0.0)
        total, terms, gc, gr = _add_term(HINGE, tl.maximum(1.0 - u, 0.0), beta * du, -beta * du,
                                  m, W, terms, inv_b, total, gc, gr)
    if (types >> IPO) & 1:  # x^2, x = zc/L_c - zr/L_r - 1/(2 beta)
        x = zc / lc - zr / lr - half_inv_beta
        total, terms, gc, gr = _add_term(IPO, x * x, 2.0 * x / lc, -2.0 * x / lr,
                                  m, W, terms, inv_b, total, gc, gr)
    if (types >> ROBUST) & 1:
        du = (-(1.0 - e) * _sig(-u) - e * _sig(u)) / (1.0 - 2.0 * e)
        loss = (-(1.0 - e) * _ls(u) + e * _ls(-u)) / (1.0 - 2.0 * e)
        total, terms, gc, gr = _add_term(ROBUST, loss, beta * du, -beta * du,
                                  m, W, terms, inv_b, total, gc, gr)
    if (types >> BCO_PAIR) & 1:  # -ls(a) - ls(-b), a = beta zc - delta, b = beta zr - delta
        a = beta * zc - delta
        b = beta * zr - delta
        total, terms, gc, gr = _add_term(BCO_PAIR, -_ls(a) - _ls(-b), -beta * _sig(-a),
                                  beta * _sig(b), m, W, terms, inv_b, total, gc, gr)
    if (types >> SPPO_HARD) & 1:  # (zc - h)^2 + (zr + h)^2, h = 1/(2 beta)
        xc = zc - half_inv_beta
        xr = zr + half_inv_beta
        total, terms, gc, gr = _add_term(SPPO_HARD, xc * xc + xr * xr, 2.0 * xc, 2.0 * xr,
                                  m, W, terms, inv_b, total, gc, gr)
    if (types >> NCA_PAIR) & 1:  # -ls(a) - ls(-a)/2 - ls(-b)/2, a = beta zc, b = beta zr
        a = beta * zc
        b = beta * zr
        loss = -_ls(a) - 0.5 * _ls(-a) - 0.5 * _ls(-b)
        total, terms, gc, gr = _add_term(NCA_PAIR, loss, beta * (0.5 * _sig(a) - _sig(-a)),
                                  0.5 * beta * _sig(b), m, W, terms, inv_b, total, gc, gr)
    if (types >> EXO_PAIR) & 1:
        # d/du = s(u) s(-u) (u - log(1-e) + log e)
        log_1me = tl.log(1.0 - e)
        log_e = tl.log(e)
        loss = _sig(u) * (_ls(u) - log_1me) + _sig(-u) * (_ls(-u) - log_e)
        du = _sig(u) * _sig(-u) * (u - log_1me + log_e)
        total, terms, gc, gr = _add_term(EXO_PAIR, loss, beta * du, -beta * du,
                                  m, W, terms, inv_b, total, gc, gr)
    if (types >> APO_ZERO) & 1:
        sa = _sig(beta * zc)
        sb = _sig(beta * zr)
        total, terms, gc, gr = _add_term(APO_ZERO, 1.0 - sa + sb, -beta * sa * (1.0 - sa),
                                  beta * sb * (1.0 - sb), m, W, terms, inv_b, total, gc, gr)
    if (types >> APO_DOWN) & 1:
        sa = _sig(beta * zc)
        su = _sig(u)
        dzc = beta * (sa * (1.0 - sa) - su * (1.0 - su))
        total, terms, gc, gr = _add_term(APO_DOWN, sa + 1.0 - su, dzc, beta * su * (1.0 - su),
                                  m, W, terms, inv_b, total, gc, gr)
    if (types >> DISCOPOP) & 1:  # mu = s(u / tau)
        # d/du = mu (1-mu)/tau ls(u) - (1-mu) s(-u) + mu exp(-u) ((1-mu)/tau - 1)
        mu = _sig(u / tau)
        mexp = tl.exp(_ls(u / tau) - u)  # mu exp(-u) without inf * 0
        loss = (1.0 - mu) * -_ls(u) + mexp
        du = (mu * (1.0 - mu) / tau * _ls(u) - (1.0 - mu) * _sig(-u)
              + mexp * ((1.0 - mu) / tau - 1.0))
        total, terms, gc, gr = _add_term(DISCOPOP, loss, beta * du, -beta * du,
                                  m, W, terms, inv_b, total, gc, gr)
    if (types >> ORPO) & 1:  # -beta ls(lo), lo = a - b - log(-expm1 a) + log(-expm1 b)
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
        total, terms, gc, gr = _add_term(ORPO, -beta * _ls(lo), dc, dr,
                                  m, W, terms, inv_b, total, gc, gr)

    # SFT, also the nll metric. Per sequence: mean_i(-c_i / L_c_i), d/dc_i = -1 / (B L_c_i).
    # Token mean: -sum(c) / T, T = sft_tokens when > 0 (given from outside), else the chosen
    # tokens in the batch (>= 1, pass 1); d/dc_i = -1 / T.
    if SFT_PER_SEQUENCE:
        sums = _lane_add(sums, NLL, tl.sum(tl.where(m, c / lc, 0.0), axis=0), METRIC_LANES)
        dnll = -inv_b / lc
    else:
        dnll = tl.zeros((BLOCK_B,), dtype=tl.float32) - 1.0 / tokens
    if (types >> SFT) & 1:
        gc += tl.load(W + SFT) * dnll

    sums = _lane_add(sums, REWARDS_CHOSEN, tl.sum(tl.where(m, beta * zc, 0.0), axis=0),
                     METRIC_LANES)
    sums = _lane_add(sums, REWARDS_REJECTED, tl.sum(tl.where(m, beta * zr, 0.0), axis=0),
                     METRIC_LANES)
    sums = _lane_add(sums, REWARDS_ACCURACIES,
                     tl.sum(tl.where(m & (zc > zr), 1.0, 0.0), axis=0), METRIC_LANES)
    sums = _lane_add(sums, REWARDS_MARGINS, tl.sum(tl.where(m, u, 0.0), axis=0), METRIC_LANES)
    sums = _lane_add(sums, LOGPS_CHOSEN, tl.sum(tl.where(m, c, 0.0), axis=0), METRIC_LANES)
    sums = _lane_add(sums, LOGPS_REJECTED, tl.sum(tl.where(m, r, 0.0), axis=0), METRIC_LANES)
    tl.store(Coef + i, gc, mask=m)
    tl.store(Coef + B + i, gr, mask=m)
    return total, terms, sums


def segment_sums(logp, ref_logp, cu_seqlens, num_tokens):
    """(seq [S], ref_seq [S] or None) fp32: the sums over the S sequences of ``cu_seqlens``
    (int32 [S + 1]) of ``logp`` (and ``ref_logp``), fp32 [num_tokens]."""
    S = cu_seqlens.numel() - 1
    seq = torch.empty(S, device=logp.device, dtype=torch.float32)
    ref_seq = torch.empty_like(seq) if ref_logp is not None else None
    if S:
        _segment_sums_kernel[(S,)](
            logp, ref_logp if ref_logp is not None else logp, cu_seqlens, seq,
            ref_seq if ref_seq is not None else seq, num_tokens,
            HAS_REF=ref_logp is not None, BLOCK=TOKEN_BLOCK)
    return seq, ref_seq


def broadcast(g, cu_seqlens, num_tokens):
    """[num_tokens] fp32 with g[s] on every token of sequence s (zeros past cu_seqlens[-1])."""
    out = torch.zeros(num_tokens, device=g.device, dtype=torch.float32)
    if g.numel():
        _broadcast_kernel[(g.numel(),)](g, cu_seqlens, out, num_tokens, BLOCK=TOKEN_BLOCK)
    return out


def pair_terms(seq, ref_seq, count, delta, types, term_weights, beta, label_smoothing, tau,
               orpo_cap, sft_per_sequence=False, sft_tokens=0.0):
    """(loss [], out [NUM_METRICS + NUM_TERMS], coef [2B]) for the batch, fp32.

    ``seq``, ``ref_seq``, ``count`` are fp32 [2B] (chosen then rejected); ``delta`` a 1-element
    device tensor; ``types`` an int of term bits (a subset of ALL_TERMS); ``term_weights`` fp32
    [NUM_TERMS] on the device, indexed by bit (a host-to-device copy here would sync);
    ``orpo_cap`` the largest average log-prob ORPO takes (log(1 - exp(a)) needs a < 0);
    ``sft_per_sequence`` picks the SFT normalization (False: the token mean, over
    ``sft_tokens`` tokens when > 0, else over the batch's chosen tokens).
    ``out`` holds the metrics at their slots, then each term's batch mean at NUM_METRICS + bit
    (NaN for terms that are off).
    """
    B = seq.numel() // 2
    if B > MAX_PAIRS:
        raise ValueError(f"the fused epilogue takes at most {MAX_PAIRS} pairs, got {B}")
    if types & ~ALL_TERMS:
        raise ValueError(f"types has bits outside ALL_TERMS={ALL_TERMS:#x}: {types:#x}")
    dev = seq.device
    loss = torch.empty((), device=dev, dtype=torch.float32)
    out = torch.full((NUM_METRICS + NUM_TERMS,), float("nan"), device=dev)
    coef = torch.empty(2 * B, device=dev, dtype=torch.float32)
    _pair_terms_kernel[(1,)](
        seq, ref_seq, count, delta, term_weights, loss, out, out[NUM_METRICS:], coef,
        B, float(beta), float(label_smoothing), float(tau), float(orpo_cap), float(sft_tokens),
        TYPES=types, SFT_PER_SEQUENCE=bool(sft_per_sequence), BLOCK_B=PAIR_BLOCK)
    return loss, out, coef
