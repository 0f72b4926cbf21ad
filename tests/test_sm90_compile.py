"""Every Triton kernel compiles to sm_90 machine code (H100/H200), on any machine.

The interpreter runs the kernels' math but never lowers them to GPU code; this test does
(Triton's compiler and bundled ptxas need no GPU). It runs tests/sm90_compile.py --quick in a
subprocess, because the kernels must be imported with TRITON_INTERPRET=0.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import HAS_TRITON

H100_SHARED_BYTES = 232448  # the most shared memory one block may use on sm_90


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_kernels_compile_for_sm90():
    """Every config the heuristic can pick compiles as the JIT specializes it at run time, fits
    an H100's shared memory, never spills registers, and in half precision runs its dots on
    wgmma."""
    script = Path(__file__).with_name("sm90_compile.py")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, str(script), "--quick"], capture_output=True,
                          text=True, env=env, timeout=1200)
    if proc.returncode != 0 and "ASTSource" in proc.stderr:
        pytest.skip(f"this Triton's compile API differs: {proc.stderr.strip()[-200:]}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert {r["kernel"] for r in rows} == {"logprob_forward", "logit_grad", "segment_sums",
                                          "broadcast", "pair_terms"}
    for r in rows:
        assert "error" not in r, r
        assert r["shared_bytes"] <= H100_SHARED_BYTES, r
        if r["kernel"] in ("logprob_forward", "logit_grad") and r["dtype"] != "fp32":
            assert r["wgmma"], f"half-precision dot not on Hopper tensor cores: {r}"
        assert r["spill_bytes"] == 0, f"a config the heuristic picks spills registers: {r}"
