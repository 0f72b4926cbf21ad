"""The MPO loss head against its peers: policy forward+backward plus reference forward.

One step = the full MPO loss (0.8 sigmoid DPO + 0.2 BCO pair + 1.0 SFT) of 2B sequences from
hidden states: policy log-probs with gradients, reference log-probs without, the loss, and
backward into hidden and weight. Implementations (bench/peers.py has the peers' details):

    mpo-fast-torch   MPOLoss(backend="torch")       chunked torch head + torch epilogue
    mpo-fast-triton  MPOLoss(backend="triton")      fused Triton head + Triton epilogue (CUDA)
    naive            full [2B, T, V] fp32 logits + log_softmax (InternVL / older TRL)
    trl_chunked      TRL's chunked fused LM head + TRL's own DPOTrainer MPO loss
    liger            Liger FusedLinearDPOLoss: sigmoid + NLL only (no BCO term)
    cce              Cut Cross-Entropy per-token log-probs + the MPO math (CUDA)

All use BCO delta = 0 here (TRL >= 0.29 semantics) so that every loss is the same function and
its error against one float64 reference means something; mpo-fast's running-mean delta costs
nothing extra. TFLOP/s counts 8NHV (policy) + 2NHV (reference) for everyone.

Run one case in a fresh process: `python -m bench.scoreboard '{"impl": ..., ...}'`.
"""

from __future__ import annotations

import json
import sys

import torch

from bench.measure import measure_case
from bench.peers import PEERS, HeadInputs, float64_reference, rel_err
from mpo_fast import MPOLoss

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PAIRS = 4  # B: the N tokens are 2B rows of N / 2B


def _mpo_fast(backend: str):
    def loss(inp: HeadInputs) -> torch.Tensor:
        fn = MPOLoss(beta=inp.beta, loss_weights=inp.loss_weights, bco_delta="none",
                     backend=backend)
        return fn(inp.hidden, inp.weight, inp.targets, ref_hidden=inp.ref_hidden,
                  ref_weight=inp.ref_weight).loss
    return loss


def _mpo_fast_available(backend: str):
    def available(device: torch.device) -> str | None:
        if backend == "triton" and device.type != "cuda":
            return "CUDA only (the CPU interpreter is for tests, not timing)"
        return None
    return available


IMPLS = {
    "mpo-fast-torch": (_mpo_fast_available("torch"), _mpo_fast("torch"), "chunked torch head"),
    "mpo-fast-triton": (_mpo_fast_available("triton"), _mpo_fast("triton"), "fused Triton"),
    **{name: (p.available, p.loss, p.note) for name, p in PEERS.items()},
}
TERMS = {name: PEERS[name].terms if name in PEERS else None for name in IMPLS}


def make_inputs(N: int, H: int, V: int, dtype: torch.dtype, device: torch.device,
                pairs: int = PAIRS) -> HeadInputs:
    """2B rows of T = N / 2B tokens; the first token of every row is a (masked) prompt."""
    T = max(2, N // (2 * pairs))
    hidden = torch.randn(2 * pairs, T, H, device=device).to(dtype)
    ref_hidden = (hidden.float() + 0.1 * torch.randn_like(hidden, dtype=torch.float32)).to(dtype)
    weight = (torch.randn(V, H, device=device) * 2 / H**0.5).to(dtype)
    targets = torch.randint(0, V, (2 * pairs, T), device=device)
    targets[:, 0] = -100
    return HeadInputs(hidden.requires_grad_(), weight.requires_grad_(), targets, ref_hidden,
                      weight.detach().clone())


def step_fn(impl: str, inp: HeadInputs):
    loss_fn = IMPLS[impl][1]

    def step():
        inp.hidden.grad = inp.weight.grad = None
        loss_fn(inp).backward()
    return step


def accuracy(impl: str, dtype: str, device: torch.device) -> dict:
    """Relative error of the loss and both gradients against float64, at a small shape."""
    inp = make_inputs(512, 64, 2000, DTYPES[dtype], device, pairs=2)
    terms = TERMS[impl] or ("sigmoid", "bco_pair", "sft")
    loss_ref, gh_ref, gw_ref = float64_reference(inp, terms)
    inp.hidden.grad = inp.weight.grad = None
    loss = IMPLS[impl][1](inp)
    loss.backward()
    return {"err_loss": abs(loss.item() - loss_ref) / abs(loss_ref),
            "err_grad_hidden": rel_err(inp.hidden.grad, gh_ref),
            "err_grad_weight": rel_err(inp.weight.grad, gw_ref)}


def run_case(spec: dict) -> dict:
    """Measure one (impl, N, H, V, dtype) case, or only the accuracy check if
    spec["accuracy"]; spec["check"] adds the accuracy check to the measured case (one process
    start fewer)."""
    device = torch.device(spec["device"])
    why = IMPLS[spec["impl"]][0](device)
    if why:
        return {**spec, "skipped": why}
    if spec.get("accuracy"):
        return {**spec, **accuracy(spec["impl"], spec["dtype"], device)}
    N, H, V = spec["N"], spec["H"], spec["V"]
    inp = make_inputs(N, H, V, DTYPES[spec["dtype"]], device)
    tokens = int((inp.targets != -100).sum())
    result = measure_case(spec, step_fn(spec["impl"], inp), 10 * tokens * H * V)
    if spec.get("check"):
        del inp
        result.update(accuracy(spec["impl"], spec["dtype"], device))
    return {**result, "tokens": tokens}


if __name__ == "__main__":
    torch.manual_seed(0)
    print(json.dumps(run_case(json.loads(sys.argv[1]))))
