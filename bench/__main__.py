"""mpo-fast benchmarks, one device, one process tree, every number measured in this run:

    python -m bench [SUITE] [--device cpu|cuda] [--quick] [--out DIR] [suite options]

    mpo       the MPO loss head (policy fwd+bwd + reference fwd) against TRL, Liger, CCE and the
              naive full-logits way, with each one's error against a float64 reference
    head      fused per-token log-probs vs naive, forward and forward+backward
    packing   padding-free packing: padding fraction, extension vs torch fallback (--seed)
    accuracy  MPOLoss's error per loss type against float64 (--backend torch|triton)
    all       every suite above (the default)

Writes <suite>.md, <suite>.csv and PNG plots to ./runs/<device>-<date>/ (ignored by git) or to
--out DIR, and names the folder on its last line. Committed results are written only on
purpose: --out bench/results/<device>-<date>.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from bench import head, loss_accuracy, packing, plots, scoreboard
from bench.measure import device_name, matmul_tflops, run_isolated
from bench.report import markdown_table, results_dir, write_csv

try:
    from tqdm import tqdm
except ImportError:  # the progress bar is a nicety (pip install "mpo-fast[bench]")
    def tqdm(items, **_):
        return items

GPU_NS = (8192, 16384, 32768, 65536)
GPU_VS = (92553, 151646, 256000)
# (N, H, V, dtype). The GPU grid is docs/DESIGN.md §6's at H = 4096 (its hardest case). The CPU
# shapes fit 2 cores in minutes; --quick keeps Qwen2's real vocabulary (151,646) with a small H
# and N, the regime the library exists for (at V = 16,384 naive's single GEMM wins instead).
SHAPES = {
    "cpu": [(4096, 512, 32000, "fp32"), (8192, 512, 65536, "fp32")],
    "cpu-quick": [(2048, 64, 151646, "fp32")],
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


def mpo_suite(args: argparse.Namespace) -> str:
    device, shapes = args.device, shapes_for(args.device, args.quick)
    base = {"device": str(device), "repeats": 1 if device.type == "cpu" else 5}
    # each impl's accuracy check runs in the process of its first case of that dtype
    first = {dt: next(s for s in shapes if s[3] == dt) for dt in {s[3] for s in shapes}}
    specs = [{**base, "impl": impl, "N": N, "H": H, "V": V, "dtype": dt,
              "check": first[dt] == (N, H, V, dt)}
             for (N, H, V, dt) in shapes for impl in scoreboard.IMPLS]
    rows = run_all(scoreboard, specs, device, "mpo scoreboard")
    checks = [{**base, "impl": impl, "dtype": "fp32", "accuracy": True}
              for impl in scoreboard.IMPLS if "fp32" not in first]
    accuracy = [{k: v for k, v in r.items() if k in ("impl", "dtype") or k.startswith("err_")}
                for r in rows if r.get("check")]
    accuracy += run_all(scoreboard, checks, device, "accuracy vs float64") if checks else []
    rates = {dt: matmul_tflops(device, scoreboard.DTYPES[dt]) for dt in {s[3] for s in shapes}}
    add_ratios(rows, rates, KEYS)
    for r in rows:
        acc = next((a for a in accuracy if a["impl"] == r["impl"] and a["dtype"] == r["dtype"]),
                   {})
        r.update({k: v for k, v in acc.items() if k.startswith("err_")})
        r["note"] = r["note"] or scoreboard.IMPLS[r["impl"]][2]
    write_csv(rows + accuracy, args.out / "mpo.csv")
    table = markdown_table(rows, [(k, k, "") for k in KEYS] + [("impl", "impl", "")]
                           + COMMON_COLUMNS + [
        ("err_loss", "err loss", ".1e"), ("err_grad_hidden", "err dH", ".1e"),
        ("err_grad_weight", "err dW", ".1e"), ("note", "note", "")])
    text = (f"## MPO loss head: policy fwd+bwd + reference fwd\n\n{header(device, rates)} "
            f"TFLOP/s counts 10NHV (N = completion tokens). Errors: relative to a float64 "
            f"reference at N=512, H=64, V=2000 in the row's dtype (loss, dL/dhidden, "
            f"dL/dweight; liger against sigmoid+SFT, the terms it has). BCO delta = 0 for "
            f"everyone.\n\n{table}\n\n{summary(rows)}\n")
    (args.out / "mpo.md").write_text(text)
    for metric, label in (("ms", "ms"), ("peak_mib", "peak extra MiB"),
                          ("matmul_frac", "fraction of matmul rate")):
        plots.metric_vs_n(rows, metric, label, f"MPO loss head — {device_name(device)}",
                          args.out / f"mpo_{metric}.png")
    return text


def summary(rows: list[dict]) -> str:
    """Per shape: mpo-fast's best time and memory over the best peer's, and why."""
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
                     f"memory ({m['impl']}). {crossover(*shape[:3])}")
    return "Summary:\n" + "\n".join(lines) if lines else ""


def crossover(N: int, H: int, V: int) -> str:
    """One line on when the fused head wins, with this shape's numbers."""
    from mpo_fast.torch_backend import workspace_bytes

    logits = N * V * 4 / 2**20
    return (f"Why: naive holds N x V fp32 logits ({logits:,.0f} MiB here, more again for "
            f"log_softmax and its gradient) where mpo-fast keeps a fixed "
            f"{workspace_bytes() / 2**20:.0f} MiB workspace plus the gradients, so the fused "
            f"head wins on memory once N x V logits dominate it; it recomputes the logits in "
            f"the backward, so on time it is near naive at a large vocabulary and slower at a "
            f"small one (V = 16,384), where naive's single large GEMM is cheaper.")


def head_suite(args: argparse.Namespace) -> str:
    device, shapes = args.device, shapes_for(args.device, args.quick)
    repeats = 1 if device.type == "cpu" else 5
    specs = [{"impl": impl, "mode": mode, "N": N, "H": H, "V": V, "dtype": dt,
              "device": str(device), "repeats": repeats}
             for (N, H, V, dt) in shapes for mode in ("fwd", "fwd+bwd")
             for impl in head.IMPLS if head.available(impl, device) is None]
    rows = run_all(head, specs, device, "head bench")
    rates = {dt: matmul_tflops(device, head.DTYPES[dt]) for dt in {s[3] for s in shapes}}
    add_ratios(rows, rates, (*KEYS, "mode"))
    write_csv(rows, args.out / "head.csv")
    table = markdown_table(rows, [(k, k, "") for k in (*KEYS, "mode", "impl")] + COMMON_COLUMNS
                           + [("note", "note", "")])
    text = (f"## Fused log-prob head\n\n{header(device, rates)} TFLOP/s counts 2NHV (fwd) or "
            f"8NHV (fwd+bwd) for every implementation. Peak extra memory includes the "
            f"gradients the step leaves.\n\n{table}\n")
    (args.out / "head.md").write_text(text)
    for metric, label in (("ms", "ms"), ("peak_mib", "peak extra MiB")):
        plots.metric_vs_n([r for r in rows if r["mode"] == "fwd+bwd"], metric, label,
                          f"fused head fwd+bwd — {device_name(device)}",
                          args.out / f"head_{metric}.png")
    return text


def packing_suite(args: argparse.Namespace) -> str:
    return packing.run(args.device, args.quick, args.out, seed=args.seed)


def accuracy_suite(args: argparse.Namespace) -> str:
    backend = args.backend or ("triton" if args.device.type == "cuda" else "torch")
    return loss_accuracy.run(args.device, args.quick, args.out, backend)


SUITES = {"mpo": mpo_suite, "head": head_suite, "packing": packing_suite,
          "accuracy": accuracy_suite}
HELP = {"mpo": "the MPO loss head against the peers", "head": "fused log-probs vs naive",
        "packing": "padding and pack/unpack speed", "accuracy": "error per loss type vs float64",
        "all": "every suite"}


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--device", type=torch.device, help="cpu or cuda (default: cuda if any)",
                        default="cuda" if torch.cuda.is_available() else "cpu")
    common.add_argument("--quick", action="store_true", help="one small shape per suite")
    common.add_argument("--out", type=Path,
                        help="results folder (default ./runs/<device>-<date>/, git-ignored)")
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="suite", metavar="SUITE")
    for name in (*SUITES, "all"):
        p = sub.add_parser(name, parents=[common], help=HELP[name], description=HELP[name])
        if name in ("packing", "all"):
            p.add_argument("--seed", type=int, default=0, help="packing: length sampling seed")
        if name in ("accuracy", "all"):
            p.add_argument("--backend", choices=["torch", "triton"],
                           help="accuracy: MPOLoss backend (default triton on CUDA, else torch)")
    return parser


def main(argv: list[str] | None = None) -> Path:
    """Run the chosen suites; returns the folder the results went to."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv.insert(0, "all")
    args = build_parser().parse_args(argv)
    args.out = results_dir(args.device, args.out)
    for name, suite in SUITES.items():
        if args.suite in ("all", name):
            print(suite(args), flush=True)
    print(f"Results written to {args.out}/", flush=True)
    return args.out


if __name__ == "__main__":
    main()
