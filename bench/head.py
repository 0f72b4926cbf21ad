"""Head benchmark: per-token log-probs from hidden states, fused vs the naive full-logits way.

    naive        log_softmax((hidden @ weight.T).float()).gather(targets)   ([N, V] fp32 logits)
    fused-torch  mpo_fast.fused_logprobs(..., backend="torch")              (chunked, any device)
    fused-triton mpo_fast.fused_logprobs(..., backend="triton")             (CUDA kernels)

Modes: "fwd" (no grad: the reference model's pass) and "fwd+bwd" (the policy's pass, with a
random per-token upstream gradient). TFLOP/s counts 2NHV for fwd and 8NHV for fwd+bwd
(forward, recompute, two gradient GEMMs) for every implementation, so it is a rate on a common
nominal count and ranks like 1/time.

Run one case in a fresh process: `python -m bench.head '{"impl": ..., "N": ..., ...}'`.
"""

from __future__ import annotations

import json
import sys

import torch

import mpo_fast
from bench.measure import measure_case
from bench.peers import naive_token_logps

IMPLS = ("naive", "fused-torch", "fused-triton")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def available(impl: str, device: torch.device) -> str | None:
    """None if `impl` runs on `device`, else why not."""
    if impl == "fused-triton" and device.type != "cuda":
        return "CUDA only (the CPU interpreter is for tests, not timing)"
    return None


def make_inputs(N: int, H: int, V: int, dtype: torch.dtype, device: torch.device):
    hidden = torch.randn(N, H, device=device).to(dtype)
    weight = (torch.randn(V, H, device=device) * 2 / H**0.5).to(dtype)
    targets = torch.randint(0, V, (N,), device=device)
    upstream = torch.randn(N, device=device)
    return hidden, weight, targets, upstream


def step_fn(impl: str, mode: str, hidden, weight, targets, upstream):
    """A closure running one step of `impl` in `mode` (gradients reset each call)."""
    backend = {"fused-torch": "torch", "fused-triton": "triton"}.get(impl)

    def logprobs():
        if impl == "naive":
            return naive_token_logps(hidden, weight, targets)
        return mpo_fast.fused_logprobs(hidden, weight, targets, backend=backend)

    if mode == "fwd":
        def step():
            with torch.no_grad():
                return logprobs()
        return step
    hidden.requires_grad_()
    weight.requires_grad_()

    def step():
        hidden.grad = weight.grad = None
        (logprobs() * upstream).sum().backward()
    return step


def run_case(spec: dict) -> dict:
    """Measure one (impl, mode, N, H, V, dtype) case; returns the spec plus results."""
    device = torch.device(spec["device"])
    why = available(spec["impl"], device)
    if why:
        return {**spec, "skipped": why}
    N, H, V = spec["N"], spec["H"], spec["V"]
    inputs = make_inputs(N, H, V, DTYPES[spec["dtype"]], device)
    flops = (2 if spec["mode"] == "fwd" else 8) * N * H * V
    return measure_case(spec, step_fn(spec["impl"], spec["mode"], *inputs), flops)


if __name__ == "__main__":
    torch.manual_seed(0)
    print(json.dumps(run_case(json.loads(sys.argv[1]))))
