"""Packing benchmark: `python -m bench packing [--device D] [--quick] [--seed S] [--out DIR]`.

1. Planner. Pairs drawn from a realistic length distribution (log-normal prompts clipped to
   64..4096 tokens, log-normal completions clipped to 16..1024, one prompt shared by the chosen
   and the rejected completion). Baseline: micro-batches of B pairs in data order, all 2B
   sequences padded to the longest one (the padded-batch collators of TRL & co.). Planned:
   `mpo_fast.packing.plan` under a token budget; the waste is the unused part of each
   micro-batch's budget, 1 - tokens / (micro-batches * max_tokens). Plus the planner's time,
   C++ against the Python reference.
2. pack + unpack of a padded batch (CPU: 64 sequences x 4096 tokens x hidden 1024): the
   extension against the pure-torch fallback, through the public API. "fresh" allocates the
   outputs on every call (what a caller gets); "into buffers" reuses preallocated outputs
   (`out=`), which isolates the copy kernels from the allocator and the OS's page faults.
   GB/s counts the bytes each pass must move: pack reads and writes N rows, unpack reads N
   rows and writes S*T rows. The machine's copy rate (a warm `copy_` of the same bytes) is
   measured in the same run, and, for context, the boolean-mask idiom many codebases use
   (`x[mask]`, `out[mask] = v`; not this library's fallback).

Writes packing.md to the output folder (see bench/report.py). Every number is from this run.
"""

from __future__ import annotations

import math
import resource
import statistics
import time
from pathlib import Path

import torch

from bench.report import markdown_table
from mpo_fast import packing
from mpo_fast.measure import device_name

# (S, T, H, dtype, lengths) per device; "uniform" lengths are drawn from 1..T, "realistic" from
# the prompt + completion distribution below (clipped to T), "full" are all T.
SPEED_CASES = {
    "cpu": [(64, 4096, 1024, torch.bfloat16, "uniform"), (64, 4096, 1024, torch.bfloat16,
            "realistic"), (64, 4096, 1024, torch.float32, "uniform")],
    "cpu-quick": [(64, 4096, 1024, torch.bfloat16, "uniform")],
    "cuda": [(16, 4096, 4096, torch.bfloat16, "full"), (32, 4096, 4096, torch.bfloat16,
             "uniform")],
    "cuda-quick": [(16, 4096, 4096, torch.bfloat16, "full")],
}
BATCH_PAIRS = (4, 8, 16)
BUDGETS = (16384, 32768)


def realistic_lengths(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor,
                                                              torch.Tensor]:
    """(prompt, chosen, rejected) token counts of n pairs; prompts log-normal with median 512
    clipped to 64..4096 (VLM prompts carry image tokens), completions median 192, 16..1024."""

    def lognormal(median: float, sigma: float, lo: int, hi: int) -> torch.Tensor:
        z = torch.randn(n, generator=gen, dtype=torch.float64)
        return torch.exp(math.log(median) + sigma * z).round().clamp(lo, hi).long()

    return (lognormal(512, 1.0, 64, 4096), lognormal(192, 0.8, 16, 1024),
            lognormal(192, 0.8, 16, 1024))


# ----------------------------------------------------------------------------- planner


def planner_report(n_pairs: int, n_ref: int, gen: torch.Generator) -> str:
    prompt, chosen, rejected = realistic_lengths(n_pairs, gen)
    pair_tokens = 2 * prompt + chosen + rejected
    real = int(pair_tokens.sum())
    rows = []
    seq_max = torch.maximum(prompt + chosen, prompt + rejected)
    by_length = torch.argsort(seq_max)
    for B, order, name in [(B, None, "data order") for B in BATCH_PAIRS] + [
            (8, by_length, "sorted by length, the best a padded batch can do")]:
        usable = n_pairs // B * B
        idx = torch.arange(usable) if order is None else order[:usable]
        padded = int(seq_max[idx].view(-1, B).max(1).values.sum()) * 2 * B
        used = int(pair_tokens[idx].sum())
        rows.append({"layout": f"padded, {B} pairs per micro-batch ({name})",
                     "micro": usable // B, "pad": 100 * (1 - used / padded)})
    for budget in BUDGETS:
        t0 = time.perf_counter()
        bins = packing.plan(pair_tokens, budget)
        seconds = time.perf_counter() - t0
        rows.append({"layout": f"planned, max_tokens={budget}", "micro": len(bins),
                     "pad": 100 * (1 - real / (len(bins) * budget)),
                     "pairs": statistics.mean(len(b) for b in bins), "s": seconds})
    table = markdown_table(rows, [("layout", "layout", ""), ("micro", "micro-batches", ""),
                                  ("pairs", "pairs / micro-batch", ".1f"),
                                  ("pad", "padded or unused tokens %", ".2f"),
                                  ("s", "plan time s", ".3f")])
    sub = pair_tokens[:n_ref]
    timing = []
    for impl in ("extension", "torch") if packing._C is not None else ("torch",):
        t0 = time.perf_counter()
        packing.plan(sub, BUDGETS[0], backend=impl)
        timing.append(f"{impl}: {time.perf_counter() - t0:.3f} s")
    same = packing._C is None or (packing.plan(sub, BUDGETS[0], backend="extension")
                                  == packing.plan(sub, BUDGETS[0], backend="torch"))
    return (f"{n_pairs} pairs, {real} tokens (mean pair {real / n_pairs:.0f} tokens, longest "
            f"{int(pair_tokens.max())}).\n\n{table}\n\nPlanner on {n_ref} pairs, "
            f"max_tokens={BUDGETS[0]}: {', '.join(timing)}; identical plans: {same}.\n")


# ----------------------------------------------------------------------------- pack + unpack


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_ms(steps: dict, device: torch.device, repeats: int) -> tuple[dict, dict]:
    """Median wall ms and median kernel (system) CPU ms of each step, the steps taking turns
    (a noisy, shared machine drifts alike for all). System time is where the OS zero-fills the
    pages of fresh allocations."""
    times: dict = {k: [] for k in steps}
    system: dict = {k: [] for k in steps}
    for step in steps.values():  # warm-up
        step()
    for _ in range(repeats):
        for name, step in steps.items():
            sync(device)
            s0 = resource.getrusage(resource.RUSAGE_SELF).ru_stime
            t0 = time.perf_counter()
            step()
            sync(device)
            times[name].append((time.perf_counter() - t0) * 1e3)
            system[name].append((resource.getrusage(resource.RUSAGE_SELF).ru_stime - s0) * 1e3)
    return ({k: statistics.median(v) for k, v in times.items()},
            {k: statistics.median(v) for k, v in system.items()})


def case_lengths(S: int, T: int, kind: str, gen: torch.Generator) -> torch.Tensor:
    if kind == "full":
        return torch.full((S,), T, dtype=torch.long)
    if kind == "uniform":
        return torch.randint(1, T + 1, (S,), generator=gen)
    prompt, chosen, _ = realistic_lengths(S, gen)
    return (prompt + chosen).clamp(max=T)


def speed_case(S, T, H, dtype, kind, device, repeats, gen) -> tuple[list[dict], dict]:
    x = torch.randn(S, T, H, generator=gen).to(device=device, dtype=dtype)
    lengths = case_lengths(S, T, kind, gen).to(device)
    ref = packing.pack(x, lengths)
    N, cu = ref.num_tokens, ref.cu_seqlens
    row = H * x.element_size()
    moved = (3 * N + S * T) * row  # pack: read N + write N; unpack: read N + write S*T
    steps, impls = {}, ["torch"]
    if (device.type == "cpu" and packing._EXT_CPU) or (device.type == "cuda"
                                                       and packing._EXT_CUDA):
        impls.insert(0, "extension")
    buffers = {}
    for impl in impls:
        def fresh(impl=impl):
            p = packing.pack(x, lengths, backend=impl)
            return p.unpack(p.tokens, backend=impl)

        pk, up = torch.empty_like(ref.tokens), torch.empty_like(x)
        buffers[impl] = (pk, up)

        def into(impl=impl, pk=pk, up=up):
            packing.pack_values(x, cu, N, out=pk, backend=impl)
            packing.unpack(pk, cu, T, out=up, backend=impl)

        steps[(impl, "fresh")] = fresh
        steps[(impl, "into buffers")] = into
    valid = torch.arange(T, device=device)[None, :] < lengths[:, None]

    def bool_mask():  # the common idiom (x[mask], out[mask] = v), for context
        out = torch.zeros_like(x)
        out[valid] = x[valid]
        return out

    steps[("torch bool-mask idiom", "fresh")] = bool_mask
    src, dst = torch.empty_like(x), torch.empty_like(x)
    steps[("copy_", "")] = lambda: dst.copy_(src)  # the machine's copy rate
    ms, sys_ms = interleaved_ms(steps, device, repeats)
    copy_gbs = 2 * x.numel() * x.element_size() / ms[("copy_", "")] / 1e6
    for impl in impls:  # both implementations must agree bit for bit
        pk, up = buffers[impl]
        assert torch.equal(pk, ref.tokens) and torch.equal(up, ref.unpack(ref.tokens))
    rows = []
    for mode in ("fresh", "into buffers"):
        base = ms[("torch", mode)]
        for impl in impls + (["torch bool-mask idiom"] if mode == "fresh" else []):
            t = ms[(impl, mode)]
            rows.append({"case": f"{S}x{T}x{H} {str(dtype).split('.')[-1]}, {kind} lengths",
                         "N": N, "impl": impl, "mode": mode, "ms": t, "sys": sys_ms[(impl, mode)],
                         "gbs": moved / t / 1e6, "copy": 100 * moved / t / 1e6 / copy_gbs,
                         "speedup": base / t})
    return rows, {"copy_gbs": copy_gbs}


def speed_report(device: torch.device, quick: bool, gen: torch.Generator) -> str:
    key = device.type + ("-quick" if quick else "")
    repeats = 3 if quick else 7
    rows, copy = [], []
    for S, T, H, dtype, kind in SPEED_CASES[key]:
        r, info = speed_case(S, T, H, dtype, kind, device, repeats, gen)
        rows += r
        copy.append(info["copy_gbs"])
    table = markdown_table(rows, [
        ("case", "case", ""), ("N", "N tokens", ""), ("impl", "impl", ""), ("mode", "outputs", ""),
        ("ms", "pack+unpack ms", ".1f"), ("sys", "of which OS CPU ms", ".0f"),
        ("gbs", "GB/s moved", ".1f"),
        ("copy", "% of copy_ rate", ".0f"), ("speedup", "speedup vs torch", ".2f")])
    return (f"{table}\n\nCopy rate (`dst.copy_(src)` on warm buffers of the padded size, read + "
            f"write): {', '.join(f'{c:.1f}' for c in copy)} GB/s. Median of {repeats} "
            "interleaved runs.\n")


def machine(device: torch.device) -> str:
    """The device (`mpo_fast.measure.device_name`), torch's threads and version."""
    threads = "" if device.type == "cuda" else f", {torch.get_num_threads()} torch threads"
    return f"{device_name(device)}{threads}, torch {torch.__version__}"


def run(device: torch.device, quick: bool, out: Path, seed: int = 0) -> str:
    """Both reports; writes packing.md to `out` and returns its text."""
    gen = torch.Generator().manual_seed(seed)
    n_pairs, n_ref = (20_000, 5_000) if quick else (200_000, 50_000)
    text = "\n".join([
        f"# Packing benchmark ({machine(device)})\n",
        f"Backend: `{packing.backend()}`. Seed {seed}.\n",
        "## Planner: padding before and after\n",
        planner_report(n_pairs, n_ref, gen),
        "## pack + unpack: extension vs pure-torch fallback\n",
        speed_report(device, quick, gen),
    ])
    (out / "packing.md").write_text(text)
    return text
