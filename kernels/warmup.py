"""Compile the log-prob kernels ahead of the first training step.

Triton compiles a kernel on its first launch for each specialization (dtype, flags, and which
integer arguments are divisible by 16). The token count is never specialized on and every
other integer is a property of the model (H, V) or a multiple of 256, so one compilation per
(V, H, dtype, bias, softcap) serves a whole run. `warmup` triggers those compilations without
launching anything or allocating the weight: pointer arguments are given as dtypes (Triton's
`JITFunction.warmup` treats them as 16-byte-aligned tensors).
"""

from __future__ import annotations

import torch
import triton

from . import configs
from .logprob_backward import _logit_grad_kernel, slab_rows
from .logprob_forward import _SPLIT_ALIGN, _logprob_fwd_kernel
from .tl_utils import dot_precision, interpreting


def warmup(V: int, H: int, dtype: torch.dtype, device: torch.device | str | None = None, *,
           bias: bool = False, softcap: bool = False, backward: bool = True,
           frozen: bool = False, single_pass: bool = False) -> int:
    """Compile the forward (and backward) kernels for an LM head [V, H] of `dtype`, with
    `frozen` the frozen-head row kernel (kernels/frozen_head.py) and with `single_pass` the
    single-pass row kernels (kernels/single_pass.py).

    Returns the number of kernel variants compiled (0 under the interpreter or off CUDA).
    """
    device = torch.device(device or "cuda")
    if interpreting() or device.type != "cuda":
        return 0
    i64, f32 = torch.int64, torch.float32
    flags = {"HAS_BIAS": bias, "HAS_SOFTCAP": softcap, "UPCAST": False,
             "DOT_PRECISION": dot_precision(dtype)}
    compiled = 0
    with torch.cuda.device(device):
        for cfg in {configs.pick("forward", dtype, M, device, softcap) for M in (1, 1 << 20)}:
            _logprob_fwd_kernel.warmup(
                dtype, dtype, dtype, i64, i64, f32, f32,
                4096, V, H, H, H, 4 * _SPLIT_ALIGN, 1.0, 1.0,
                grid=(1, 1), SPLIT_FASTEST=cfg.split_fastest, **flags, **cfg.launch_kwargs())
            compiled += 1
        if frozen:
            from .frozen_head import _slab_softmax_kernel

            _slab_softmax_kernel.warmup(
                f32, dtype, i64, dtype, f32, f32, f32, f32, 4096, 0, 4096, 4096, 4096, 1.0,
                1.0, grid=(1,), HAS_BIAS=bias, HAS_SOFTCAP=softcap, BLOCK_M=16, BLOCK_V=256,
                num_warps=4)
            compiled += 1
        if single_pass:
            from .single_pass import _blocks, _row_grad_kernel, _row_stats_kernel

            block_m, block_v = _blocks(device)
            _row_stats_kernel.warmup(
                f32, dtype, i64, f32, f32, 4096, V, V, 4096, 1.0, 1.0, grid=(1, 1),
                HAS_BIAS=bias, HAS_SOFTCAP=softcap, BLOCK_M=block_m, BLOCK_V=block_v,
                num_warps=4)
            _row_grad_kernel.warmup(
                f32, dtype, i64, f32, f32, 4096, V, V, V, 1.0, 1.0, grid=(1, 1),
                HAS_SOFTCAP=softcap, BLOCK_M=block_m, BLOCK_V=block_v, num_warps=4)
            compiled += 2
        if not backward:
            return compiled
        S = slab_rows(4096, V, torch.finfo(dtype).bits // 8)
        for cfg in {configs.pick("backward", dtype, M, device, softcap) for M in (1, 1 << 20)}:
            # NEED_DB is set by a bias that requires grad (a frozen bias gives False)
            for need_db in {False, bias}:
                _logit_grad_kernel.warmup(
                    dtype, dtype, dtype, i64, f32, f32, dtype, f32,
                    4096, H, H, H, S, 0, triton.cdiv(V, 2),
                    1.0, 1.0, grid=(1,), NEED_DB=need_db, GROUP_N=cfg.group_n,
                    **flags, **cfg.launch_kwargs())
                compiled += 1
    return compiled


def warmup_epilogue(types: int, sft_per_sequence: bool,
                    device: torch.device | str | None = None) -> int:
    """Compile the loss epilogue's kernels: the segment sums (with and without a reference),
    the broadcast, and the pair terms for these term bits and SFT normalization.

    Their integer arguments (token count N, pair count B) are not specialized on and the pair
    terms loop over a fixed block of pairs, so these variants serve every batch. Returns how
    many were compiled (0 under the interpreter or off CUDA).
    """
    device = torch.device(device or "cuda")
    if interpreting() or device.type != "cuda":
        return 0
    from .loss_epilogue import (
        PAIR_BLOCK,
        TOKEN_BLOCK,
        _broadcast_kernel,
        _pair_terms_kernel,
        _segment_sums_kernel,
    )

    f32, i32 = torch.float32, torch.int32
    with torch.cuda.device(device):
        for has_ref in (False, True):
            _segment_sums_kernel.warmup(f32, f32, i32, f32, f32, 4096, grid=(1,),
                                        HAS_REF=has_ref, BLOCK=TOKEN_BLOCK)
        _broadcast_kernel.warmup(f32, i32, f32, 4096, grid=(1,), BLOCK=TOKEN_BLOCK)
        _pair_terms_kernel.warmup(f32, f32, f32, f32, f32, f32, f32, f32, f32,
                                  16, 0.1, 0.0, 0.05, -1e-6, 0.0, grid=(1,), TYPES=types,
                                  SFT_PER_SEQUENCE=bool(sft_per_sequence), BLOCK_B=PAIR_BLOCK)
    return 4
