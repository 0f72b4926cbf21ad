"""Issue 21's measurements: every mode of the MPO head beside Liger, in one process, one card.

    python -m bench.modes [--dry-run] [--out DIR] [--repeats 3] [--no-liger]
    python -m bench.modes --first-step V H      (one warm-up + first-step record; a fresh
                                                 TRITON_CACHE_DIR is the caller's job)

Rows, per shape (N completion tokens x H x V, bf16, B pairs of N / 2B tokens per answer):

    impl                         what runs                                          NHV
    two-pass (paper delta)       MPOLoss defaults: BCO running mean incl. this batch  10
    single pass (lagged delta)   MPOLoss(single_pass=True, bco_delta="lagged")         8
                                 (dW summed as a split bf16 pair: + V*H*2 bytes)
    single pass, dW in bf16      the same with dw_accum="weight" (no extra dW memory)    8
    frozen head (paper delta)    MPOLoss(frozen_head=True), head weight frozen          6
    liger                        LigerFusedLinearDPOLoss, sigmoid DPO + NLL             8
    liger, frozen head           the same with the head weight frozen                   8

NHV counts the FLOPs each implementation executes (reference forward included), not a common
nominal number: Liger keeps each chunk's logits and computes the weight gradient even for a
frozen head (torch.func over input and weight), so 8; the frozen-head mode computes no dW and
no recompute, so 6. One matmul rate (a bf16 8192^3 product, measured first) is the
denominator of every percentage. Each row has 3 timed repeats after one warm-up step: the
median and the spread (max - min) / median, the peak extra memory, and its errors against
float64 at a small shape (loss, dH, dW; full logits, log_softmax, gather).

`--dry-run` runs the same rows at tiny shapes on the CPU (the torch backend), so the driver
cannot rot: tests/test_single_pass.py runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import mpo_fast
from mpo_fast.measure import device_name, peak_extra_bytes, sync

SHAPES = [(16384, 4096, 151_646), (8192, 2304, 256_000)]  # the two headline shapes
DRY_SHAPES = [(256, 64, 4096)]
PAIRS = 16
BETA, WEIGHTS = 0.1, (0.8, 0.2, 1.0)
IMPLS = {  # name -> (executed FLOPs in NHV, frozen head)
    "two-pass (paper delta)": (10, False),
    "single pass (lagged delta)": (8, False),
    "single pass, dW summed in bf16": (8, False),
    "frozen head (paper delta)": (6, True),
    "liger": (8, False),
    "liger, frozen head": (8, True),
}


def make_inputs(N, H, V, device, dtype, pairs=PAIRS, seed=0):
    """2B padded answers of N / 2B tokens, a short ignored prompt, logits with std ~3."""
    g = torch.Generator(device=device).manual_seed(seed)
    T = max(2, N // (2 * pairs))
    hidden = torch.randn(2 * pairs, T, H, generator=g, device=device).to(dtype)
    weight = (torch.randn(V, H, generator=g, device=device) * 3 / H**0.5).to(dtype)
    targets = torch.randint(0, V, (2 * pairs, T), generator=g, device=device)
    targets[:, : max(1, T // 16)] = -100
    ref_hidden = (hidden.float() + 0.1 * torch.randn(hidden.shape, generator=g, device=device)
                  ).to(dtype)
    ref_weight = weight.clone()
    return hidden, weight, targets, ref_hidden, ref_weight


def step_fn(impl: str, inputs, backend: str, workspace_mb: float | None = None):
    """A closure running one fwd+bwd of `impl` on fresh leaves; returns (loss, dH, dW).
    `workspace_mb`: MPO_FAST_WORKSPACE_MB during the single-pass step (its groups' kept
    logits; bigger groups are bigger, faster GEMMs)."""
    hidden, weight, targets, ref_hidden, ref_weight = inputs
    frozen = IMPLS[impl][1]
    if impl.startswith("liger"):
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

        module = LigerFusedLinearDPOLoss(beta=BETA, alpha=WEIGHTS[2] / WEIGHTS[0],
                                         compute_nll_loss=True, use_ref_model=True)

        def loss_of(h, w):
            loss, _ = module(w, h, targets, ref_input=ref_hidden, ref_weight=ref_weight)
            return loss * WEIGHTS[0]
    else:
        kw = {"backend": backend}
        if impl.startswith("single"):
            kw.update(single_pass=True, bco_delta="lagged")
        if impl.endswith("in bf16"):
            kw.update(dw_accum="weight")
        if impl.startswith("frozen"):
            kw.update(frozen_head=True)
        loss_fn = mpo_fast.MPOLoss(**kw).to(hidden.device)

        def loss_of(h, w):
            loss_fn.bco_state.copy_(mpo_fast.losses.new_bco_state())  # every step a first
            return loss_fn(h, w, targets, ref_hidden=ref_hidden, ref_weight=ref_weight).loss

    def step():
        saved = os.environ.get("MPO_FAST_WORKSPACE_MB")
        if workspace_mb and impl.startswith("single"):
            os.environ["MPO_FAST_WORKSPACE_MB"] = str(workspace_mb)
        try:
            h = hidden.detach().requires_grad_()
            w = weight.detach().requires_grad_(not frozen)
            loss = loss_of(h, w)
            loss.backward()
        finally:
            if saved is None:
                os.environ.pop("MPO_FAST_WORKSPACE_MB", None)
            else:
                os.environ["MPO_FAST_WORKSPACE_MB"] = saved
        return loss.detach(), h.grad, w.grad

    return step


def reference64(impl: str, inputs):
    """(loss, dH, dW) in float64 for `impl`'s function (its terms, its BCO shift)."""
    hidden, weight, targets, ref_hidden, ref_weight = inputs
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_(not IMPLS[impl][1])
    mask = targets != -100

    def logps(hh, ww):
        lp = (hh @ ww.T).log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
        return (lp * mask).sum(-1)

    seq = logps(h, w)
    with torch.no_grad():
        ref = logps(ref_hidden.double(), ref_weight.double())
    B = seq.shape[0] // 2
    zc, zr = seq[:B] - ref[:B], seq[B:] - ref[B:]
    dpo = -F.logsigmoid(BETA * (zc - zr)).mean()
    sft = -seq[:B].sum() / mask[:B].sum()
    if impl.startswith("liger"):
        loss = WEIGHTS[0] * dpo + WEIGHTS[2] * sft
    else:  # a fresh state: paper delta = this batch's mean reward, lagged = 0
        delta = 0.0 if impl.startswith("single") else (BETA * torch.cat([zc, zr])).mean().item()
        bco = (-F.logsigmoid(BETA * zc - delta) - F.logsigmoid(-(BETA * zr - delta))).mean()
        loss = WEIGHTS[0] * dpo + WEIGHTS[1] * bco + WEIGHTS[2] * sft
    loss.backward()
    return loss.detach(), h.grad, w.grad


def rel_err(a, b) -> float | None:
    if a is None or b is None:
        return None
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm()) if torch.isfinite(a).all() else float("inf")


def matmul_tflops(device, dtype, n) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    reps = 10 if device.type == "cuda" else 2
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def timed(step, device, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def liger_unavailable(device) -> str | None:
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss  # noqa: F401
    except Exception as e:  # any import failure is a skipped row, with its reason
        return f"liger_kernel import failed ({type(e).__name__}: {e})"
    return None


def run(args, save=lambda result: None) -> dict:
    """Every row of the module doc; `save(result)` after each one."""
    device = torch.device("cpu" if args.dry_run else "cuda")
    dtype = torch.bfloat16
    backend = "torch" if args.dry_run else "auto"
    shapes = DRY_SHAPES if args.dry_run else SHAPES
    rate = matmul_tflops(device, dtype, 512 if args.dry_run else 8192)
    result = {"device": device_name(device), "matmul_tflops": rate, "rows": [],
              "torch": torch.__version__, "single_pass_workspace_mb": args.workspace_mb}
    print(f"{result['device']}: bf16 matmul {rate:.3g} TFLOP/s (every % below)", flush=True)
    impls = [i for i in IMPLS if not (args.no_liger and i.startswith("liger"))]
    small = make_inputs(*((256, 64, 2048) if args.dry_run else (512, 256, 8192)), device,
                        dtype, pairs=4, seed=1)
    for N, H, V in shapes:
        inputs = make_inputs(N, H, V, device, dtype)
        for impl in impls:
            row = {"impl": impl, "N": N, "H": H, "V": V, "nhv": IMPLS[impl][0]}
            why = liger_unavailable(device) if impl.startswith("liger") else None
            if why:
                result["rows"].append({**row, "skipped": why})
                save(result)
                print(f"{impl}: skipped ({why})", flush=True)
                continue
            try:
                if impl.startswith("liger"):
                    torch._dynamo.reset()  # compile per shape, outside the timed steps
                step = step_fn(impl, inputs, backend, args.workspace_mb)
                t0 = time.perf_counter()
                step()  # warm-up: compilation and autotuning stay out
                sync(device)
                row["warmup_s"] = time.perf_counter() - t0
                row["peak_mib"] = peak_extra_bytes(step, device) / 2**20
                times = timed(step, device, args.repeats)
                ms = statistics.median(times)
                flops = row["nhv"] * N * H * V
                row.update(ms=ms, times_ms=times, spread=(max(times) - min(times)) / ms,
                           tflops=flops / (ms * 1e-3) / 1e12)
                row["pct_of_card"] = 100 * row["tflops"] / rate
                loss, gh, gw = step_fn(impl, small, backend)()
                ref = reference64(impl, small)
                row.update(err_loss=rel_err(loss, ref[0]), err_dh=rel_err(gh, ref[1]),
                           err_dw=rel_err(gw, ref[2]))
            except Exception as e:  # one failing row must not lose the others
                row["error"] = f"{type(e).__name__}: {e}"[:300]
            del step
            if device.type == "cuda":
                torch.cuda.empty_cache()
            result["rows"].append(row)
            save(result)
            print(json.dumps(row), flush=True)
        del inputs
    return result


def first_step(V: int, H: int, dry_run: bool) -> dict:
    """`mpo_fast.warmup(V, H)` then the first and second MPO steps (fwd + bwd), timed."""
    device = torch.device("cpu" if dry_run else "cuda")
    t0 = time.perf_counter()
    compiled = mpo_fast.warmup(V, H, torch.bfloat16, device)
    warm_s = time.perf_counter() - t0
    inputs = make_inputs(2048 if not dry_run else 128, H, V, device, torch.bfloat16, pairs=4)
    step = step_fn("two-pass (paper delta)", inputs, "torch" if dry_run else "auto")
    out = {"V": V, "H": H, "warmup_s": warm_s, "compiled": compiled}
    for name in ("first_step_s", "second_step_s"):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        out[name] = time.perf_counter() - t0
    return out


def table(result: dict) -> str:
    lines = [f"# MPO head modes on {result['device']} (bf16; torch {result['torch']})", "",
             f"Card bf16 matmul rate, measured in this run: {result['matmul_tflops']:.3g} "
             "TFLOP/s (the denominator of every %).", "",
             "| shape N x H x V | impl | NHV | ms (median) | spread | % of card | peak "
             "extra MiB | err loss | err dH | err dW |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    def f(x, fmt):
        return "-" if x is None else format(x, fmt)

    for r in result["rows"]:
        shape = f"{r['N']} x {r['H']} x {r['V']}"
        if "ms" not in r:
            why = r.get("skipped") or r.get("error")
            lines.append(f"| {shape} | {r['impl']} | {r['nhv']} | {why} | | | | | | |")
            continue
        lines.append(
            f"| {shape} | {r['impl']} | {r['nhv']} | {r['ms']:.1f} | {100 * r['spread']:.1f}% | "
            f"{r['pct_of_card']:.0f}% | {r['peak_mib']:.0f} | {f(r.get('err_loss'), '.1e')} | "
            f"{f(r.get('err_dh'), '.1e')} | {f(r.get('err_dw'), '.1e')} |")
    for fs in result.get("first_step", []):
        lines += ["", f"First step after `mpo_fast.warmup({fs['V']}, {fs['H']})` "
                      f"({fs['compiled']} kernels, {fs['warmup_s']:.1f} s): "
                      f"{fs['first_step_s']:.2f} s, then {fs['second_step_s']:.2f} s."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.modes", description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU")
    p.add_argument("--out", default=None, help="folder for modes.md (and modes.json)")
    p.add_argument("--json-out", default=None, help="where modes.json goes (default: --out)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-liger", action="store_true")
    p.add_argument("--workspace-mb", type=float, default=1024,
                   help="MPO_FAST_WORKSPACE_MB of the single-pass rows (default 1024)")
    p.add_argument("--first-step", nargs=2, type=int, metavar=("V", "H"))
    args = p.parse_args(argv)
    if args.first_step:
        print(json.dumps(first_step(*args.first_step, args.dry_run)), flush=True)
        return 0
    # first: the first step after warmup, on an empty Triton cache, in a fresh process (so
    # nothing this process compiles helps it); then the rows, each written out as it comes,
    # so a time limit that stops the run still leaves the table so far
    import subprocess
    import tempfile

    first = []
    for _N, H, V in (DRY_SHAPES if args.dry_run else SHAPES)[:1]:
        env = {**os.environ, "TRITON_CACHE_DIR": tempfile.mkdtemp(prefix="triton-")}
        cmd = [sys.executable, "-m", "bench.modes", "--first-step", str(V), str(H)]
        try:
            proc = subprocess.run(cmd + (["--dry-run"] if args.dry_run else []), env=env,
                                  capture_output=True, text=True, timeout=150)
        except subprocess.TimeoutExpired:
            print("first step: over 150 s", flush=True)
            continue
        lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
        if lines:
            first.append(json.loads(lines[-1]))
            print(lines[-1], flush=True)
        else:
            print("first step failed:", proc.stderr[-500:], flush=True)

    def save(result):
        result["first_step"] = first
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "modes.md").write_text(table(result))
            json_dir = Path(args.json_out or args.out)
            json_dir.mkdir(parents=True, exist_ok=True)
            (json_dir / "modes.json").write_text(json.dumps(result, indent=1))

    result = run(args, save)
    save(result)
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
