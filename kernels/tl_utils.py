"""Small Triton helpers shared by the log-prob kernels, plus launch-time facts about Triton."""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 operands must not silently drop to tf32 (~3e-4 error): ask for IEEE fp32 products."""
    return "ieee" if dtype == torch.float32 else "tf32"


def must_upcast(dtype: torch.dtype) -> bool:
    """The interpreter's bf16 `tl.dot` returns garbage; it is exact on fp32 operands."""
    return interpreting() and dtype != torch.float32


@functools.lru_cache(maxsize=8)
def multiprocessor_count(device_index: int) -> int:
    if interpreting() or not torch.cuda.is_available():
        return 4
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@triton.jit
def tanh(x):
    # 1 - 2 / (exp(2x) + 1) saturates to +-1 without NaN (exp overflow to inf gives 1).
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def logits_tile(
    h_ptr, rows, row_mask, stride_h,
    w_ptr, offs_v, v_mask, stride_w,
    b_ptr, Hdim,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """acc[BLOCK_N, BLOCK_V] = hidden[rows, :] @ weight[offs_v, :].T (+ bias[offs_v]), in fp32.

    `rows` and `offs_v` are int64, so row * stride never wraps at 2^31 elements; the two tile
    pointers are formed once and advanced by BLOCK_K (no per-slice 64-bit index math).
    """
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    h_ptrs = h_ptr + rows[:, None] * stride_h + offs_k[None, :]
    w_ptrs = w_ptr + offs_v[:, None] * stride_w + offs_k[None, :]
    for k0 in range(0, Hdim, BLOCK_K):
        k_mask = (k0 + offs_k) < Hdim
        h = tl.load(h_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=v_mask[:, None] & k_mask[None, :], other=0.0)
        if UPCAST:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
        h_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_v, mask=v_mask, other=0.0).to(tl.float32)[None, :]
    return acc
