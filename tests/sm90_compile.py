"""Compile every Triton kernel of mpo_fast.kernels for sm_90 (H100/H200) on any machine.

Run as `python tests/sm90_compile.py [--quick]`: prints one JSON line per kernel variant
(--quick: one autotune config per kernel, bf16 and fp32, bias and softcap on). The interpreter
never lowers kernels to GPU code, so this is what catches code the GPU compiler rejects (and
shows whether bf16 dots use Hopper's wgmma tensor-core instructions) without a GPU.
"""

from __future__ import annotations

import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "0"  # real JIT functions, not interpreted ones

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from mpo_fast.kernels import logprob_backward, logprob_forward, loss_epilogue

TARGET = GPUTarget("cuda", 90, 32)


def compile_kernel(fn, types: dict, constexprs: dict, num_warps: int, num_stages: int) -> dict:
    signature = {name: ("constexpr" if name in constexprs else types[name])
                 for name in fn.arg_names}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    k = triton.compile(src, target=TARGET,
                       options={"num_warps": num_warps, "num_stages": num_stages})
    return {"shared_bytes": k.metadata.shared, "wgmma": "wgmma" in k.asm["ptx"]}


def head_types(dtype: str) -> dict:
    t = {f"{n}_ptr": f"*{dtype}" for n in ("H", "W", "B")}
    t.update({f"{n}_ptr": "*i64" for n in ("Rows", "Y")})
    t.update({f"{n}_ptr": "*fp32" for n in ("LSE", "ZY", "G", "GH", "GW", "GB")})
    t.update({n: "i32" for n in ("M", "V", "Hdim", "stride_h", "stride_w", "stride_gh",
                                 "stride_gw", "v_per_split", "v_begin", "v_count")})
    t.update({"inv_temp": "fp32", "softcap": "fp32"})
    return t


def variants(quick: bool):
    dtypes = (("bf16", "tf32"), ("fp32", "ieee")) if quick else (
        ("bf16", "tf32"), ("fp16", "tf32"), ("fp32", "ieee"))
    for dtype, precision in dtypes:
        for bias, softcap in ((True, True),) if quick else ((False, False), (True, True)):
            flags = {"HAS_BIAS": bias, "HAS_SOFTCAP": softcap, "UPCAST": False,
                     "DOT_PRECISION": precision}
            for cfg in logprob_forward._CONFIGS[: 1 if quick else None]:
                yield ("logprob_forward", dtype, bias, softcap, cfg.kwargs,
                       logprob_forward._logprob_fwd_kernel, head_types(dtype),
                       {**flags, **cfg.kwargs}, cfg.num_warps, cfg.num_stages)
            for cfg in logprob_backward._CONFIGS[: 1 if quick else None]:
                grads = {"COMPUTE_GH": True, "COMPUTE_GW": True, "COMPUTE_GB": bias}
                yield ("logprob_backward", dtype, bias, softcap, cfg.kwargs,
                       logprob_backward._logprob_bwd_kernel, head_types(dtype),
                       {**flags, **grads, **cfg.kwargs}, cfg.num_warps, cfg.num_stages)
    seg = {"Logp": "*fp32", "RefLogp": "*fp32", "Targets": "*i64", "Cu": "*i32", "Seq": "*fp32",
           "RefSeq": "*fp32", "Count": "*fp32", "ignore_index": "i32", "G": "*fp32",
           "Out": "*fp32", "Ref": "*fp32", "Delta": "*fp32", "W": "*fp32", "Loss": "*fp32",
           "Metrics": "*fp32", "TermMetrics": "*fp32", "Coef": "*fp32", "B": "i32",
           "beta": "fp32", "e": "fp32", "tau": "fp32", "orpo_cap": "fp32"}
    block = {"BLOCK": loss_epilogue.TOKEN_BLOCK}
    yield ("segment_sums", "fp32", False, False, block, loss_epilogue._segment_sums_kernel, seg,
           {"HAS_REF": True, **block}, 4, 1)
    yield ("broadcast", "fp32", False, False, block, loss_epilogue._broadcast_kernel, seg, block,
           4, 1)
    every_type = (1 << len(loss_epilogue.TYPE_BITS)) - 1
    every_type &= ~sum(1 << loss_epilogue.TYPE_BITS.index(t) for t in loss_epilogue.UNSUPPORTED)
    for block_b in (16,) if quick else (16, loss_epilogue.MAX_PAIRS):
        yield ("pair_terms", "fp32", False, False, {"BLOCK_B": block_b},
               loss_epilogue._pair_terms_kernel, seg, {"TYPES": every_type, "BLOCK_B": block_b},
               4, 1)


if __name__ == "__main__":
    quick = "--quick" in sys.argv
    for name, dtype, bias, softcap, config, fn, types, constexprs, warps, stages in variants(quick):
        row = {"kernel": name, "dtype": dtype, "bias": bias, "softcap": softcap,
               "config": config, "num_warps": warps}
        try:
            row.update(compile_kernel(fn, types, constexprs, warps, stages))
        except Exception as exc:  # reported, and failed by the test
            row["error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
        print(json.dumps(row), flush=True)
