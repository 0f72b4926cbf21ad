"""Backward: per vocab slab, a kernel recomputes the logits and writes their gradient dZ; two
cuBLAS products turn dZ into dH and dW. No atomics, deterministic.

With upstream gradient g_m = dL/dlogp_m and p_mv = exp(z_mv - lse_m):

    dz_mv = g_m * (1[v == y_m] - p_mv)
    da_mv = dz_mv * (1 - tanh^2(a_mv / softcap)) / T      (softcap optional; T = temperature)
    dH[r_m] = sum_v da_mv w_v       dW[v] = sum_m da_mv h_{r_m}       db[v] = sum_m da_mv

For each slab of S vocab rows [v0, v0 + S):

    1. `_logit_grad_kernel` (one program per BLOCK_N x BLOCK_V tile of the [M, S] slab):
       recompute the logits tile (same fp32 math as the forward), form `da` in registers,
       store it in the input dtype into the workspace DA [M, S] and its column sums (db) as
       per-token-block fp32 partials [M / BLOCK_N, S].
    2. dH_rows += DA @ W[v0:v0+S]      (cuBLAS, fp32 accumulator [M, H] across slabs)
    3. dW[v0:v0+S] = DA^T @ H_rows     (cuBLAS; the whole sum over tokens in one product, so
                                        it is written once, in the weight dtype, no fp32 copy)

FLOPs: 2MHV per product, 6MHV for the backward (recompute + two products), all on tensor
cores for half-precision inputs. Storing `da` in bf16/fp16 rounds it to 8/11 bits before the
products, as any half-precision matmul does; accumulation stays fp32.

fp16: its smallest normal is 6.1e-5 (bf16's is 1.2e-38), so `da = g p` with a small upstream
gradient (an SFT token mean over N tokens gives g ~ 1/N) would land in fp16's subnormals or
flush to zero, dropping the softmax tail. For fp16 inputs the kernel therefore writes
`da * s` with s = 2^-e, e = the exponent of max|g| (exact, no host sync): |da s| <= 1 and the
tail keeps fp16's 11 bits down to 6e-5 of the largest entry. dH and db are unscaled in fp32
and dW is formed in an fp32 [S, H] block and unscaled before its single rounding to fp16.

Workspace: DA is M x S in the input dtype, S = the largest multiple of 256 vocab rows with
M * S * itemsize <= MPO_FAST_WORKSPACE_MB (default 256 MiB), at least 256 rows, at most V
(rounded up to 256).
Beyond it: the fp32 dH accumulator [M, H], the gathered hidden rows [M, H] when some positions
are ignored (M < N), and the db partials [M / BLOCK_N, S] fp32.

Program order in step 1: GROUP_N consecutive token blocks visit the same vocab tile, so each
weight tile is read from DRAM about once per group.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from . import configs
from .tl_utils import dot_precision, interpreting, logits_tile, must_upcast, tanh

DEFAULT_WORKSPACE_BYTES = 256 * 2**20
_SLAB_ALIGN = 256


@triton.jit(do_not_specialize=["M", "v_count"])
def _logit_grad_kernel(
    H_ptr, W_ptr, B_ptr, Y_ptr, LSE_ptr, G_ptr, DA_ptr, DB_ptr,
    M, Hdim, stride_h, stride_w, stride_da, v_begin, v_count,
    inv_temp, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, NEED_DB: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr,
):
    pid = tl.program_id(0)
    num_n = tl.cdiv(M, BLOCK_N)
    num_v = tl.cdiv(v_count, BLOCK_V)
    per_group = GROUP_N * num_v
    first_n = (pid // per_group) * GROUP_N
    group_size = tl.minimum(num_n - first_n, GROUP_N)
    pid_n = first_n + (pid % per_group) % group_size
    pid_v = (pid % per_group) // group_size

    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < M
    y = tl.load(Y_ptr + offs_n, mask=n_mask, other=-1).to(tl.int64)
    lse = tl.load(LSE_ptr + offs_n, mask=n_mask, other=0.0)
    g = tl.load(G_ptr + offs_n, mask=n_mask, other=0.0)

    slab_v = pid_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    offs_v = v_begin + slab_v
    v_mask = slab_v < v_count

    a = logits_tile(H_ptr, offs_n, n_mask, stride_h, W_ptr, offs_v, v_mask, stride_w, B_ptr,
                    Hdim, HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_K, UPCAST, DOT_PRECISION)
    onehot = tl.where(offs_v[None, :] == y[:, None], 1.0, 0.0)
    if HAS_SOFTCAP:
        # dz/da = 1 - tanh^2 = 1 - (z / (softcap / T))^2: a function of z alone, so only one
        # fp32 tile is live (holding tanh as a second tile spills at 128 x 256).
        z = softcap * tanh(a / softcap) * inv_temp
        u = z * (1.0 / (softcap * inv_temp))
        da = g[:, None] * (onehot - tl.exp(z - lse[:, None])) * (inv_temp * (1.0 - u * u))
    else:
        z = a * inv_temp
        da = g[:, None] * (onehot - tl.exp(z - lse[:, None])) * inv_temp
    mask = n_mask[:, None] & v_mask[None, :]
    da = tl.where(mask, da, 0.0)
    # DA holds fewer than 2^31 elements (the launcher checks): 32-bit offsets keep the
    # [BLOCK_N, BLOCK_V] address tile at one register per element.
    da_offs = (offs_n.to(tl.int32) * stride_da)[:, None] + slab_v.to(tl.int32)[None, :]
    tl.store(DA_ptr + da_offs, da.to(DA_ptr.dtype.element_ty), mask=mask)
    if NEED_DB:
        tl.store(DB_ptr + pid_n.to(tl.int64) * stride_da + slab_v, tl.sum(da, axis=0),
                 mask=v_mask)


def workspace_bytes() -> int:
    mb = os.environ.get("MPO_FAST_WORKSPACE_MB")
    return int(float(mb) * 2**20) if mb else DEFAULT_WORKSPACE_BYTES


def slab_rows(M: int, V: int, entry_bytes: int) -> int:
    """Vocab rows per slab: a workspace of M x S entries of `entry_bytes` each (here DA, the
    input dtype's itemsize) fits the budget (module doc).

    Always a multiple of 256 (the last slab is shorter), so DA's row stride never changes the
    kernel's specialization and every batch shape reuses one compiled kernel.
    """
    s = workspace_bytes() // max(1, M * entry_bytes) // _SLAB_ALIGN * _SLAB_ALIGN
    return min(triton.cdiv(V, _SLAB_ALIGN) * _SLAB_ALIGN, max(_SLAB_ALIGN, s))


def backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rows: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    grad: torch.Tensor,
    inv_temp: float,
    softcap: float | None,
    needs: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients (d hidden [N, H], d weight [V, H], d bias [V]) in the input dtypes, or None
    where `needs` (hidden, weight, bias) is False. `grad` is dL/dlogp for the M rows, fp32."""
    need_h, need_w, need_b = needs
    M, (V, Hdim) = rows.numel(), weight.shape
    dev, dtype = hidden.device, hidden.dtype
    if M == 0 or not any(needs):
        gh = torch.zeros_like(hidden) if need_h else None
        gw = torch.zeros_like(weight) if need_w else None
        gb = torch.zeros_like(bias) if need_b else None
        return gh, gw, gb

    all_rows = M == hidden.shape[0]  # rows = arange(N): every position counts
    h_rows = hidden if all_rows else hidden.index_select(0, rows)
    S = slab_rows(M, V, hidden.element_size())
    if M * S >= 2**31:
        raise ValueError(f"{M} tokens x {S} vocab rows overflow the 32-bit workspace offsets; "
                         "lower MPO_FAST_WORKSPACE_MB or split the batch")
    da = torch.empty((M, S), device=dev, dtype=dtype)
    gh = torch.zeros((M, Hdim), device=dev, dtype=torch.float32) if need_h else None
    gw = torch.empty_like(weight) if need_w else None
    gb = torch.empty(V, device=dev, dtype=torch.float32) if need_b else None
    flags = (bias is not None, softcap is not None, need_b)

    def run(cfg: configs.TileConfig, v0: int = 0) -> None:
        count = min(S, V - v0)
        db = buffers.get(cfg)
        if need_b and db is None:
            db = buffers[cfg] = torch.empty((triton.cdiv(M, cfg.block_n), S), device=dev,
                                            dtype=torch.float32)
        _launch_logit_grad(cfg, h_rows, weight, bias, targets, lse, grad, da, db, v0, count,
                           inv_temp, softcap)

    unscale = None
    if dtype == torch.float16:  # module doc: keep da in fp16's normal range
        exponent = torch.frexp(grad.abs().amax())[1]
        grad = torch.ldexp(grad, -exponent)
        unscale = torch.ldexp(torch.ones((), device=dev), exponent)
    buffers: dict[configs.TileConfig, torch.Tensor] = {}
    cfg = configs.choose("backward", dtype, M, Hdim, V, flags, dev, run)
    for v0 in range(0, V, S):
        count = min(S, V - v0)
        run(cfg, v0)
        block = da[:, :count]
        if need_h:
            _accumulate_mm(gh, block, weight[v0:v0 + count])
        if need_w and unscale is not None:
            gw[v0:v0 + count] = _mm_fp32(block.T, h_rows).mul_(unscale)
        elif need_w:
            torch.mm(block.T, h_rows, out=gw[v0:v0 + count])
        if need_b:
            torch.sum(buffers[cfg][:, :count], dim=0, out=gb[v0:v0 + count])

    if unscale is not None:
        for acc in (gh, gb):
            if acc is not None:
                acc.mul_(unscale)
    if need_h:
        gh = gh.to(dtype) if all_rows else torch.zeros_like(hidden).index_copy_(
            0, rows, gh.to(dtype))
    return gh, gw, None if gb is None else gb.to(weight.dtype)


def _launch_logit_grad(cfg, h_rows, weight, bias, targets, lse, grad, da, db, v0, count,
                       inv_temp, softcap):
    M, Hdim = h_rows.shape
    grid = (triton.cdiv(M, cfg.block_n) * triton.cdiv(count, cfg.block_v),)
    _logit_grad_kernel[grid](
        h_rows, weight, bias if bias is not None else weight, targets, lse, grad, da,
        db if db is not None else lse,
        M, Hdim, h_rows.stride(0), weight.stride(0), da.stride(0), v0, count,
        inv_temp, softcap or 1.0,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, NEED_DB=db is not None,
        UPCAST=must_upcast(h_rows.dtype), DOT_PRECISION=dot_precision(h_rows.dtype),
        GROUP_N=cfg.group_n, **cfg.launch_kwargs(),
    )


def _accumulate_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b, with fp32 accumulation whatever the operands' dtype."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif a.is_cuda and _cuda_mm_has_out_dtype():
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)  # cuBLAS, beta = 1
    elif a.is_cuda:
        acc.add_(torch.mm(a, b))  # older torch: the product is rounded to the input dtype
    else:
        acc.addmm_(a.float(), b.float())


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b as an fp32 matrix, with fp32 accumulation whatever the operands' dtype."""
    out = torch.zeros((a.shape[0], b.shape[1]), device=a.device, dtype=torch.float32)
    _accumulate_mm(out, a, b)
    return out


@functools.cache
def _cuda_mm_has_out_dtype() -> bool:
    """torch >= 2.8 can add a half-precision product into an fp32 matrix in place (cuBLAS
    with fp32 output); checked once on a small case, since older builds lack the overload."""
    if interpreting():
        return False
    try:
        a = torch.randn(64, 32, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(32, 48, device="cuda", dtype=torch.bfloat16)
        acc = torch.randn(64, 48, device="cuda")
        want = acc + a.float() @ b.float()
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        return bool(torch.allclose(acc, want, rtol=1e-3, atol=1e-3))
    except (RuntimeError, TypeError):
        return False
