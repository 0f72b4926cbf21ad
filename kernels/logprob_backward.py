"""Backward kernel: recompute each logits tile and reduce its gradient into dH, dW and db.

With upstream gradient g_m = dL/dlogp_m and p_mv = exp(z_mv - lse_m):

    dz_mv = g_m * (1[v == y_m] - p_mv)
    da_mv = dz_mv * (1 - tanh^2(a_mv / softcap)) / T      (softcap optional; T = temperature)
    dH[r_m] += sum_v da_mv w_v       dW[v] += sum_m da_mv h_{r_m}       db[v] += sum_m da_mv

Nothing of size [N, V] exists: a program owns one (BLOCK_N tokens x BLOCK_V vocab) tile,
recomputes its logits (same fp32 math as the forward), forms `da` in registers, then streams H
in BLOCK_K slices and adds its two partial products into the gradients.

How the reductions are done, and why: dH[r] sums over all vocab tiles and dW[v] over all token
tiles. A register-resident accumulator of either would be [BLOCK, H] (H up to 8192: far too
big), and splitting into a dH kernel and a dW kernel would recompute every logits tile twice
(10NHV instead of 8NHV FLOPs). So both are fp32 `atomic_add`s into fp32 buffers (fp32
accumulation whatever the input dtype; the launcher casts at the end). Programs are ordered
in groups of GROUP_N token blocks sweeping the same vocab tiles, so W tiles are reused from L2.

Memory: dH accumulates in fp32 [N, H] (the fp32 form of hidden's gradient). dW accumulates in
fp32 only for a *slab* of at most `slab_rows` vocab rows at a time (the launcher runs one
launch per slab and casts it into the output), so for bf16 weights the extra fp32 buffer is
bounded by slab_rows * H * 4 bytes whatever V is; for fp32 weights the output is the buffer.
"""

from __future__ import annotations

import inspect

import torch
import triton
import triton.language as tl

from .tl_utils import autotuned, dot_precision, logits_tile, must_upcast, tanh


@triton.jit
def _logprob_bwd_kernel(
    H_ptr, W_ptr, B_ptr, Rows_ptr, Y_ptr, LSE_ptr, G_ptr,
    GH_ptr, GW_ptr, GB_ptr,
    M, V, Hdim, stride_h, stride_w, stride_gh, stride_gw,
    v_begin, v_count,
    inv_temp, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    COMPUTE_GH: tl.constexpr, COMPUTE_GW: tl.constexpr, COMPUTE_GB: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr,
):
    # Grouped program order: GROUP_N consecutive token blocks visit the same vocab tile.
    pid = tl.program_id(0)
    num_n = tl.cdiv(M, BLOCK_N)
    num_v = tl.cdiv(v_count, BLOCK_V)
    per_group = GROUP_N * num_v
    first_n = (pid // per_group) * GROUP_N
    group_size = tl.minimum(num_n - first_n, GROUP_N)
    pid_n = first_n + (pid % per_group) % group_size
    pid_v = (pid % per_group) // group_size

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < M
    rows = tl.load(Rows_ptr + offs_n, mask=n_mask, other=0).to(tl.int64)
    y = tl.load(Y_ptr + offs_n, mask=n_mask, other=-1).to(tl.int64)
    lse = tl.load(LSE_ptr + offs_n, mask=n_mask, other=0.0)
    g = tl.load(G_ptr + offs_n, mask=n_mask, other=0.0)

    slab_v = pid_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
    offs_v = v_begin + slab_v
    v_mask = slab_v < v_count

    a = logits_tile(H_ptr, rows, n_mask, stride_h, W_ptr, offs_v, v_mask, stride_w, B_ptr,
                    Hdim, HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_K, UPCAST, DOT_PRECISION)
    if HAS_SOFTCAP:
        t = tanh(a / softcap)
        z = softcap * t * inv_temp
    else:
        z = a * inv_temp
    p = tl.exp(z - lse[:, None])
    da = g[:, None] * (tl.where(offs_v[None, :] == y[:, None], 1.0, 0.0) - p) * inv_temp
    if HAS_SOFTCAP:
        da = da * (1.0 - t * t)
    da = tl.where(n_mask[:, None] & v_mask[None, :], da, 0.0)

    if COMPUTE_GB:
        tl.atomic_add(GB_ptr + slab_v, tl.sum(da, axis=0), mask=v_mask)
    if UPCAST:
        da_op = da
    else:
        da_op = da.to(H_ptr.dtype.element_ty)  # tensor-core operand in the input dtype
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, Hdim, BLOCK_K):
        k = k0 + offs_k
        k_mask = k < Hdim
        if COMPUTE_GH:
            w = tl.load(W_ptr + offs_v[:, None] * stride_w + k[None, :],
                        mask=v_mask[:, None] & k_mask[None, :], other=0.0)
            if UPCAST:
                w = w.to(tl.float32)
            dh = tl.dot(da_op, w, input_precision=DOT_PRECISION)
            tl.atomic_add(GH_ptr + rows[:, None] * stride_gh + k[None, :], dh,
                          mask=n_mask[:, None] & k_mask[None, :])
        if COMPUTE_GW:
            h = tl.load(H_ptr + rows[:, None] * stride_h + k[None, :],
                        mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            if UPCAST:
                h = h.to(tl.float32)
            dw = tl.dot(tl.trans(da_op), h, input_precision=DOT_PRECISION)
            tl.atomic_add(GW_ptr + slab_v[:, None] * stride_gw + k[None, :], dw,
                          mask=v_mask[:, None] & k_mask[None, :])


_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_K": 64, "GROUP_N": 8},
                  num_warps=w, num_stages=s)
    for bn, bv, w, s in [(64, 128, 4, 3), (64, 256, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3)]
]
_FIXED = triton.Config({"BLOCK_N": 16, "BLOCK_V": 32, "BLOCK_K": 16, "GROUP_N": 2})
_launch = None

# Default vocab slab for the fp32 dW accumulator of half-precision weights: 8192 rows,
# i.e. 8192 * H * 4 bytes (128 MiB at H = 4096).
SLAB_ROWS = 8192


def _autotune_kwargs() -> dict:
    # The kernel accumulates into its outputs, so autotuning must not leave its trial runs in
    # them. `restore_value` (Triton >= 3.0) snapshots and restores the buffers.
    if "restore_value" in inspect.signature(triton.autotune).parameters:
        return {"restore_value": ["GH_ptr", "GW_ptr", "GB_ptr"]}
    return {"reset_to_zero": ["GH_ptr", "GW_ptr", "GB_ptr"]}


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
    slab_rows: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients (d hidden [N, H], d weight [V, H], d bias [V]) in the input dtypes, or None
    where `needs` (hidden, weight, bias) is False. `grad` is dL/dlogp for the M rows, fp32."""
    global _launch
    if _launch is None:
        _launch = autotuned(_logprob_bwd_kernel, _CONFIGS, key=["V", "Hdim"], fixed=_FIXED,
                            **_autotune_kwargs())
    need_h, need_w, need_b = needs
    slab_rows = slab_rows or SLAB_ROWS
    M, (V, Hdim) = rows.numel(), weight.shape
    dev = hidden.device
    gh = torch.zeros((hidden.shape[0], Hdim), device=dev, dtype=torch.float32) if need_h else None
    gw = torch.zeros((V, Hdim), device=dev, dtype=weight.dtype) if need_w else None
    gb = torch.zeros(V, device=dev, dtype=torch.float32) if need_b else None
    if M == 0 or not any(needs):
        return _cast(gh, hidden.dtype), gw, _cast(gb, weight.dtype)

    direct_w = weight.dtype == torch.float32  # accumulate straight into the output
    slab = V if direct_w else min(slab_rows, V)
    gw_slab = None
    if need_w and not direct_w:
        gw_slab = torch.empty((slab, Hdim), device=dev, dtype=torch.float32)
    upcast, precision = must_upcast(hidden.dtype), dot_precision(hidden.dtype)
    for v0 in range(0, V, slab):
        count = min(slab, V - v0)
        if gw_slab is not None:
            gw_slab.zero_()
        gw_buf = gw[v0:] if direct_w and need_w else gw_slab
        placeholder = lse  # any fp32 tensor: pointer of a disabled output
        _launch(
            lambda meta, count=count: (
                triton.cdiv(M, meta["BLOCK_N"]) * triton.cdiv(count, meta["BLOCK_V"]),),
            hidden, weight, bias if bias is not None else weight, rows, targets, lse, grad,
            gh if need_h else placeholder,
            gw_buf if need_w else placeholder,
            gb[v0:] if need_b else placeholder,
            M, V, Hdim, hidden.stride(0), weight.stride(0),
            Hdim, Hdim,
            v0, count,
            inv_temp, softcap or 1.0,
            HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
            COMPUTE_GH=need_h, COMPUTE_GW=need_w, COMPUTE_GB=need_b,
            UPCAST=upcast, DOT_PRECISION=precision,
        )
        if gw_slab is not None:
            gw[v0:v0 + count].copy_(gw_slab[:count])
    return _cast(gh, hidden.dtype), gw, _cast(gb, weight.dtype)


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return t if t is None or t.dtype == dtype else t.to(dtype)
