"""The chunked PyTorch backend: the fused head's algorithm in plain torch ops, on any device.

Same math as the Triton kernels (kernels/logprob_forward.py, kernels/logprob_backward.py),
computed one (token chunk x vocab chunk) tile at a time, with the logits recomputed in the
backward instead of stored:

    forward   for each token chunk, for each vocab chunk: tile = h W^T (+b) -> softcap ->
              / T; keep the running log-sum-exp and pick out the target logit.
    backward  for each vocab chunk, for each token chunk: recompute the tile, turn it into
              da = g (onehot - softmax) dz/da in place, then dH += da W_c, dW_c += da^T h,
              db_c += sum(da).

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


def _logits(hc, weight, bias, v0, v1, acc, inv_temp, softcap):
    """Tile z = transform(hc @ W[v0:v1].T + b[v0:v1]) in `acc` precision, plus tanh tile or None."""
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
