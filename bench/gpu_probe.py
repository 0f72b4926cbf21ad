"""What the card does with the fused head, in one process (a step of bench/gpu_suite.sh).

    1. the card: dense bf16 matmul rate and device-to-device copy rate, measured here
    2. correctness: fused_logprobs (Triton) against float64 at awkward shapes (logp, dH, dW)
    3. per shape: policy forward, reference forward and backward with the default configs, the
       backward cut into its logits-gradient kernel and its cuBLAS products, peak extra memory,
       the fraction of the matmul rate, and CCE's fwd+bwd on the same inputs
    4. at the headline shape: the forward and logits-gradient kernels under every tuning
       candidate, and (when `.baseline/` holds the previous kernels) the previous ones

Prints a readable report and writes everything to <out>/probe.json as it goes, so a run cut
short still leaves what it measured:  python -m bench.gpu_probe --out DIR [--quick]

`--dry-run` runs every part on the CPU at toy shapes (set TRITON_INTERPRET=1 first), so the
script is proven here before it spends GPU time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import traceback
from pathlib import Path

import torch

import mpo_fast
from bench import measure
from mpo_fast.kernels import configs, logprob_backward, logprob_forward

SHAPES = [(16384, 4096, 151646), (8192, 2304, 256000)]  # the two MPO-head shapes
CHECKS = [  # (N, H, V, dtype, bias, softcap, temperature): the first H100 review's shapes
    (1000, 4096, 32003, torch.bfloat16, False, None, 1.0),
    (517, 2048, 151646, torch.bfloat16, True, 30.0, 0.7),
    (333, 1536, 50257, torch.float32, True, 30.0, 0.7),
    (64, 896, 151936, torch.float16, False, None, 1.0),
    (1, 4096, 128256, torch.bfloat16, False, None, 1.0),
]
DRY_SHAPES = [(96, 32, 1000), (64, 48, 2100)]
DRY_CHECKS = [(40, 32, 700, torch.bfloat16, False, None, 1.0),
              (33, 24, 500, torch.float32, True, 30.0, 0.7)]
RESULTS: dict = {}
FILE = "probe.json"
DEV = "cuda"


def record(key: str, value, out: Path) -> None:
    RESULTS[key] = value
    (out / FILE).write_text(json.dumps(RESULTS, indent=1, default=str))


def sync() -> None:
    measure.sync(torch.device(DEV))


def cuda_ms(fn, repeats: int = 5, warmup: int = 1) -> float:
    """Median milliseconds of fn() (CUDA events; a host clock on the CPU dry run)."""
    return measure.time_ms(fn, torch.device(DEV), warmup=warmup, repeats=repeats)


def peak_mib(fn) -> float:
    return measure.peak_extra_bytes(fn, torch.device(DEV)) / 2**20


def card(out: Path) -> dict:
    n = 8192 if DEV == "cuda" else 256
    a = torch.randn(n, n, device=DEV).bfloat16()
    b = torch.randn(n, n, device=DEV).bfloat16()
    mm = cuda_ms(lambda: a @ b, repeats=10, warmup=3)
    src = torch.randn(2**28 if DEV == "cuda" else 2**20, device=DEV)  # 1 GiB on the GPU
    dst = torch.empty_like(src)
    cp = cuda_ms(lambda: dst.copy_(src), repeats=10, warmup=3)
    p = torch.cuda.get_device_properties(0) if DEV == "cuda" else None
    info = {"name": p.name if p else "cpu (dry run)", "sms": p.multi_processor_count if p else 0,
            "torch": torch.__version__,
            "triton": __import__("triton").__version__,
            "bf16_tflops": 2 * n**3 / mm / 1e9, "copy_gbs": 2 * src.numel() * 4 / cp / 1e6}
    record("card", info, out)
    print(f"card: {info['name']}, {info['sms']} SMs, bf16 matmul {info['bf16_tflops']:.0f} "
          f"TFLOP/s, copy {info['copy_gbs']:.0f} GB/s (read + write)", flush=True)
    return info


def rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def check(N, H, V, dtype, bias, softcap, temperature) -> dict:
    hidden = torch.randn(N, H, device=DEV).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, device=DEV) * 3 / H**0.5).to(dtype).requires_grad_()
    b = torch.randn(V, device=DEV).to(dtype).requires_grad_() if bias else None
    targets = torch.randint(0, V, (N,), device=DEV)
    targets[torch.rand(N, device=DEV) < 0.2] = -100
    g = torch.randn(N, device=DEV)
    out = mpo_fast.fused_logprobs(hidden, weight, targets, bias=b, softcap=softcap,
                                  temperature=temperature, backend="triton")
    (out * g).sum().backward()
    h64 = hidden.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_() if bias else None
    z = h64 @ w64.T + (b64 if bias else 0)
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    logp = (z / temperature).log_softmax(-1)
    valid = targets != -100
    ref = torch.where(valid, logp.gather(1, targets.clamp(min=0)[:, None])[:, 0], 0.0)
    (ref * g.double()).sum().backward()
    row = {"shape": [N, H, V], "dtype": str(dtype), "bias": bias, "softcap": softcap,
           "err_logp": rel(out, ref), "err_dH": rel(hidden.grad, h64.grad),
           "err_dW": rel(weight.grad, w64.grad), "nan": bool(out.isnan().any())}
    if bias:
        row["err_db"] = rel(b.grad, b64.grad)
    return row


def correctness(out: Path) -> None:
    rows = []
    for case in CHECKS:
        try:
            rows.append(check(*case))
        except Exception as exc:
            rows.append({"shape": case[:3], "error": repr(exc)[:300]})
        print("  check", json.dumps(rows[-1]), flush=True)
        record("correctness", rows, out)
        torch.cuda.empty_cache()


def make(N, H, V, dtype=torch.bfloat16):
    hidden = torch.randn(N, H, device=DEV).to(dtype)
    weight = (torch.randn(V, H, device=DEV) * 2 / H**0.5).to(dtype)
    targets = torch.randint(0, V, (N,), device=DEV)
    return hidden, weight, targets, torch.randn(N, device=DEV)


def head_timings(N, H, V, rate: float, out: Path) -> dict:
    hidden, weight, targets, g = make(N, H, V)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    rows = torch.arange(N, device=DEV)

    def policy_fwd():
        return mpo_fast.fused_logprobs(h, w, targets, backend="triton")

    def ref_fwd():
        with torch.no_grad():
            return mpo_fast.fused_logprobs(hidden, weight, targets, backend="triton")

    def fwd_bwd():
        h.grad = w.grad = None
        policy_fwd().backward(g)

    t0 = time.perf_counter()
    fwd_bwd()
    sync()
    first = time.perf_counter() - t0
    lse, _ = logprob_forward.forward(hidden, weight, None, rows, targets, 1.0, None)

    def bwd_only():
        logprob_backward.backward(hidden, weight, None, rows, targets, lse, g, 1.0, None,
                                  (True, True, False))

    S = logprob_backward.slab_rows(N, V, 2)
    da = torch.empty((N, S), device=DEV, dtype=hidden.dtype)
    cfg = configs.pick("backward", hidden.dtype, N, hidden.device)

    def grad_kernel_only():
        for v0 in range(0, V, S):
            logprob_backward._launch_logit_grad(cfg, hidden, weight, None, targets, lse, g, da,
                                                None, v0, min(S, V - v0), 1.0, None)

    r = {"N": N, "H": H, "V": V, "first_fwd_bwd_s": first,
         "policy_fwd_ms": cuda_ms(policy_fwd), "ref_fwd_ms": cuda_ms(ref_fwd),
         "fwd_bwd_ms": cuda_ms(fwd_bwd, repeats=3), "bwd_ms": cuda_ms(bwd_only, repeats=3),
         "grad_kernel_ms": cuda_ms(grad_kernel_only, repeats=3),
         "peak_fwd_bwd_mib": peak_mib(fwd_bwd), "peak_ref_mib": peak_mib(ref_fwd),
         "slab_rows": S}
    nhv = N * H * V
    r["gemms_ms"] = r["bwd_ms"] - r["grad_kernel_ms"]
    r["fwd_frac"] = 2 * nhv / (r["ref_fwd_ms"] * 1e9) / rate
    r["grad_kernel_frac"] = 2 * nhv / (r["grad_kernel_ms"] * 1e9) / rate
    r["gemms_frac"] = 4 * nhv / (r["gemms_ms"] * 1e9) / rate
    r["mpo_head_ms"] = r["fwd_bwd_ms"] + r["ref_fwd_ms"]
    r["mpo_head_frac"] = 10 * nhv / (r["mpo_head_ms"] * 1e9) / rate
    r.update(cce_head(hidden, weight, targets, g))
    print(f"  N={N} H={H} V={V}: policy fwd {r['policy_fwd_ms']:.1f} ms, ref fwd "
          f"{r['ref_fwd_ms']:.1f} ms ({r['fwd_frac']:.0%} of matmul), bwd {r['bwd_ms']:.1f} ms "
          f"(logits-grad kernel {r['grad_kernel_ms']:.1f} ms = {r['grad_kernel_frac']:.0%}, "
          f"cuBLAS {r['gemms_ms']:.1f} ms = {r['gemms_frac']:.0%}); fwd+bwd "
          f"{r['fwd_bwd_ms']:.1f} ms, peak {r['peak_fwd_bwd_mib']:.0f} MiB; MPO head "
          f"{r['mpo_head_ms']:.1f} ms = {r['mpo_head_frac']:.0%} of matmul; CCE fwd+bwd "
          f"{r.get('cce_fwd_bwd_ms', float('nan')):.1f} ms, peak "
          f"{r.get('cce_peak_mib', float('nan')):.0f} MiB", flush=True)
    return r


def cce_head(hidden, weight, targets, g) -> dict:
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError:
        return {"cce": "not installed"}
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()

    def step():
        h.grad = w.grad = None
        (-linear_cross_entropy(h, w, targets, reduction="none") * g).sum().backward()

    step()
    return {"cce_fwd_bwd_ms": cuda_ms(step, repeats=3), "cce_peak_mib": peak_mib(step)}


@contextlib.contextmanager
def pinned(cfg):
    """Every kernel launched inside uses `cfg` instead of the heuristic's pick."""
    real = configs.pick
    configs.pick = lambda *a, **k: cfg
    try:
        yield
    finally:
        configs.pick = real


def sweep(N, H, V, rate: float, out: Path, quick: bool) -> None:
    hidden, weight, targets, g = make(N, H, V)
    rows = torch.arange(N, device=DEV)
    lse, _ = logprob_forward.forward(hidden, weight, None, rows, targets, 1.0, None)
    S = logprob_backward.slab_rows(N, V, 2)
    da = torch.empty((N, S), device=DEV, dtype=hidden.dtype)
    nhv = N * H * V
    every = configs.CANDIDATES["half"]
    cands = [every[i] for i in (0, 1, 3, 5, 6, 7)] if quick else every
    rows_out = []
    for cfg in cands:
        row = {"config": str(cfg)}
        try:
            with pinned(cfg):
                row["fwd_ms"] = cuda_ms(lambda: logprob_forward.forward(
                    hidden, weight, None, rows, targets, 1.0, None), repeats=3)
            row["fwd_frac"] = 2 * nhv / (row["fwd_ms"] * 1e9) / rate

            def grad_kernel(cfg=cfg):
                for v0 in range(0, V, S):
                    logprob_backward._launch_logit_grad(cfg, hidden, weight, None, targets, lse,
                                                        g, da, None, v0, min(S, V - v0), 1.0,
                                                        None)

            row["grad_kernel_ms"] = cuda_ms(grad_kernel, repeats=3)
            row["grad_kernel_frac"] = 2 * nhv / (row["grad_kernel_ms"] * 1e9) / rate
        except Exception as exc:
            row["error"] = repr(exc)[:200]
        rows_out.append(row)
        record("sweep", rows_out, out)
        print("  sweep", json.dumps(row), flush=True)


def baseline(N, H, V, rate: float, out: Path) -> None:
    """The previous kernels (atomic backward), pinned to one config each, if carried."""
    root = Path(__file__).resolve().parents[1] / ".baseline"
    if not (root / "baseline_kernels").is_dir():
        print("  no .baseline/: previous kernels not measured", flush=True)
        return
    sys.path.insert(0, str(root))
    import triton
    from baseline_kernels import logprob_backward as old_bwd
    from baseline_kernels import logprob_forward as old_fwd

    hidden, weight, targets, g = make(N, H, V)
    rows = torch.arange(N, device=DEV)
    lse, _ = logprob_forward.forward(hidden, weight, None, rows, targets, 1.0, None)
    nhv = N * H * V
    splits = old_fwd._vocab_splits(N, V, hidden.device)
    vps = triton.cdiv(triton.cdiv(V, splits), 256) * 256
    splits = triton.cdiv(V, vps)
    buf = torch.empty((splits, N), device=DEV)
    buf2 = torch.empty_like(buf)

    def fwd():
        old_fwd._logprob_fwd_kernel[(triton.cdiv(N, 128), splits)](
            hidden, weight, weight, rows, targets, buf, buf2, N, V, H, H, H, vps, 1.0, 1.0,
            HAS_BIAS=False, HAS_SOFTCAP=False, UPCAST=False, DOT_PRECISION="tf32",
            BLOCK_N=128, BLOCK_V=256, BLOCK_K=64, num_warps=8, num_stages=3)

    gh = torch.zeros((N, H), device=DEV)
    slab = 8192
    gw = torch.zeros((slab, H), device=DEV)

    def bwd():
        for v0 in range(0, V, slab):
            count = min(slab, V - v0)
            old_bwd._logprob_bwd_kernel[(triton.cdiv(N, 64) * triton.cdiv(count, 128),)](
                hidden, weight, weight, rows, targets, lse, g, gh, gw, gw, N, V, H, H, H, H, H,
                v0, count, 1.0, 1.0, HAS_BIAS=False, HAS_SOFTCAP=False, COMPUTE_GH=True,
                COMPUTE_GW=True, COMPUTE_GB=False, UPCAST=False, DOT_PRECISION="tf32",
                BLOCK_N=64, BLOCK_V=128, BLOCK_K=64, GROUP_N=8, num_warps=4, num_stages=3)

    r = {"fwd_ms": cuda_ms(fwd, repeats=3)}
    r["fwd_frac"] = 2 * nhv / (r["fwd_ms"] * 1e9) / rate
    r["bwd_ms"] = cuda_ms(bwd, repeats=1, warmup=1)
    r["bwd_frac"] = 6 * nhv / (r["bwd_ms"] * 1e9) / rate
    record("baseline", r, out)
    print(f"  previous kernels: fwd {r['fwd_ms']:.1f} ms ({r['fwd_frac']:.0%}), atomic bwd "
          f"{r['bwd_ms']:.1f} ms ({r['bwd_frac']:.0%})", flush=True)


def first_call(out: Path, use_warmup: bool) -> None:
    """Seconds of the first MPOLoss step (policy fwd+bwd, reference fwd, epilogue) at the
    headline shape, in a process whose Triton cache is empty (the suite gives it a fresh
    TRITON_CACHE_DIR); with use_warmup, after mpo_fast.warmup (timed apart)."""
    N, H, V = SHAPES[0]
    B = 4
    if DEV != "cuda":
        N, H, V = 64, 32, 1000
    hidden = torch.randn(2 * B, N // (2 * B), H, device=DEV).bfloat16().requires_grad_()
    ref_hidden = torch.randn_like(hidden)
    weight = (torch.randn(V, H, device=DEV) * 2 / H**0.5).bfloat16().requires_grad_()
    targets = torch.randint(0, V, hidden.shape[:2], device=DEV)
    targets[:, :16] = -100
    loss_fn = mpo_fast.MPOLoss()
    sync()
    r = {}
    if use_warmup:
        t0 = time.perf_counter()
        r["variants"] = mpo_fast.warmup(V, H, torch.bfloat16)
        r["warmup_s"] = time.perf_counter() - t0

    def step():
        loss_fn(hidden, weight, targets, ref_hidden=ref_hidden,
                ref_weight=weight.detach()).loss.backward()
        sync()

    for name in ("first_s", "second_s"):
        t0 = time.perf_counter()
        step()
        r[name] = time.perf_counter() - t0
    key = "warm_start" if use_warmup else "cold_start"
    record(key, r, out)
    print(f"  {key}: " + ", ".join(f"{k} {v:.2f}" for k, v in r.items()), flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_probe", description=__doc__)
    parser.add_argument("--out", default=".")
    parser.add_argument("--quick", action="store_true", help="fewer sweep candidates")
    parser.add_argument("--dry-run", action="store_true", help="CPU, toy shapes (interpreter)")
    parser.add_argument("--parts", default="card,correctness,shapes,sweep,baseline",
                        help="comma list; 'cold' / 'warm' alone time a first MPOLoss call")
    args = parser.parse_args(argv)
    global DEV, SHAPES, CHECKS, FILE, RESULTS
    if args.dry_run:
        DEV, SHAPES, CHECKS = "cpu", DRY_SHAPES, DRY_CHECKS
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    parts = args.parts.split(",")
    if parts in (["cold"], ["warm"]):
        FILE = "first_call.json"
        with contextlib.suppress(OSError, ValueError):
            RESULTS = json.loads((out / FILE).read_text())
        first_call(out, use_warmup=parts == ["warm"])
        return
    info = card(out)
    rate = info["bf16_tflops"]
    steps = [("correctness", lambda: correctness(out)),
             ("shapes", lambda: record("shapes", [head_timings(*s, rate, out)
                                                  for s in SHAPES], out)),
             ("sweep", lambda: sweep(*SHAPES[0], rate, out, args.quick)),
             ("baseline", lambda: baseline(*SHAPES[0], rate, out))]
    for name, step in steps:
        if name not in parts:
            continue
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        try:
            step()
        except Exception:
            traceback.print_exc()
            record(f"{name}_error", traceback.format_exc()[-1500:], out)
        torch.cuda.empty_cache()
        print(f"== {name} took {time.perf_counter() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    main()
