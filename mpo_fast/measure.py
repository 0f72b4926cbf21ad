"""How time and memory are measured, and what the device is called: the one implementation,
used by the benchmarks (bench/ adds the matmul rate and process isolation), the trainer's
demo (`cost`), its metrics (`peak_bytes`) and the harnesses in bench/ (`peak_start` /
`peak_since` around a step someone else's loop runs).

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
import os
import statistics
import time
from collections.abc import Callable

import torch

__all__ = ["cost", "device_name", "peak_bytes", "peak_extra_bytes", "peak_since", "peak_start",
           "pin_mmap_threshold", "sync", "time_ms"]


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


def peak_start(device: torch.device) -> int:
    """Start a peak-memory measurement (the peak counter reset); returns the baseline bytes
    for `peak_since`. For steps run by someone else's loop (a Trainer callback)."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current VmRSS
    return _proc_status_kib("VmRSS") * 1024


def peak_since(device: torch.device, baseline: int) -> int:
    """Peak bytes allocated since `peak_start` returned ``baseline``, beyond it."""
    if device.type == "cuda":
        sync(device)
        return torch.cuda.max_memory_allocated(device) - baseline
    return max(0, _proc_status_kib("VmHWM") * 1024 - baseline)


def peak_bytes(device: torch.device) -> float:
    """Peak memory so far: the CUDA allocator's peak on a GPU, the process's peak resident set
    (VmHWM) on the CPU; NaN where neither can be read."""
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device))
    try:
        return float(_proc_status_kib("VmHWM") * 1024)
    except (OSError, RuntimeError):
        return float("nan")


def peak_extra_bytes(step: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated by one call of `step` beyond what existed before it."""
    baseline = peak_start(device)
    step()
    return peak_since(device, baseline)


def pin_mmap_threshold(nbytes: int = 128 * 1024) -> None:
    """Big buffers from mmap, returned to the OS when freed (glibc; a no-op elsewhere)."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, nbytes)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def cost(step: Callable[[], object], repeats: int = 3, device: torch.device | str = "cpu"
         ) -> dict:
    """{"ms": median time, "peak_mib": peak extra memory} of ``step()`` after one warm-up
    run, with glibc's mmap threshold pinned (`pin_mmap_threshold`)."""
    device = torch.device(device)
    pin_mmap_threshold()
    step()
    peak = peak_extra_bytes(step, device)
    return {"ms": time_ms(step, device, warmup=0, repeats=repeats), "peak_mib": peak / 2**20}


def device_name(device: torch.device | str) -> str:
    """What every result names its device by: the CUDA card's name, or the CPU's model name
    and core count (from /proc/cpuinfo where there is one)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = "CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f
                         if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model} ({os.cpu_count()} cores)"
