"""mpo-fast benchmarks: `python -m bench [head|all] [--device cpu|cuda] [--quick] [--out DIR]`.

Writes markdown tables, CSV and PNG plots to bench/results/<device>-<date>/ and prints the
tables. Every number in a table was measured in this run, on this device.
"""

from __future__ import annotations

import argparse
import sys

import torch
from tqdm import tqdm

from bench import head, plots
from bench.measure import device_name, matmul_tflops, run_isolated
from bench.report import markdown_table, results_dir, write_csv

# (N, H, V, dtype) per device. The CPU shapes fit 2 cores in minutes; the GPU grid is
# DESIGN.md §6's, trimmed by --quick.
HEAD_SHAPES = {
    "cpu": [(4096, 512, 32000, "fp32"), (8192, 512, 65536, "fp32")],
    "cpu-quick": [(2048, 256, 16384, "fp32")],
    "cuda": [(n, 4096, v, "bf16") for v in (92553, 151646, 256000)
             for n in (8192, 16384, 32768, 65536)],
    "cuda-quick": [(16384, 4096, 151646, "bf16")],
}


def run(spec: dict, device: torch.device) -> dict:
    """CPU cases run in a fresh process each (honest peak RSS); CUDA cases in this one."""
    if device.type == "cpu":
        return run_isolated("bench.head", spec)
    return head.run_case(spec)


def head_suite(device: torch.device, quick: bool, out: str | None) -> str:
    key = device.type + ("-quick" if quick else "")
    repeats = 1 if quick and device.type == "cpu" else 3
    specs = [
        {"impl": impl, "mode": mode, "N": N, "H": H, "V": V, "dtype": dt,
         "device": str(device), "repeats": repeats}
        for (N, H, V, dt) in HEAD_SHAPES[key] for mode in ("fwd", "fwd+bwd")
        for impl in head.IMPLS if head.available(impl, device) is None
    ]
    rows = [run(s, device) for s in tqdm(specs, desc="head bench", file=sys.stderr)]
    dtypes = sorted({s["dtype"] for s in specs})
    rates = {dt: matmul_tflops(device, head.DTYPES[dt]) for dt in dtypes}
    for r in rows:
        base = next((b for b in rows if b["impl"] == "naive" and b.get("ms") and all(
            b[k] == r[k] for k in ("mode", "N", "H", "V", "dtype"))), None)
        if r.get("ms"):
            r["matmul_frac"] = r["tflops"] / rates[r["dtype"]]
            if base:
                r["time_vs_naive"] = r["ms"] / base["ms"]
                r["mem_vs_naive"] = r["peak_mib"] / max(base["peak_mib"], 1e-9)
        r["note"] = r.get("error") or r.get("skipped") or ""
    path = results_dir(device, out)
    write_csv(rows, path / "head.csv")
    table = markdown_table(rows, [
        ("N", "N", ""), ("H", "H", ""), ("V", "V", ""), ("dtype", "dtype", ""),
        ("mode", "mode", ""), ("impl", "impl", ""), ("ms", "ms", ".1f"),
        ("peak_mib", "peak extra MiB", ".0f"), ("tflops", "TFLOP/s", ".3f"),
        ("matmul_frac", "of matmul rate", ".1%"), ("time_vs_naive", "time / naive", ".2f"),
        ("mem_vs_naive", "memory / naive", ".1%"), ("note", "note", ""),
    ])
    rate_line = ", ".join(f"{dt} {v:.2f} TFLOP/s" for dt, v in rates.items())
    text = (f"## Fused log-prob head — {device_name(device)}\n\n"
            f"Measured matmul rate on this device: {rate_line}. TFLOP/s counts 2NHV (fwd) or "
            f"8NHV (fwd+bwd) for every implementation. Peak extra memory includes the gradients "
            f"the step leaves.\n\n{table}\n")
    (path / "head.md").write_text(text)
    for metric, label in (("ms", "ms"), ("peak_mib", "peak extra MiB")):
        plots.metric_vs_n([r for r in rows if r["mode"] == "fwd+bwd"], metric, label,
                          f"fused head fwd+bwd — {device_name(device)}",
                          path / f"head_{metric}.png")
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("suite", nargs="?", default="all", choices=["head", "all"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="one small shape per suite")
    parser.add_argument("--out", help="results folder (default bench/results/<device>-<date>)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.suite in ("head", "all"):
        print(head_suite(device, args.quick, args.out))


if __name__ == "__main__":
    main()
