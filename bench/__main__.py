"""mpo-fast benchmarks, one device, one process tree, every number measured in this run:

    python -m bench [all|mpo|head|packing] [--device cpu|cuda] [--quick] [--out DIR]

    mpo      the MPO loss head (policy fwd+bwd + reference fwd) against TRL, Liger, CCE and the
             naive full-logits way, with each one's error against a float64 reference
    head     fused per-token log-probs vs naive, forward and forward+backward
    packing  padding-free packing: padding fraction and extension vs torch fallback

Writes <suite>.md, <suite>.csv and PNG plots to bench/results/<device>-<date>/ (or --out).
"""

from __future__ import annotations

import argparse
import sys

import torch
from tqdm import tqdm

from bench import head, plots, scoreboard
from bench.measure import device_name, matmul_tflops, run_isolated
from bench.report import markdown_table, results_dir, write_csv

GPU_NS = (8192, 16384, 32768, 65536)
GPU_VS = (92553, 151646, 256000)
# (N, H, V, dtype): CPU shapes fit 2 cores in minutes; the GPU grid is DESIGN.md §6's at
# H = 4096 (its largest H, the hardest case), trimmed by --quick.
SHAPES = {
    "cpu": [(4096, 512, 32000, "fp32"), (8192, 512, 65536, "fp32")],
    "cpu-quick": [(2048, 256, 16384, "fp32")],
    "cuda": [(n, 4096, v, "bf16") for v in GPU_VS for n in GPU_NS],
    "cuda-quick": [(16384, 4096, 151646, "bf16"), (8192, 2304, 256000, "bf16")],
}
KEYS = ("N", "H", "V", "dtype")
COMMON_COLUMNS = [("ms", "ms", ".1f"), ("peak_mib", "peak extra MiB", ".0f"),
                  ("tflops", "TFLOP/s", ".3f"), ("matmul_frac", "of matmul rate", ".1%"),
                  ("time_vs_naive", "time / naive", ".2f"),
                  ("mem_vs_naive", "memory / naive", ".1%")]


def run_all(module, specs, device: torch.device, desc: str) -> list[dict]:
    """CPU cases run in a fresh process each (honest peak RSS); CUDA cases in this one."""
    rows = []
    for spec in tqdm(specs, desc=desc, file=sys.stderr):
        if device.type == "cpu":
            rows.append(run_isolated(module.__name__, spec))
        else:  # one failing case (a peer refusing a dtype) must not lose the others
            try:
                rows.append(module.run_case(spec))
            except Exception as exc:
                rows.append({**spec, "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
            torch.cuda.empty_cache()
    return rows


def add_ratios(rows: list[dict], rates: dict, group: tuple[str, ...]) -> None:
    """Fraction of the matmul rate and time/memory relative to the naive row of the group."""
    for r in rows:
        r["note"] = r.get("error") or r.get("skipped") or r.get("note", "")
        if not r.get("ms"):
            continue
        r["matmul_frac"] = r["tflops"] / rates[r["dtype"]]
        base = next((b for b in rows if b["impl"] == "naive" and b.get("ms")
                     and all(b[k] == r[k] for k in group)), None)
        if base:
            r["time_vs_naive"] = r["ms"] / base["ms"]
            r["mem_vs_naive"] = r["peak_mib"] / max(base["peak_mib"], 1e-9)


def header(device: torch.device, rates: dict) -> str:
    rate = ", ".join(f"{dt} {v:.1f} TFLOP/s" for dt, v in rates.items())
    return f"Device: {device_name(device)}. Measured dense matmul rate: {rate}."


def shapes_for(device: torch.device, quick: bool):
    return SHAPES[device.type + ("-quick" if quick else "")]


def mpo_suite(device: torch.device, quick: bool, out: str | None) -> str:
    shapes = shapes_for(device, quick)
    repeats = 1 if device.type == "cpu" else 5
    base = {"device": str(device), "repeats": repeats}
    specs = [{**base, "impl": impl, "N": N, "H": H, "V": V, "dtype": dt}
             for (N, H, V, dt) in shapes for impl in scoreboard.IMPLS]
    rows = run_all(scoreboard, specs, device, "mpo scoreboard")
    checks = [{**base, "impl": impl, "dtype": dt, "accuracy": True}
              for dt in sorted({s[3] for s in shapes} | {"fp32"}) for impl in scoreboard.IMPLS]
    accuracy = run_all(scoreboard, checks, device, "accuracy vs float64")
    rates = {dt: matmul_tflops(device, scoreboard.DTYPES[dt]) for dt in {s[3] for s in shapes}}
    add_ratios(rows, rates, KEYS)
    for r in rows:
        acc = next((a for a in accuracy if a["impl"] == r["impl"] and a["dtype"] == r["dtype"]),
                   {})
        r.update({k: v for k, v in acc.items() if k.startswith("err_")})
        r["note"] = r["note"] or scoreboard.IMPLS[r["impl"]][2]
    path = results_dir(device, out)
    write_csv(rows + accuracy, path / "mpo.csv")
    table = markdown_table(rows, [(k, k, "") for k in KEYS] + [("impl", "impl", "")]
                           + COMMON_COLUMNS + [
        ("err_loss", "err loss", ".1e"), ("err_grad_hidden", "err dH", ".1e"),
        ("err_grad_weight", "err dW", ".1e"), ("note", "note", "")])
    text = (f"## MPO loss head: policy fwd+bwd + reference fwd\n\n{header(device, rates)} "
            f"TFLOP/s counts 10NHV (N = completion tokens). Errors: relative to a float64 "
            f"reference at N=512, H=64, V=2000 in the row's dtype (loss, dL/dhidden, "
            f"dL/dweight; liger against sigmoid+SFT, the terms it has). BCO delta = 0 for "
            f"everyone.\n\n{table}\n\n{summary(rows)}\n")
    (path / "mpo.md").write_text(text)
    for metric, label in (("ms", "ms"), ("peak_mib", "peak extra MiB"),
                          ("matmul_frac", "fraction of matmul rate")):
        plots.metric_vs_n(rows, metric, label, f"MPO loss head — {device_name(device)}",
                          path / f"mpo_{metric}.png")
    return text


def summary(rows: list[dict]) -> str:
    """Per shape: mpo-fast's best time and memory over the best peer's."""
    lines = []
    for shape in sorted({tuple(r[k] for k in KEYS) for r in rows}):
        same = [r for r in rows if tuple(r[k] for k in KEYS) == shape and r.get("ms")]
        ours = [r for r in same if r["impl"].startswith("mpo-fast")]
        peers = [r for r in same if not r["impl"].startswith("mpo-fast")]
        if not ours or not peers:
            continue
        a = min(ours, key=lambda r: r["ms"])
        b = min(peers, key=lambda r: r["ms"])
        m = min(peers, key=lambda r: r["peak_mib"])
        lines.append(f"- N={shape[0]} H={shape[1]} V={shape[2]} {shape[3]}: {a['impl']} "
                     f"{b['ms'] / a['ms']:.2f}x the speed of the fastest peer ({b['impl']}), "
                     f"{a['peak_mib'] / max(m['peak_mib'], 1e-9):.0%} of the leanest peer's "
                     f"memory ({m['impl']})")
    return "Summary:\n" + "\n".join(lines) if lines else ""


def head_suite(device: torch.device, quick: bool, out: str | None) -> str:
    shapes = shapes_for(device, quick)
    repeats = 1 if device.type == "cpu" else 5
    specs = [{"impl": impl, "mode": mode, "N": N, "H": H, "V": V, "dtype": dt,
              "device": str(device), "repeats": repeats}
             for (N, H, V, dt) in shapes for mode in ("fwd", "fwd+bwd")
             for impl in head.IMPLS if head.available(impl, device) is None]
    rows = run_all(head, specs, device, "head bench")
    rates = {dt: matmul_tflops(device, head.DTYPES[dt]) for dt in {s[3] for s in shapes}}
    add_ratios(rows, rates, (*KEYS, "mode"))
    path = results_dir(device, out)
    write_csv(rows, path / "head.csv")
    table = markdown_table(rows, [(k, k, "") for k in (*KEYS, "mode", "impl")] + COMMON_COLUMNS
                           + [("note", "note", "")])
    text = (f"## Fused log-prob head\n\n{header(device, rates)} TFLOP/s counts 2NHV (fwd) or "
            f"8NHV (fwd+bwd) for every implementation. Peak extra memory includes the "
            f"gradients the step leaves.\n\n{table}\n")
    (path / "head.md").write_text(text)
    for metric, label in (("ms", "ms"), ("peak_mib", "peak extra MiB")):
        plots.metric_vs_n([r for r in rows if r["mode"] == "fwd+bwd"], metric, label,
                          f"fused head fwd+bwd — {device_name(device)}",
                          path / f"head_{metric}.png")
    return text


def packing_suite(device: torch.device, quick: bool, out: str | None) -> str:
    from bench import packing

    args = ["--device", str(device), "--out", str(results_dir(device, out))]
    return packing.main(args + (["--quick"] if quick else []))


SUITES = {"mpo": mpo_suite, "head": head_suite, "packing": packing_suite}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite", nargs="?", default="all", choices=["all", *SUITES])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="one small shape per suite")
    parser.add_argument("--out", help="results folder (default bench/results/<device>-<date>)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    for name, suite in SUITES.items():
        if args.suite in ("all", name):
            print(suite(device, args.quick, args.out), flush=True)


if __name__ == "__main__":
    main()
