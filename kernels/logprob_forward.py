"""Forward kernel: log-sum-exp over the vocabulary and the target logit, never storing logits.

For each non-ignored token m (hidden row r_m, target y_m):

    a_mv = h_{r_m} . w_v (+ b_v)                    fp32 accumulation over H
    z_mv = (softcap * tanh(a_mv / softcap)) / T     (softcap optional)
    lse_m = log sum_v exp(z_mv)                     online max/sum over vocab tiles
    zy_m  = z_{m, y_m}                              picked out of the tile that holds y_m
    log p(y_m) = zy_m - lse_m

Parallelism: a program owns BLOCK_N tokens and one contiguous *split* of the vocabulary, so
the grid is (token blocks) x (vocab splits) and fills the GPU even when few tokens are left.
By default the token block varies fastest: the programs resident at one time sweep the same
few weight panels (kernels/configs.py has the measured alternatives). Each split writes its
partial (lse, zy) to a [splits, M] fp32 buffer; the launcher folds the splits with a logsumexp
and a sum (O(M) memory, no locks, deterministic).

Block sizes (kernels/configs.py says which and why): BLOCK_N x BLOCK_V is the fp32 logits tile
kept in registers (128 x 256 bf16 on Hopper); BLOCK_K is the slice of H streamed per `tl.dot`
(64: a 128-byte bf16 row segment). The token count M is not specialized on, so a new batch
size never recompiles.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import configs
from .tl_utils import dot_precision, logits_tile, multiprocessor_count, must_upcast, tanh


@triton.jit(do_not_specialize=["M"])
def _logprob_fwd_kernel(
    H_ptr, W_ptr, B_ptr, Rows_ptr, Y_ptr, LSE_ptr, ZY_ptr,
    M, V, Hdim, stride_h, stride_w, v_per_split,
    inv_temp, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, SPLIT_FASTEST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    if SPLIT_FASTEST:
        pid_s = tl.program_id(0)
        pid_n = tl.program_id(1)
    else:
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < M
    rows = tl.load(Rows_ptr + offs_n, mask=n_mask, other=0).to(tl.int64)
    y = tl.load(Y_ptr + offs_n, mask=n_mask, other=-1).to(tl.int64)

    m_i = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s_i = tl.zeros((BLOCK_N,), dtype=tl.float32)
    zy = tl.zeros((BLOCK_N,), dtype=tl.float32)
    v_start = pid_s.to(tl.int64) * v_per_split
    v_end = tl.minimum(v_start + v_per_split, V)
    for v0 in range(v_start, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        v_mask = offs_v < v_end
        z = logits_tile(H_ptr, rows, n_mask, stride_h, W_ptr, offs_v, v_mask, stride_w, B_ptr,
                        Hdim, HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_K, UPCAST, DOT_PRECISION)
        if HAS_SOFTCAP:
            z = softcap * tanh(z / softcap)
        z = tl.where(v_mask[None, :], z * inv_temp, float("-inf"))
        zy += tl.sum(tl.where(offs_v[None, :] == y[:, None], z, 0.0), axis=1)
        m_new = tl.maximum(m_i, tl.max(z, axis=1))
        s_i = s_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m_i = m_new

    out = pid_s.to(tl.int64) * M + offs_n
    tl.store(LSE_ptr + out, m_i + tl.log(s_i), mask=n_mask)
    tl.store(ZY_ptr + out, zy, mask=n_mask)


# Splits are rounded to this many columns so every split is a whole number of vocab tiles.
_SPLIT_ALIGN = 256


def vocab_splits(M: int, V: int, cfg: configs.TileConfig, device: torch.device) -> int:
    """At least cfg.min_splits, and enough (split x 64-token block) programs to fill every SM
    four times over; never splits thinner than 4 aligned tiles."""
    sms = multiprocessor_count(device.index or 0) if device.type == "cuda" else 4
    token_blocks = max(1, triton.cdiv(M, 64))
    want = max(cfg.min_splits, triton.cdiv(4 * sms, token_blocks))
    return max(1, min(want, triton.cdiv(V, 4 * _SPLIT_ALIGN)))


def forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rows: torch.Tensor,
    targets: torch.Tensor,
    inv_temp: float,
    softcap: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(lse, z_target), both fp32 [M], for the M hidden rows `rows` (int64) with `targets`.

    hidden [N, H] and weight [V, H] must have unit stride along H.
    """
    M, (V, Hdim) = rows.numel(), weight.shape
    if M == 0:
        empty = torch.empty(0, device=hidden.device, dtype=torch.float32)
        return empty, empty.clone()
    buffers = {}

    def run(cfg: configs.TileConfig):
        splits = vocab_splits(M, V, cfg, hidden.device)
        v_per_split = triton.cdiv(triton.cdiv(V, splits), _SPLIT_ALIGN) * _SPLIT_ALIGN
        splits = triton.cdiv(V, v_per_split)
        lse = torch.empty((splits, M), device=hidden.device, dtype=torch.float32)
        zy = torch.empty_like(lse)
        blocks = triton.cdiv(M, cfg.block_n)
        grid = (splits, blocks) if cfg.split_fastest else (blocks, splits)
        _logprob_fwd_kernel[grid](
            hidden, weight, bias if bias is not None else weight, rows, targets, lse, zy,
            M, V, Hdim, hidden.stride(0), weight.stride(0), v_per_split,
            inv_temp, softcap or 1.0,
            HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
            UPCAST=must_upcast(hidden.dtype), DOT_PRECISION=dot_precision(hidden.dtype),
            SPLIT_FASTEST=cfg.split_fastest, **cfg.launch_kwargs(),
        )
        buffers["out"] = (lse, zy)

    flags = (bias is not None, softcap is not None)
    cfg = configs.choose("forward", hidden.dtype, M, Hdim, V, flags, hidden.device, run)
    run(cfg)
    lse, zy = buffers["out"]
    if lse.shape[0] == 1:
        return lse[0], zy[0]
    return torch.logsumexp(lse, dim=0), zy.sum(dim=0)
