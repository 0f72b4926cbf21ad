"""How a step's time and peak extra memory are measured: one implementation for the benchmarks
(bench/measure.py) and the trainer's comparisons (mpo_fast.train.compare, the demo).

- Time: median of `repeats` runs after `warmup` runs; CUDA events on the GPU, perf_counter on
  the CPU (where the op is synchronous).
- Peak extra memory: what the step allocates beyond what existed before it.
  CUDA: torch.cuda.max_memory_allocated() - memory_allocated() before the step.
  CPU: the process's peak resident set (VmHWM, reset through /proc/self/clear_refs) minus its
  resident set before the step. With glibc's mmap threshold pinned (`pin_mmap_threshold`, or
  MALLOC_MMAP_THRESHOLD_ in a fresh process) freed buffers go back to the OS, so a warm heap
  cannot hide an allocation.
"""

from __future__ import annotations

import ctypes
import statistics
import time
from collections.abc import Callable

import torch

__all__ = ["peak_extra_bytes", "pin_mmap_threshold", "sync", "time_ms"]

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(step: Callable[[], object], device: torch.device, warmup: int = 1,
            repeats: int = 3) -> float:
    """Median milliseconds of `step()` over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        step()
    sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_extra_bytes(step: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated by one call of `step` beyond what existed before it."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current VmRSS
    before = _proc_status_kib("VmRSS")
    step()
    return max(0, _proc_status_kib("VmHWM") - before) * 1024


def pin_mmap_threshold(nbytes: int = 128 * 1024) -> None:
    """Big buffers from mmap, returned to the OS when freed (glibc; a no-op elsewhere)."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, nbytes)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass
