"""The chunked PyTorch backend: the fused head's algorithm in plain torch ops, on any device.

Same math as the Triton kernels (kernels/logprob_forward.py, kernels/logprob_backward.py),
computed one (token chunk x vocab chunk) tile at a time, with the logits recomputed in the
backward instead of stored:

    forward   for each token chunk, for each vocab chunk: tile = h W^T (+b) -> softcap ->
              / T; keep the running log-sum-exp and pick out the target logit.
    backward  for each vocab chunk, for each token chunk: recompute the tile, turn it into
              da = g (onehot - softmax) dz/da in place, then dH += da W_c, dW_c += da^T h,
              db_c += sum(da).

and the one-pass modes (docs/DESIGN.md §3.1.4, §3.2.2):

    forward_frozen     a frozen head: the forward also returns E = d logp / d hidden,
                       accumulated with an online softmax over vocab chunks
    single_pass_group  a group of whole pairs: kept logits, log-probs, the pairs' gradient,
                       dZ, dH, dW and db in one pass (`group_tokens` sizes the group)

Workspace bound (what exists beyond inputs, outputs, gradients and O(M) vectors): the tile
[tc, vc] (twice with softcap in the backward), the fp32 copy of the hidden chunk [tc, H], the
product da @ W_c [tc, H], the fp32 copy of the weight chunk [vc, H] (half-precision weights
only) and the fp32 dW chunk [vc, H]. `plan_chunks` picks tc and vc so that these fit in
`workspace_bytes` (default 256 MiB, env MPO_FAST_WORKSPACE_MB); the smallest chunk it will go
to is 64 tokens x 128 vocab rows. Accumulation is fp32 (fp64 for fp64 inputs, so gradcheck
works); dH is accumulated in that precision over [N, H] and cast once at the end.
"""

from __future__ import annotations

import os

import torch

DEFAULT_WORKSPACE_BYTES = 256 * 2**20
_MAX_TOKEN_CHUNK = 4096
_MIN_TOKEN_CHUNK = 64
_MIN_VOCAB_CHUNK = 128


def workspace_bytes() -> int:
    mb = os.environ.get("MPO_FAST_WORKSPACE_MB")
    return int(float(mb) * 2**20) if mb else DEFAULT_WORKSPACE_BYTES


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def plan_chunks(
    M: int, V: int, H: int, dtype: torch.dtype, softcap: bool, budget: int | None = None
) -> tuple[int, int]:
    """(token chunk, vocab chunk) whose temporaries fit in `budget` bytes (see module doc)."""
    budget = workspace_bytes() if budget is None else budget
    item = torch.finfo(accum_dtype(dtype)).bits // 8
    tiles = 2 if softcap else 1
    weight_copies = 1 if dtype == accum_dtype(dtype) else 2  # dW chunk (+ upcast weight chunk)
    tc = max(1, min(M, _MAX_TOKEN_CHUNK))
    while True:
        per_vocab_row = item * (tiles * tc + weight_copies * H)
        vc = (budget - 2 * item * tc * H) // per_vocab_row
        if vc >= min(V, 4 * _MIN_VOCAB_CHUNK) or tc <= _MIN_TOKEN_CHUNK:
            break
        tc = max(_MIN_TOKEN_CHUNK, tc // 2)
    vc = max(_MIN_VOCAB_CHUNK, vc // _MIN_VOCAB_CHUNK * _MIN_VOCAB_CHUNK)
    return tc, min(vc, V)


def tensor_core_products(hidden: torch.Tensor) -> bool:
    """Whether the one-pass modes (`forward_frozen`, `single_pass_group`) keep half-precision
    operands for their products (cuBLAS on CUDA, fp32 results: logits stay fp32, and dZ / P
    are rounded to the input dtype only as the operand of a product, as the Triton backward's
    DA is). Elsewhere every product is fp32 (fp64), the exact twin the CPU tests hold."""
    return hidden.is_cuda and hidden.dtype in (torch.float16, torch.bfloat16)


def _mm32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b in fp32 (fp64) from operands of any precision: where `b` is half precision,
    `a` is rounded to it and the product is accumulated and returned in fp32 (cuBLAS
    out_dtype on CUDA; an upcast elsewhere)."""
    if a.dtype == b.dtype and b.dtype in (torch.float32, torch.float64):
        return a @ b
    a = a.to(b.dtype)
    if a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError):  # torch < 2.8: no fp32 output for half operands
            pass
    return a.float() @ b.float()


def _logits(hc, weight, bias, v0, v1, acc, inv_temp, softcap, half_operands=False):
    """Tile z = transform(hc @ W[v0:v1].T + b[v0:v1]) in `acc` precision, plus tanh tile or None.

    With `half_operands` hc and the returned weight chunk stay in the input dtype (products
    through `_mm32`); otherwise both are `acc`."""
    if half_operands:
        wc = weight[v0:v1]
        a = _mm32(hc, wc.T)
        if bias is not None:
            a += bias[v0:v1].to(acc)
        if softcap is None:
            return (a if inv_temp == 1.0 else a.mul_(inv_temp)), None, wc
        t = a.div_(softcap).tanh_()
        return t * (softcap * inv_temp), t, wc
    wc = weight[v0:v1].to(acc)
    if bias is not None:
        a = torch.addmm(bias[v0:v1].to(acc), hc, wc.T)
    else:
        a = hc @ wc.T
    if softcap is None:
        return (a if inv_temp == 1.0 else a.mul_(inv_temp)), None, wc
    t = a.div_(softcap).tanh_()
    return t * (softcap * inv_temp), t, wc


def _target_columns(y, v0, v1):
    """(column of each target in the tile [v0, v1), clamped into it; whether it is really there)."""
    local = y - v0
    return local.clamp(0, v1 - v0 - 1), (local >= 0) & (local < v1 - v0)


def forward(hidden, weight, bias, rows, targets, inv_temp, softcap, budget=None):
    """(lse, z_target) [M] for hidden rows `rows` (int64) with `targets`; fp32 (fp64 for fp64)."""
    M, (V, H) = rows.numel(), weight.shape
    acc = accum_dtype(hidden.dtype)
    lse = torch.empty(M, device=hidden.device, dtype=acc)
    zy = torch.empty(M, device=hidden.device, dtype=acc)
    tc, vc = plan_chunks(M, V, H, hidden.dtype, softcap is not None, budget)
    for t0 in range(0, M, tc):
        r, y = rows[t0:t0 + tc], targets[t0:t0 + tc]
        hc = hidden.index_select(0, r).to(acc)
        run = torch.full((r.numel(),), float("-inf"), device=hidden.device, dtype=acc)
        zy_c = torch.zeros_like(run)
        for v0 in range(0, V, vc):
            v1 = min(v0 + vc, V)
            z, _, _ = _logits(hc, weight, bias, v0, v1, acc, inv_temp, softcap)
            col, inside = _target_columns(y, v0, v1)
            picked = z.gather(1, col[:, None]).squeeze(1)
            zy_c = torch.where(inside, picked, zy_c)
            m = z.amax(dim=1, keepdim=True)
            tile_lse = m.squeeze(1) + z.sub_(m).exp_().sum(dim=1).log_()
            run = torch.logaddexp(run, tile_lse)
            del z  # free the tile before the next one is made: one tile alive, not two
        lse[t0:t0 + tc] = run
        zy[t0:t0 + tc] = zy_c
    return lse, zy


def forward_frozen(hidden, weight, bias, rows, targets, inv_temp, softcap, budget=None):
    """(lse, z_target, E) for a frozen head: `forward` plus E [M, H] = d logp / d hidden.

    With p = softmax(z) and c_v = dz_v/da_v (inv_temp, times 1 - tanh^2 under a softcap),

        E_m = c_y W[y_m] - sum_v p_mv c_v W[v]

    so that a backward with upstream gradient g is dH[r_m] = g_m E_m: no pass over the
    vocabulary after the forward (the head's weight and bias need no gradient). The sum is
    attention with K = V = W, accumulated like flash-attention's output: per vocab chunk,
    rescale the running numerator by exp(m_old - m_new) and add exp(z - m_new) c @ W_c; divide
    by the running sum at the end. Workspace: `forward`'s, plus the [tc, H] numerator; E
    itself is an fp32 (fp64) [M, H] output, kept for the backward.
    """
    M, (V, H) = rows.numel(), weight.shape
    dev, acc = hidden.device, accum_dtype(hidden.dtype)
    lse = torch.empty(M, device=dev, dtype=acc)
    zy = torch.empty(M, device=dev, dtype=acc)
    E = torch.empty((M, H), device=dev, dtype=acc)
    tc, vc = plan_chunks(M, V, H, hidden.dtype, softcap is not None, budget)
    cap = None if softcap is None else softcap * inv_temp  # z = cap * tanh(a / softcap)
    fast = tensor_core_products(hidden)
    for t0 in range(0, M, tc):
        r, y = rows[t0:t0 + tc], targets[t0:t0 + tc]
        hc = hidden.index_select(0, r)
        hc = hc if fast else hc.to(acc)
        m = torch.full((r.numel(),), float("-inf"), device=dev, dtype=acc)
        s = torch.zeros_like(m)
        num = torch.zeros((r.numel(), H), device=dev, dtype=acc)
        zy_c = torch.zeros_like(m)
        for v0 in range(0, V, vc):
            v1 = min(v0 + vc, V)
            z, t, wc = _logits(hc, weight, bias, v0, v1, acc, inv_temp, softcap, fast)
            col, inside = _target_columns(y, v0, v1)
            zy_c = torch.where(inside, z.gather(1, col[:, None]).squeeze(1), zy_c)
            m_new = torch.maximum(m, z.amax(dim=1))
            scale = (m - m_new).exp_()
            p = z.sub_(m_new[:, None]).exp_()  # unnormalized probabilities, in place
            s = s * scale + p.sum(dim=1)
            if t is not None:
                p.mul_(t.square_().neg_().add_(1.0))
            num.mul_(scale[:, None]).add_(_mm32(p, wc))
            m = m_new
            del z, t, p
        c_y = torch.full_like(zy_c, inv_temp)
        if cap is not None:
            c_y = c_y * (1 - (zy_c / cap) ** 2)
        w_y = weight.index_select(0, y).to(acc)
        E[t0:t0 + tc] = w_y.mul_(c_y[:, None]).sub_(num.div_(s[:, None]).mul_(inv_temp))
        lse[t0:t0 + tc] = m + s.log()
        zy[t0:t0 + tc] = zy_c
    return lse, zy, E


def backward(hidden, weight, bias, rows, targets, lse, grad, inv_temp, softcap, needs,
                     budget=None):
    """(d hidden [N, H], d weight [V, H], d bias [V]) in the input dtypes, None where not needed."""
    need_h, need_w, need_b = needs
    M, (V, H) = rows.numel(), weight.shape
    dev, acc = hidden.device, accum_dtype(hidden.dtype)
    gh = torch.zeros((hidden.shape[0], H), device=dev, dtype=acc) if need_h else None
    gw = torch.zeros((V, H), device=dev, dtype=weight.dtype) if need_w else None
    gb = torch.zeros(V, device=dev, dtype=acc) if need_b else None
    tc, vc = plan_chunks(M, V, H, hidden.dtype, softcap is not None, budget)
    direct = need_w and weight.dtype == acc  # fp32 (fp64) weights: accumulate into the output
    for v0 in range(0, V if M else 0, vc):
        v1 = min(v0 + vc, V)
        gw_c = gw[v0:v1] if direct else (torch.zeros((v1 - v0, H), device=dev, dtype=acc)
                                         if need_w else None)
        for t0 in range(0, M, tc):
            r, y = rows[t0:t0 + tc], targets[t0:t0 + tc]
            g = grad[t0:t0 + tc].to(acc)
            hc = hidden.index_select(0, r).to(acc)
            z, t, wc = _logits(hc, weight, bias, v0, v1, acc, inv_temp, softcap)
            # da = g * (onehot - p) * dz/da, built in place in the tile
            da = z.sub_(lse[t0:t0 + tc, None]).exp_().mul_(-g[:, None])
            col, inside = _target_columns(y, v0, v1)
            da.scatter_add_(1, col[:, None], torch.where(inside, g, 0.0)[:, None])
            if t is not None:
                da.mul_(t.square_().neg_().add_(1.0))
            if inv_temp != 1.0:
                da.mul_(inv_temp)
            if need_h:
                gh.index_add_(0, r, da @ wc)
            if need_w:
                gw_c.addmm_(da.T, hc)
            if need_b:
                gb[v0:v1] += da.sum(dim=0)
            del z, t, da  # one tile alive at a time (see the workspace bound above)
        if need_w and not direct:
            gw[v0:v1].copy_(gw_c)
    cast = lambda x, dt: None if x is None else x.to(dt)
    return cast(gh, hidden.dtype), gw, cast(gb, weight.dtype)


def group_tokens(V: int, H: int, dtype: torch.dtype, softcap: bool, budget: int | None = None
                 ) -> int:
    """Tokens whose kept logits fit `budget` in `single_pass_group` (at least 1).

    Per token: the fp32 (fp64) logits row [V] (twice with a softcap: the tanh' factor), the
    hidden row and its dH row [H] each; plus one weight chunk [vc, H] upcast (half weights).
    """
    budget = workspace_bytes() if budget is None else budget
    item = torch.finfo(accum_dtype(dtype)).bits // 8
    tiles = 2 if softcap else 1
    fixed = 2 * item * min(V, 4 * _MIN_VOCAB_CHUNK * 8) * H
    return max(1, (budget - fixed) // (item * (tiles * V + 2 * H)))


def split_add(hi: torch.Tensor, lo: torch.Tensor, x: torch.Tensor) -> None:
    """hi + lo += x (x fp32, consumed): hi, in the weight's half-precision dtype, is the sum
    rounded; lo, the same dtype, the remainder. Together ~16 mantissa bits for bf16, so many
    additions cost about one rounding, at half the memory of an fp32 accumulator; hi alone is
    the result (|lo| is below half an ulp of hi)."""
    s = x.add_(hi.to(x.dtype)).add_(lo.to(x.dtype))
    hi.copy_(s)
    lo.copy_(s.sub_(hi.to(s.dtype)))


def single_pass_group(hidden, weight, bias, rows, targets, inv_temp, softcap, token_grad,
                      grads, dw_accum=None):
    """One group of whole pairs in one pass over the vocabulary: log-probs and gradients.

        z      = transform(h W^T + b)          [n, V] fp32, kept (the group's whole logits)
        logp   = z_y - logsumexp(z)            -> g = token_grad(logp): dL/dlogp per token
        dZ     = g (onehot - softmax(z))       in place; the target column is g (1 - p_y),
                                               formed in fp32 (no 1 - p_y cancellation)
        dA     = dZ * dz/da                    (1/T, times 1 - tanh^2 under a softcap)
        dH[r]  = dA W      dW += dA^T h      db += sum_rows dA

    `grads` = (gh [N, H] in hidden's dtype, gw [V, H] or None, gb [V] fp32 or None): dH rows
    are written (each token's row is complete after its group), dW and db accumulated: in gw's
    dtype, or with `dw_accum` an fp32 [V, H] buffer (dW summed there, exact) or a buffer of
    gw's dtype (the low half of a split sum, `split_add`).
    Returns logp [n] (fp32; fp64 for fp64 inputs).
    """
    gh, gw, gb = grads
    (V, H), n = weight.shape, rows.numel()
    dev, acc = hidden.device, accum_dtype(hidden.dtype)
    vc = min(V, 4 * _MIN_VOCAB_CHUNK * 8)
    fast = tensor_core_products(hidden)
    hc = hidden.index_select(0, rows)
    hc = hc if fast else hc.to(acc)
    z = torch.empty((n, V), device=dev, dtype=acc)
    for v0 in range(0, V, vc):
        z[:, v0:v0 + vc] = _logits(hc, weight, bias, v0, min(v0 + vc, V), acc, inv_temp,
                                   softcap, fast)[0]
    m = z.amax(dim=1)
    s = torch.zeros_like(m)
    for v0 in range(0, V, vc):  # chunked: torch.logsumexp would allocate a second [n, V]
        s += (z[:, v0:v0 + vc] - m[:, None]).exp_().sum(dim=1)
    lse = m + s.log()
    logp = z.gather(1, targets[:, None]).squeeze(1) - lse
    g = token_grad(logp).to(acc)
    chain = None
    if softcap is not None:  # dz/da = (1 - tanh^2) / T with tanh = z / (softcap / T)
        chain = (z / (softcap * inv_temp)).square_().neg_().add_(1.0)
    da = z.sub_(lse[:, None]).exp_().mul_(-g[:, None])
    da.scatter_add_(1, targets[:, None], g[:, None])
    if chain is not None:
        da.mul_(chain)
        del chain
    if inv_temp != 1.0:
        da.mul_(inv_temp)
    dh = torch.zeros((n, H), device=dev, dtype=acc) if gh is not None else None
    for v0 in range(0, V, vc):
        v1 = min(v0 + vc, V)
        d = da[:, v0:v1]
        if dh is not None:
            dh += _mm32(d, weight[v0:v1] if fast else weight[v0:v1].to(acc))
        if dw_accum is not None and dw_accum.dtype == acc:
            dw_accum[v0:v1] += _mm32(d.T, hc)
        elif dw_accum is not None:
            split_add(gw[v0:v1], dw_accum[v0:v1], _mm32(d.T, hc))
        elif gw is not None:
            gw[v0:v1] += _mm32(d.T, hc).to(gw.dtype)
        if gb is not None:
            gb[v0:v1] += d.sum(dim=0)
    if gh is not None:
        gh.index_copy_(0, rows, dh.to(gh.dtype))
    return logp
