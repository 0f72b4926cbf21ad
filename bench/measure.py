"""How the benchmarks measure: time, peak extra memory and the card's (or CPU's) matmul rate.
(Time, memory and the device's name are `mpo_fast.measure`'s, the one meter; this file adds
the matmul rate, process isolation and the per-case record.)

- Time: median of `repeats` runs after `warmup` runs; CUDA events on the GPU, perf_counter on
  the CPU (where the op is synchronous). With one repeat on the CPU, the step whose peak
  memory is measured is also the one timed (the quick CPU runs: one step fewer per case).
- Peak extra memory: what the step allocates beyond its inputs (and the outputs/gradients it
  leaves), measured after one warm-up step (compilation and autotuning stay out).
  CUDA: torch.cuda.max_memory_allocated() - memory_allocated() before the step.
  CPU: the process's peak resident set (VmHWM, reset through /proc/self/clear_refs) minus its
  resident set before the step. `run_isolated` gives every case its own process with glibc's
  mmap threshold pinned at 128 KiB, so freed buffers go back to the OS and a warm heap cannot
  hide an allocation.
- Matmul rate: a large square matmul in the benchmark's dtype on the same device, in the same
  run, so "fraction of the card's rate" compares like with like.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable

import torch

from mpo_fast.measure import device_name, peak_extra_bytes, sync, time_ms

__all__ = ["device_name", "matmul_tflops", "measure_case", "out_of_memory", "peak_extra_bytes",
           "run_isolated", "sync", "time_ms"]


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int | None = None) -> float:
    """Measured dense matmul rate (TFLOP/s) of this device in `dtype`, on random data."""
    n = n or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    ms = time_ms(lambda: a @ b, device, warmup=2, repeats=5 if device.type == "cuda" else 3)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def run_isolated(module: str, spec: dict, timeout: float = 3600) -> dict:
    """Run `python -m <module> '<spec json>'` in a fresh process; it prints one JSON result."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    proc = subprocess.run([sys.executable, "-m", module, json.dumps(spec)], capture_output=True,
                          text=True, timeout=timeout, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {**spec, "error": " | ".join(tail) or f"exit code {proc.returncode}"}
    return json.loads(lines[-1])


def out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def measure_case(spec: dict, step: Callable[[], object], flops: float) -> dict:
    """Peak extra memory, median ms and TFLOP/s of `step` (the spec's "device", "warmup",
    "repeats"); one step runs first so compilation and autotuning stay out."""
    device = torch.device(spec["device"])
    try:
        step()
        t0 = time.perf_counter()
        peak = peak_extra_bytes(step, device)
        first_ms = (time.perf_counter() - t0) * 1e3
        repeats = spec.get("repeats", 3)
        if device.type == "cpu" and repeats == 1:
            ms = first_ms  # synchronous: the measured step is the timed one (one step fewer)
        else:
            ms = time_ms(step, device, warmup=spec.get("warmup", 0), repeats=repeats)
    except Exception as exc:
        if not out_of_memory(exc):
            raise
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return {**spec, "error": "out of memory"}
    return {**spec, "ms": ms, "peak_mib": peak / 2**20, "tflops": flops / (ms * 1e-3) / 1e12}
