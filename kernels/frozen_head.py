"""Frozen-head forward: log-probs and E = d logp / d hidden in one pass over the vocabulary.

For a head whose weight and bias take no gradient (LoRA), the backward only needs

    E_m = c_y W[y_m] - sum_v p_mv c_v W[v]         p = softmax(z), c_v = dz_v / da_v

(c_v = 1/T, times 1 - tanh^2(a_v / softcap) under a softcap), so dH[r_m] = g_m E_m for any
upstream gradient g and the vocabulary is never visited again. The sum is attention with
K = V = W, accumulated over vocab slabs with flash-attention's online softmax. For each slab
of S vocab rows [v0, v0 + S):

    1. A   = H_rows @ W[v0:v0+S]^T               cuBLAS, fp32 result [M, S]
    2. `_slab_softmax_kernel` (one program per BLOCK_M rows, two sweeps over the slab):
           z = transform(A + b);  m' = max(m, max_v z);  alpha = exp(m - m');
           s = alpha s + sum_v exp(z - m');  P = exp(z - m') (1 - tanh^2)  (input dtype);
           the target logit picked from the slab that holds it
    3. E   = alpha E + P @ W[v0:v0+S]             cuBLAS into an fp32 [M, H] accumulator
    then lse = m + log s and E = c_y W[y] - E / (T s).

FLOPs: 2MHV (logits) + 2MHV (P @ W) on tensor cores for half-precision inputs, against
2 + 2 + 2 for the forward, the recompute and dH of the two-pass path. P is rounded to the
input dtype only as a product operand (like the backward's dZ); |P| <= 1, so fp16 keeps the
softmax tail down to its smallest normal, 6e-5 of the row's largest probability.

Workspace: A [M, S] fp32 and P [M, S] in the input dtype, S = the largest multiple of 256 with
M * S * (4 + itemsize) <= MPO_FAST_WORKSPACE_MB (default 256 MiB), at least 256, at most V
(rounded up); plus the fp32 E [M, H] (an output: it is kept for the backward) and O(M) row
statistics.

Block sizes: BLOCK_M x BLOCK_V = 16 x 256 fp32 on a GPU (a 16 KiB tile, 32 values a thread at
4 warps: the kernel is a memory-bound sweep of A), 16 x 32 under the interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import logprob_backward
from .logprob_backward import _accumulate_mm
from .tl_utils import interpreting, tanh


@triton.jit
def _transformed(A_ptr, B_ptr, rows, row_mask, stride_a, cols, col_mask, v_begin, inv_temp,
                 softcap, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """z = transform(A + b) for a [BLOCK_M, BLOCK_V] tile; -inf outside the slab."""
    mask = row_mask[:, None] & col_mask[None, :]
    a = tl.load(A_ptr + rows[:, None] * stride_a + cols[None, :], mask=mask, other=0.0)
    if HAS_BIAS:
        a += tl.load(B_ptr + v_begin + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_SOFTCAP:
        a = softcap * tanh(a / softcap)
    return tl.where(col_mask[None, :], a * inv_temp, float("-inf"))


@triton.jit(do_not_specialize=["M", "v_begin", "v_count"])
def _slab_softmax_kernel(
    A_ptr, B_ptr, Y_ptr, P_ptr, Max_ptr, Sum_ptr, Alpha_ptr, ZY_ptr,
    M, v_begin, v_count, stride_a, stride_p, inv_temp, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    y = tl.load(Y_ptr + rows, mask=row_mask, other=-1).to(tl.int64)
    m_old = tl.load(Max_ptr + rows, mask=row_mask, other=0.0)
    zy = tl.load(ZY_ptr + rows, mask=row_mask, other=0.0)

    # sweep 1: the row maximum over this slab, and the target logit if it is here
    m_new = m_old
    for c0 in range(0, v_count, BLOCK_V):
        cols = c0 + tl.arange(0, BLOCK_V)
        col_mask = cols < v_count
        z = _transformed(A_ptr, B_ptr, rows, row_mask, stride_a, cols, col_mask, v_begin,
                         inv_temp, softcap, HAS_BIAS, HAS_SOFTCAP)
        m_new = tl.maximum(m_new, tl.max(z, axis=1))
        hit = (v_begin + cols)[None, :] == y[:, None]
        zy += tl.sum(tl.where(hit, z, 0.0), axis=1)
    alpha = tl.exp(m_old - m_new)

    # sweep 2: rescaled running sum, and P = exp(z - m') dz/da (without the 1/T) stored
    s = tl.load(Sum_ptr + rows, mask=row_mask, other=0.0) * alpha
    for c0 in range(0, v_count, BLOCK_V):
        cols = c0 + tl.arange(0, BLOCK_V)
        col_mask = cols < v_count
        z = _transformed(A_ptr, B_ptr, rows, row_mask, stride_a, cols, col_mask, v_begin,
                         inv_temp, softcap, HAS_BIAS, HAS_SOFTCAP)
        p = tl.exp(z - m_new[:, None])
        s += tl.sum(p, axis=1)
        if HAS_SOFTCAP:
            # tanh(a / softcap), 0 outside the slab (where z = -inf and p = 0)
            u = tl.where(col_mask[None, :], z, 0.0) * (1.0 / (softcap * inv_temp))
            p = p * (1.0 - u * u)
        mask = row_mask[:, None] & col_mask[None, :]
        tl.store(P_ptr + rows[:, None] * stride_p + cols[None, :],
                 p.to(P_ptr.dtype.element_ty), mask=mask)

    tl.store(Max_ptr + rows, m_new, mask=row_mask)
    tl.store(Sum_ptr + rows, s, mask=row_mask)
    tl.store(Alpha_ptr + rows, alpha, mask=row_mask)
    tl.store(ZY_ptr + rows, zy, mask=row_mask)


def slab_rows(M: int, V: int, itemsize: int) -> int:
    """Vocab rows per slab: A (fp32) and P (input dtype), M x S each, fit the workspace."""
    return logprob_backward.slab_rows(M, V, 4 + itemsize)


def forward_frozen(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rows: torch.Tensor,
    targets: torch.Tensor,
    inv_temp: float,
    softcap: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lse [M], z_target [M], E [M, H]), all fp32, for the M hidden rows `rows` (int64)."""
    M, (V, H) = rows.numel(), weight.shape
    dev, dtype = hidden.device, hidden.dtype
    f32 = torch.float32
    lse = torch.full((M,), float("-inf"), device=dev, dtype=f32)  # the running max, then lse
    total = torch.zeros(M, device=dev, dtype=f32)
    zy = torch.zeros(M, device=dev, dtype=f32)
    E = torch.zeros((M, H), device=dev, dtype=f32)
    if M == 0:
        return lse, zy, E
    h_rows = hidden if M == hidden.shape[0] else hidden.index_select(0, rows)
    S = slab_rows(M, V, hidden.element_size())
    A = torch.empty((M, S), device=dev, dtype=f32)
    P = torch.empty((M, S), device=dev, dtype=dtype)
    alpha = torch.empty(M, device=dev, dtype=f32)
    block_m, block_v = (16, 32) if interpreting() or not hidden.is_cuda else (16, 256)
    grid = (triton.cdiv(M, block_m),)
    for v0 in range(0, V, S):
        count = min(S, V - v0)
        w = weight[v0:v0 + count]
        a = A[:, :count].zero_()
        _accumulate_mm(a, h_rows, w.T)
        _slab_softmax_kernel[grid](
            A, bias if bias is not None else weight, targets, P, lse, total, alpha, zy,
            M, v0, count, A.stride(0), P.stride(0), inv_temp, softcap or 1.0,
            HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
            BLOCK_M=block_m, BLOCK_V=block_v, num_warps=4)
        E.mul_(alpha[:, None])
        _accumulate_mm(E, P[:, :count], w)
    lse.add_(total.log())
    c_y = torch.full_like(zy, inv_temp)
    if softcap is not None:
        c_y.mul_(1.0 - (zy / (softcap * inv_temp)) ** 2)
    w_y = weight.index_select(0, targets).to(f32).mul_(c_y[:, None])
    return lse, zy, w_y.sub_(E.mul_((inv_temp / total)[:, None]))
