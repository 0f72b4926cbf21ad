"""Compile every Triton kernel of mpo_fast.kernels for sm_90 (H100/H200) on any machine, as the
JIT would compile it at run time.

Run as `python tests/sm90_compile.py [--quick]`: prints one JSON line per kernel variant with
its shared memory, registers, spilled bytes (from Triton's bundled `ptxas -v`) and whether its
dots became Hopper wgmma instructions. Every config `kernels/configs.py` can pick on sm_90
("picked": true; and, without --quick, every autotuning candidate) is compiled.

Why the specialization matters: at run time the JIT marks 16-byte-aligned pointers and integer
arguments divisible by 16 with `tt.divisibility = 16` (except arguments in the kernel's
`do_not_specialize`). Compiled without those marks, the compiler makes a different kernel
(e.g. 131,072 B of shared memory where the real one needs 253,952 B). `divisibility` below
reproduces the marks from representative run-time values.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

os.environ["TRITON_INTERPRET"] = "0"  # real JIT functions, not interpreted ones

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from mpo_fast.kernels import configs, logprob_backward, logprob_forward, loss_epilogue

TARGET = GPUTarget("cuda", 90, 32)
HOPPER_SHARED_BYTES = 232448  # the most shared memory one block may use on sm_90

# Representative run-time integers of the head kernels (H = 4096, V = 151,646, 16k tokens).
HEAD_INTS = {"M": 16384, "V": 151646, "Hdim": 4096, "stride_h": 4096, "stride_w": 4096,
             "stride_da": 8192, "v_per_split": 9728, "v_begin": 8192, "v_count": 4096}


def divisibility(fn, values: dict, constexprs: dict) -> dict:
    """The `tt.divisibility` marks the JIT would attach: pointers (torch allocations are
    aligned) and integers divisible by 16, unless the kernel opts out of specializing them."""
    skip = {fn.arg_names[i] if isinstance(i, int) else i
            for i in (fn.do_not_specialize or ())}
    attrs = {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs or name in skip:
            continue
        value = values.get(name)
        if value == "ptr" or (isinstance(value, int) and value % 16 == 0):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return attrs


def ptxas_report(ptx: str) -> dict:
    """Registers and spill bytes of the PTX as Triton's own ptxas assembles it for sm_90a."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        proc = subprocess.run([get_ptxas(90).path, "-arch=sm_90a", "-v", path, "-o",
                               os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
    text = proc.stdout + proc.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spills = [int(s) for s in re.findall(r"(\d+) bytes spill (?:stores|loads)", text)]
    return {"registers": int(regs.group(1)) if regs else None, "spill_bytes": sum(spills)}


def compile_kernel(fn, types: dict, values: dict, constexprs: dict, num_warps: int,
                   num_stages: int) -> dict:
    signature = {name: ("constexpr" if name in constexprs else types[name])
                 for name in fn.arg_names}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs,
                    attrs=divisibility(fn, values, constexprs))
    k = triton.compile(src, target=TARGET,
                       options={"num_warps": num_warps, "num_stages": num_stages})
    return {"shared_bytes": k.metadata.shared, "wgmma": "wgmma" in k.asm["ptx"],
            **ptxas_report(k.asm["ptx"])}


def head_types(dtype: str) -> tuple[dict, dict]:
    types, values = {}, dict(HEAD_INTS)
    for name in ("H_ptr", "W_ptr", "B_ptr", "DA_ptr"):
        types[name] = f"*{dtype}"
    for name in ("Rows_ptr", "Y_ptr"):
        types[name] = "*i64"
    for name in ("LSE_ptr", "ZY_ptr", "G_ptr", "DB_ptr"):
        types[name] = "*fp32"
    values.update({name: "ptr" for name in types})
    types.update({name: "i32" for name in HEAD_INTS})
    types.update({"inv_temp": "fp32", "softcap": "fp32"})
    return types, values


def head_configs(kernel: str, dtype: str, softcap: bool, quick: bool):
    """(config, picked) pairs: what `configs.pick` returns on sm_90 for both token-count
    regimes (picked=True), then the tuning candidates unless quick."""
    import torch

    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    picked = {_pick_sm90(kernel, dt, M, softcap) for M in (1, 1 << 20)}
    family = "fp32" if dtype == "fp32" else "half"
    extra = [] if quick else [c for c in configs.CANDIDATES[family] if c not in picked]
    return [(c, True) for c in sorted(picked, key=str)] + [(c, False) for c in extra]


def _pick_sm90(kernel, dtype, M, softcap):
    """configs.pick as it runs on an H100 (no GPU here: pretend the device)."""
    import torch

    real = configs.interpreting, configs._capability
    configs.interpreting, configs._capability = (lambda: False), (lambda device: (9, 0))
    try:
        return configs.pick(kernel, dtype, M, torch.device("cuda"), softcap)
    finally:
        configs.interpreting, configs._capability = real


def variants(quick: bool):
    dtypes = (("bf16", "tf32"), ("fp32", "ieee")) if quick else (
        ("bf16", "tf32"), ("fp16", "tf32"), ("fp32", "ieee"))
    for dtype, precision in dtypes:
        types, values = head_types(dtype)
        for bias, softcap in ((False, False), (True, True)):
            flags = {"HAS_BIAS": bias, "HAS_SOFTCAP": softcap, "UPCAST": False,
                     "DOT_PRECISION": precision}
            for cfg, picked in head_configs("forward", dtype, softcap, quick):
                meta = {k: v for k, v in cfg.launch_kwargs().items() if k.isupper()}
                yield ("logprob_forward", dtype, bias, softcap, cfg, picked,
                       logprob_forward._logprob_fwd_kernel, types, values,
                       {**flags, **meta, "SPLIT_FASTEST": cfg.split_fastest})
            for cfg, picked in head_configs("backward", dtype, softcap, quick):
                meta = {k: v for k, v in cfg.launch_kwargs().items() if k.isupper()}
                yield ("logit_grad", dtype, bias, softcap, cfg, picked,
                       logprob_backward._logit_grad_kernel, types, values,
                       {**flags, **meta, "NEED_DB": bias, "GROUP_N": cfg.group_n})


def epilogue_variants(quick: bool):
    seg = {"Logp": "*fp32", "RefLogp": "*fp32", "Targets": "*i64", "Cu": "*i32", "Seq": "*fp32",
           "RefSeq": "*fp32", "Count": "*fp32", "ignore_index": "i32", "G": "*fp32",
           "Out": "*fp32", "Ref": "*fp32", "Delta": "*fp32", "W": "*fp32", "Loss": "*fp32",
           "Metrics": "*fp32", "TermMetrics": "*fp32", "Coef": "*fp32", "B": "i32", "N": "i32",
           "beta": "fp32", "e": "fp32", "tau": "fp32", "orpo_cap": "fp32", "sft_tokens": "fp32"}
    values = {name: "ptr" for name, t in seg.items() if t.startswith("*")}
    block = {"BLOCK": loss_epilogue.TOKEN_BLOCK}
    yield ("segment_sums", loss_epilogue._segment_sums_kernel, seg, values,
           {"HAS_REF": True, **block})
    yield ("broadcast", loss_epilogue._broadcast_kernel, seg, values, block)
    every_type = loss_epilogue.ALL_TERMS
    for per_sequence in (False, True):  # the SFT token mean, or the per-sequence mean
        # the one block size the launcher uses, whatever the pair count
        yield ("pair_terms", loss_epilogue._pair_terms_kernel, seg, values,
               {"TYPES": every_type, "SFT_PER_SEQUENCE": per_sequence,
                "BLOCK_B": loss_epilogue.PAIR_BLOCK})


def main(quick: bool) -> None:
    for name, dtype, bias, softcap, cfg, picked, fn, types, values, constexprs in variants(quick):
        row = {"kernel": name, "dtype": dtype, "bias": bias, "softcap": softcap,
               "config": cfg.launch_kwargs(), "picked": picked}
        try:
            row.update(compile_kernel(fn, types, values, constexprs, cfg.num_warps,
                                      cfg.num_stages))
        except Exception as exc:  # reported, and failed by the test
            row["error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
        print(json.dumps(row), flush=True)
    for name, fn, types, values, constexprs in epilogue_variants(quick):
        row = {"kernel": name, "dtype": "fp32", "config": {}, "picked": True}
        try:
            row.update(compile_kernel(fn, types, values, constexprs, 4, 1))
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main("--quick" in sys.argv)
