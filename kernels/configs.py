"""Launch configurations of the log-prob kernels: one fixed pick per architecture by default,
timed on the call's own arguments only when asked (MPO_FAST_AUTOTUNE=1).

Why fixed: Triton's autotuner compiles every candidate on the first call (~30 s for nine fp32
configs on an H100) and a kernel that accumulates into its outputs needs snapshots to be timed.
A fixed pick compiles one kernel per (dtype, flags), so the first MPOLoss call costs a few
seconds, and `mpo_fast.warmup` can pay that before training.

The heuristic (`pick`), for a tile of BLOCK_N tokens x BLOCK_V vocab rows streaming H in
BLOCK_K slices:

    bf16 / fp16, sm_90 (H100/H200)   128 x 256 x 64, 8 warps, 3 stages: wgmma m64n256, a
        128-register fp32 accumulator per thread, 144 KiB of shared memory (of 227 KiB).
    bf16 / fp16, sm_80 and others    128 x 128 x 64, 8 warps, 3 stages (96 KiB: fits sm_86);
        also the backward's with softcap on sm_90 (128 x 256 spills 4 KB of registers there).
    fewer than 4 token blocks        BLOCK_N halves to 64, so small batches still spread.
    fp32                             64 x 64 x 32, 4 warps, 2 stages: IEEE fp32 products run
        on the FMA units, and bigger tiles spill registers (30-46 KB of spill code seen).
    interpreter (TRITON_INTERPRET=1) 16 x 32 x 16: the CPU tests' speed, no GPU limits.

GROUP_N (the backward's program order): that many token blocks sweep the same vocab tiles
together, so a weight tile is read from DRAM once per group, not once per token block.
`min_splits`, `split_fastest` (the forward's): the vocabulary is cut in at least this many
splits (more when few token blocks would leave SMs idle); the token block varies fastest in the
grid unless `split_fastest`. Measured on an H100 at 16k x 4096 x 151,646 bf16: token-fastest
with 3 splits 40.8 ms, split-fastest with 8 / 16 / 32 splits 42.9 / 46.6 / 51.1 ms.

Autotuning (MPO_FAST_AUTOTUNE=1): every candidate of `CANDIDATES` is timed with
`triton.testing.do_bench` on the real arguments (the kernels only write their outputs, so
trial runs are harmless), and the fastest is kept per (kernel, device, dtype, H, V, flags,
token-count bucket) in memory and in ~/.cache/mpo_fast/autotune.json (MPO_FAST_CACHE_DIR).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import triton

from .tl_utils import interpreting


@dataclass(frozen=True)
class TileConfig:
    block_n: int
    block_v: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    group_n: int = 8
    min_splits: int = 1
    split_fastest: bool = False

    def launch_kwargs(self) -> dict:
        return {"BLOCK_N": self.block_n, "BLOCK_V": self.block_v, "BLOCK_K": self.block_k,
                "num_warps": self.num_warps, "num_stages": self.num_stages}


INTERPRETER = TileConfig(16, 32, 16, num_warps=1, num_stages=1, group_n=2, min_splits=1)
HOPPER = TileConfig(128, 256, 64, num_warps=8, num_stages=3)
AMPERE = TileConfig(128, 128, 64, num_warps=8, num_stages=3)
FP32 = TileConfig(64, 64, 32, num_warps=4, num_stages=2)

CANDIDATES = {
    "half": [HOPPER, AMPERE,
             TileConfig(128, 256, 64, num_warps=8, num_stages=4),
             TileConfig(64, 256, 64, num_warps=8, num_stages=3),
             TileConfig(128, 128, 64, num_warps=4, num_stages=4),
             TileConfig(128, 256, 64, num_warps=8, num_stages=3, min_splits=8),
             TileConfig(128, 256, 64, num_warps=8, num_stages=3, min_splits=8,
                         split_fastest=True),
             TileConfig(128, 256, 64, num_warps=8, num_stages=3, min_splits=16,
                         split_fastest=True),
             TileConfig(128, 256, 64, num_warps=8, num_stages=3, group_n=16)],
    "fp32": [FP32, TileConfig(64, 64, 32, num_warps=4, num_stages=3),
             TileConfig(32, 64, 32, num_warps=4, num_stages=2),
             TileConfig(64, 128, 32, num_warps=8, num_stages=2)],
}


def _family(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "half"


def _capability(device: torch.device) -> tuple[int, int]:
    if device.type != "cuda":
        return (0, 0)
    return torch.cuda.get_device_capability(device)


def pick(kernel: str, dtype: torch.dtype, M: int, device: torch.device,
         softcap: bool = False) -> TileConfig:
    """The fixed configuration of `kernel` ("forward" | "backward") (module docstring)."""
    if interpreting() or device.type != "cuda":
        return INTERPRETER
    if dtype == torch.float32:
        return FP32
    cfg = HOPPER if _capability(device)[0] >= 9 else AMPERE
    if kernel == "backward" and softcap:
        cfg = AMPERE  # tanh's derivative makes 128 x 256 spill 4 KB; 128 x 128 does not
    if triton.cdiv(M, cfg.block_n) < 4:
        cfg = dataclasses.replace(cfg, block_n=64)
    return cfg


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def autotune_requested() -> bool:
    return os.environ.get("MPO_FAST_AUTOTUNE", "0") == "1" and not interpreting()


def _cache_path() -> Path:
    root = os.environ.get("MPO_FAST_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "mpo_fast")
    return Path(root) / "autotune.json"


_memory: dict[str, TileConfig] = {}


def _load_cache() -> dict:
    try:
        return json.loads(_cache_path().read_text())
    except (OSError, ValueError):
        return {}


def _store(key: str, cfg: TileConfig) -> None:
    path = _cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        table = _load_cache()
        table[key] = asdict(cfg)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(table, indent=1, sort_keys=True))
        tmp.replace(path)  # atomic: a concurrent reader sees the old or the new table
    except OSError:
        pass  # a read-only home still tunes, in memory


def choose(kernel: str, dtype: torch.dtype, M: int, H: int, V: int, flags: tuple,
           device: torch.device, run: Callable[[TileConfig], object]) -> TileConfig:
    """The config to launch `kernel` with: `pick`, or the timed winner under autotuning.

    `flags` = (has bias, has softcap, ...); `run(cfg)` launches the kernel once with `cfg`
    (only called when tuning).
    """
    fixed = pick(kernel, dtype, M, device, softcap=flags[1])
    if not autotune_requested():
        return fixed
    bucket = 1 << max(0, (M - 1).bit_length())  # powers of two: a few tunings per model
    key = "|".join(map(str, (kernel, _device_name(device), dtype, H, V, flags,
                             bucket, triton.__version__)))
    if key in _memory:
        return _memory[key]
    saved = _load_cache().get(key)
    if saved is not None:
        _memory[key] = TileConfig(**saved)
        return _memory[key]
    from triton.testing import do_bench

    timings = {}
    for cfg in CANDIDATES[_family(dtype)]:
        try:
            timings[cfg] = do_bench(lambda cfg=cfg: run(cfg), warmup=5, rep=20)
        except Exception:  # a candidate that cannot run here (shared memory, registers)
            continue
    best = min(timings, key=timings.get) if timings else fixed
    _memory[key] = best
    _store(key, best)
    return best
