"""Single-pass group (MPOLoss(single_pass=True) on the Triton backend): log-probs and the
loss's gradients of a group of whole pairs in one pass over the vocabulary.

For the n scored tokens of the group (hidden rows H_g, targets y) and the head W [V, H]:

    1. Z = H_g @ W^T                      cuBLAS, fp32 [n, V]: the group's logits, kept
    2. `_row_stats_kernel` (grid: row blocks x vocab splits): Z = transform(Z + b) in place
       (softcap, 1/T), per split the online max/sum and the target logit; the launcher folds
       the splits: lse = logsumexp, z_y = sum  ->  logp = z_y - lse
    3. g = token_grad(logp)               the pairs' closed-form loss gradient (host, [n])
    4. `_row_grad_kernel` (grid: row blocks x vocab tiles): D = g (onehot - exp(z - lse)) dz/da,
       the target column g (1 - p_y) formed in fp32, stored in the input dtype
    5. dH rows = D @ W;  dW += D^T @ H_g (a vocab chunk at a time);  db += column sums of D
                                          cuBLAS with fp32 results

FLOPs: 2nHV + 2nHV + 2nHV; no recompute. D is rounded to the input dtype only as a product
operand, as the two-pass backward's dZ; for fp16 the gradient is scaled by 2^-e (e the
exponent of max|g|) before the rounding and unscaled after the products, as there.

Workspace per token: V * (4 + itemsize) bytes (Z and D) and H * 8 (dH, its product); per
call one fp32 [8192, H] dW chunk. `group_tokens` sizes the groups to MPO_FAST_WORKSPACE_MB.

Block sizes: 8 x 256 fp32 tiles at 4 warps on a GPU (memory-bound sweeps; compiled for sm_90
they take 116 / 80 registers, where 16 x 256 took 244 / 152 and would halve the resident
warps), 16 x 32 under the interpreter; vocab splits so that row blocks x splits fill the SMs
four times over.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .logprob_backward import _accumulate_mm, workspace_bytes
from .tl_utils import interpreting, multiprocessor_count, tanh

_DW_CHUNK = 8192


@triton.jit(do_not_specialize=["n", "v_per_split"])
def _row_stats_kernel(
    Z_ptr, B_ptr, Y_ptr, LSE_ptr, ZY_ptr,
    n, V, stride_z, v_per_split, inv_temp, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n
    y = tl.load(Y_ptr + rows, mask=row_mask, other=-1).to(tl.int64)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    s_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    zy = tl.zeros((BLOCK_M,), dtype=tl.float32)
    v_start = pid_s.to(tl.int64) * v_per_split
    v_end = tl.minimum(v_start + v_per_split, V)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        col_mask = cols < v_end
        mask = row_mask[:, None] & col_mask[None, :]
        ptrs = Z_ptr + rows[:, None] * stride_z + cols[None, :]
        a = tl.load(ptrs, mask=mask, other=0.0)
        if HAS_BIAS:
            a += tl.load(B_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        if HAS_SOFTCAP:
            a = softcap * tanh(a / softcap)
        z = a * inv_temp
        tl.store(ptrs, z, mask=mask)  # the kept logits, transformed once
        z = tl.where(col_mask[None, :], z, float("-inf"))
        zy += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), axis=1)
        m_new = tl.maximum(m_i, tl.max(z, axis=1))
        s_i = s_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m_i = m_new
    out = pid_s.to(tl.int64) * n + rows
    tl.store(LSE_ptr + out, m_i + tl.log(s_i), mask=row_mask)
    tl.store(ZY_ptr + out, zy, mask=row_mask)


@triton.jit(do_not_specialize=["n"])
def _row_grad_kernel(
    Z_ptr, D_ptr, Y_ptr, LSE_ptr, G_ptr,
    n, V, stride_z, stride_d, inv_temp, softcap,
    HAS_SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = rows < n
    col_mask = cols < V
    mask = row_mask[:, None] & col_mask[None, :]
    y = tl.load(Y_ptr + rows, mask=row_mask, other=-1).to(tl.int64)
    lse = tl.load(LSE_ptr + rows, mask=row_mask, other=0.0)
    g = tl.load(G_ptr + rows, mask=row_mask, other=0.0)
    z = tl.load(Z_ptr + rows[:, None] * stride_z + cols[None, :], mask=mask, other=0.0)
    onehot = tl.where(cols[None, :] == y[:, None], 1.0, 0.0)
    d = g[:, None] * (onehot - tl.exp(z - lse[:, None])) * inv_temp  # fp32: 1 - p_y exact
    if HAS_SOFTCAP:
        u = z * (1.0 / (softcap * inv_temp))  # tanh(a / softcap)
        d = d * (1.0 - u * u)
    tl.store(D_ptr + rows[:, None] * stride_d + cols[None, :], d.to(D_ptr.dtype.element_ty),
             mask=mask)


def group_tokens(V: int, H: int, dtype: torch.dtype, softcap: bool, budget: int | None = None
                 ) -> int:
    """Tokens of a group whose Z, D, dH and its product fit the workspace (at least 1)."""
    budget = workspace_bytes() if budget is None else budget
    item = torch.finfo(dtype).bits // 8
    fixed = 4 * min(V, _DW_CHUNK) * H
    return max(1, (budget - fixed) // (V * (4 + item) + 8 * H))


def _blocks(device: torch.device) -> tuple[int, int]:
    return (16, 32) if interpreting() or device.type != "cuda" else (8, 256)


def _split_add(hi: torch.Tensor, lo: torch.Tensor, x: torch.Tensor) -> None:
    """hi + lo += x (fp32 x, consumed): hi the rounded sum in the weight's dtype, lo the
    remainder (mpo_fast.torch_backend.split_add; kernels/ imports nothing from mpo_fast)."""
    s = x.add_(hi.to(x.dtype)).add_(lo.to(x.dtype))
    hi.copy_(s)
    lo.copy_(s.sub_(hi.to(s.dtype)))


def single_pass_group(hidden, weight, bias, rows, targets, inv_temp, softcap, token_grad,
                      grads, dw_accum=None):
    """One group of whole pairs (module doc): `mpo_fast.torch_backend.single_pass_group`'s
    contract. `grads` = (gh [N, H] in hidden's dtype, gw [V, H] or None, gb [V] fp32 or
    None); `dw_accum` None (dW summed in gw), an fp32 [V, H] buffer, or a remainder buffer of
    gw's dtype (a split sum). Returns logp [n] fp32."""
    gh, gw, gb = grads
    (V, H), n = weight.shape, rows.numel()
    dev, dtype, f32 = hidden.device, hidden.dtype, torch.float32
    block_m, block_v = _blocks(dev)
    hc = hidden.index_select(0, rows)
    z = torch.zeros((n, V), device=dev, dtype=f32)
    _accumulate_mm(z, hc, weight.T)

    sms = multiprocessor_count(dev.index or 0) if dev.type == "cuda" else 4
    row_blocks = triton.cdiv(n, block_m)
    splits = max(1, min(triton.cdiv(4 * sms, row_blocks), triton.cdiv(V, 4 * block_v)))
    v_per_split = triton.cdiv(triton.cdiv(V, splits), block_v) * block_v
    splits = triton.cdiv(V, v_per_split)
    lse = torch.empty((splits, n), device=dev, dtype=f32)
    zy = torch.empty_like(lse)
    _row_stats_kernel[(row_blocks, splits)](
        z, bias if bias is not None else weight, targets, lse, zy,
        n, V, z.stride(0), v_per_split, inv_temp, softcap or 1.0,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
        BLOCK_M=block_m, BLOCK_V=block_v, num_warps=4)
    lse, zy = torch.logsumexp(lse, dim=0), zy.sum(dim=0)
    logp = zy - lse

    g = token_grad(logp).to(f32).contiguous()
    unscale = None
    if dtype == torch.float16:  # keep D in fp16's normal range (logprob_backward's doc)
        exponent = torch.frexp(g.abs().amax())[1]
        g = torch.ldexp(g, -exponent)
        unscale = torch.ldexp(torch.ones((), device=dev), exponent)
    d = torch.empty((n, V), device=dev, dtype=dtype)
    _row_grad_kernel[(row_blocks, triton.cdiv(V, block_v))](
        z, d, targets, lse, g, n, V, z.stride(0), d.stride(0), inv_temp, softcap or 1.0,
        HAS_SOFTCAP=softcap is not None, BLOCK_M=block_m, BLOCK_V=block_v, num_warps=4)
    del z

    if gh is not None:
        dh = torch.zeros((n, H), device=dev, dtype=f32)
        _accumulate_mm(dh, d, weight)
        if unscale is not None:
            dh.mul_(unscale)
        gh.index_copy_(0, rows, dh.to(gh.dtype))
    for v0 in range(0, V if gw is not None else 0, _DW_CHUNK):
        v1 = min(v0 + _DW_CHUNK, V)
        if dw_accum is not None and dw_accum.dtype == f32 and unscale is None:
            _accumulate_mm(dw_accum[v0:v1], d[:, v0:v1].T, hc)
            continue
        x = torch.zeros((v1 - v0, H), device=dev, dtype=f32)
        _accumulate_mm(x, d[:, v0:v1].T, hc)
        if unscale is not None:
            x.mul_(unscale)
        if dw_accum is not None and dw_accum.dtype == f32:
            dw_accum[v0:v1] += x
        elif dw_accum is not None:
            _split_add(gw[v0:v1], dw_accum[v0:v1], x)
        else:
            gw[v0:v1] += x.to(gw.dtype)
    if gb is not None:
        db = d.sum(dim=0, dtype=f32)
        gb += db if unscale is None else db.mul_(unscale)
    return logp
