"""Single-pass mode: dW summed across groups of pairs in bf16 vs fp32, against float64 (CPU).

    python -m bench.dw_accum [--tokens 4096 --hidden 256 --vocab 8192] [--gpu-rounding]

The single pass adds each group's dW (an fp32 product) into the gradient: in the weight's
dtype (dw_accum="weight": G roundings to bf16, no extra memory), as a split bf16 sum plus
remainder (dw_accum="split": V*H*2 bytes more) or in an fp32 [V, H] buffer rounded once at
the end (dw_accum="fp32": V*H*4 bytes more). The two-pass backward rounds dW
once (its dW of a vocab slab is one product over every token). This prints ||dW - dW64|| /
||dW64|| for each, for group counts G set through the workspace; `--gpu-rounding` also rounds
dZ to bf16 before the products, as the CUDA path does.
"""

from __future__ import annotations

import argparse
import os

import torch

import mpo_fast
from mpo_fast import torch_backend


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.dw_accum")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--pairs", type=int, default=64)
    p.add_argument("--gpu-rounding", action="store_true")
    args = p.parse_args(argv)
    if args.gpu_rounding:
        torch_backend.tensor_core_products = lambda hidden: True
    torch.manual_seed(0)
    B, H, V = args.pairs, args.hidden, args.vocab
    T = args.tokens // (2 * B)
    hidden = torch.randn(2 * B, T, H).bfloat16()
    weight = (torch.randn(V, H) * 3 / H**0.5).bfloat16()
    targets = torch.randint(0, V, (2 * B, T))
    ref_hidden = (hidden.float() + 0.1 * torch.randn_like(hidden.float())).bfloat16()
    kw = {"loss_types": ("sigmoid", "bco_pair", "sft"), "bco_delta": "lagged",
          "backend": "torch"}

    def dw(**opts):
        w = weight.clone().requires_grad_()
        out = mpo_fast.MPOLoss(**kw, **opts)(hidden, w, targets, ref_hidden=ref_hidden,
                                             ref_weight=weight)
        out.loss.backward()
        return w.grad

    h64, w64 = hidden.double(), weight.double().requires_grad_()
    loss_fn = mpo_fast.MPOLoss(**kw)
    loss_fn(h64, w64, targets, ref_hidden=ref_hidden.double(), ref_weight=weight.double()
            ).loss.backward()
    ref = w64.grad

    def err(x):
        return float((x.double() - ref).norm() / ref.norm())

    print(f"N={args.tokens} H={H} V={V} pairs={B}; dW relative error vs float64"
          f"{' (dZ rounded to bf16)' if args.gpu_rounding else ''}")
    print(f"two-pass (one rounding): {err(dw()):.2e}")
    per_token = 4 * (V + 2 * H)
    for groups in (1, 4, 16, 64):
        if groups > B:
            continue
        tokens = args.tokens // groups
        fixed = 2 * 4 * min(V, 4096) * H
        os.environ["MPO_FAST_WORKSPACE_MB"] = str((fixed + tokens * per_token) / 2**20)
        errs = {mode: err(dw(single_pass=True, dw_accum=mode))
                for mode in ("weight", "split", "fp32")}
        print(f"single pass, G={groups:3d}: " + ", ".join(
            f"dw_accum={mode!r} {e:.2e}" for mode, e in errs.items()))
        os.environ.pop("MPO_FAST_WORKSPACE_MB")


if __name__ == "__main__":
    main()
