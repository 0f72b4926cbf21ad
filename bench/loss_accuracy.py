"""Accuracy of MPOLoss per loss type: relative error of the loss and of its gradients
(hidden, weight, bias) against float64, for fp32 and bf16 inputs.

    python -m bench accuracy [--backend torch|triton] [--quick] [--device D] [--out DIR]

The float64 side runs the same inputs (upcast) through full logits, log_softmax and gather,
then `preference_loss` in float64 (its formulas are held to an independent transcription of
docs/DESIGN.md §3.3 by tests/test_mpo.py). The "triton" backend needs CUDA, or
TRITON_INTERPRET=1 (then use --quick: a shape the interpreter can take).
"""

from __future__ import annotations

from pathlib import Path

import torch

from bench.report import markdown_table
from mpo_fast import MPOLoss, preference_loss
from mpo_fast.losses import LOSS_TYPES

SMOOTHING = {"exo_pair": 0.2, "robust": 0.15, "sigmoid": 0.1, "aot": 0.05, "aot_pair": 0.05}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm().clamp(min=1e-300)).item()


def float64_loss(hidden, weight, bias, ref_hidden, targets, loss_type, beta, e):
    h, w, b = (t.detach().double().requires_grad_() for t in (hidden, weight, bias))

    def token_logps(x, wt, bb):
        logp = torch.log_softmax(x @ wt.T + bb, dim=-1)
        valid = targets != -100
        picked = logp.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
        return torch.where(valid, picked, torch.zeros_like(picked))

    tok = token_logps(h, w, b)
    with torch.no_grad():
        ref = token_logps(ref_hidden.double(), w.detach(), b.detach()).sum(-1)
    seq, count = tok.sum(-1), (targets != -100).sum(-1).double()
    B = seq.shape[0] // 2
    loss, _ = preference_loss(seq[:B], seq[B:], ref[:B], ref[B:], loss_types=(loss_type,),
                              loss_weights=(1.0,), beta=beta, label_smoothing=e,
                              chosen_lengths=count[:B], rejected_lengths=count[B:],
                              bco_delta="none")  # as the MPOLoss it checks
    loss.backward()
    return loss, h.grad, w.grad, b.grad


def measure(loss_type: str, dtype: torch.dtype, backend: str, device: str,
            B: int, T: int, H: int, V: int, beta: float = 0.1) -> dict:
    hidden = torch.randn(2 * B, T, H, device=device).to(dtype)
    weight = (torch.randn(V, H, device=device) * 2 / H**0.5).to(dtype)
    bias = (0.1 * torch.randn(V, device=device)).to(dtype)
    ref_hidden = (hidden.float() + 0.3 * torch.randn_like(hidden, dtype=torch.float32)).to(dtype)
    targets = torch.randint(0, V, (2 * B, T), device=device)
    targets[:, : T // 4] = -100  # prompt
    e = SMOOTHING.get(loss_type, 0.0)
    leaves = [t.requires_grad_() for t in (hidden, weight, bias)]
    fn = MPOLoss(beta=beta, loss_types=(loss_type,), loss_weights=(1.0,), label_smoothing=e,
                 bco_delta="none", backend=backend)
    out = fn(hidden, weight, targets, bias=bias, ref_hidden=ref_hidden,
             ref_weight=weight.detach(), ref_bias=bias.detach())
    out.loss.backward()
    ref = float64_loss(hidden, weight, bias, ref_hidden, targets, loss_type, beta, e)
    return {"loss_type": loss_type, "dtype": str(dtype).replace("torch.", ""),
            "loss": abs(out.loss.item() - ref[0].item()) / max(abs(ref[0].item()), 1e-300),
            "d_hidden": rel(leaves[0].grad, ref[1]), "d_weight": rel(leaves[1].grad, ref[2]),
            "d_bias": rel(leaves[2].grad, ref[3])}


def run(device: torch.device, quick: bool, out: Path, backend: str = "torch") -> str:
    """Every loss type in fp32 and bf16; writes loss_accuracy_<backend>.md to `out`."""
    torch.manual_seed(0)
    B, T, H, V = (2, 16, 32, 500) if quick else (4, 64, 64, 2000)
    rows = [measure(t, dt, backend, str(device), B, T, H, V) for t in LOSS_TYPES
            for dt in (torch.float32, torch.bfloat16)]
    table = markdown_table(rows, [("loss_type", "loss type", ""), ("dtype", "inputs", ""),
                                  ("loss", "err loss", ".1e"), ("d_hidden", "err dH", ".1e"),
                                  ("d_weight", "err dW", ".1e"), ("d_bias", "err db", ".1e")])
    text = (f"## MPOLoss accuracy per loss type ({backend} backend, {device})\n\n"
            f"Relative error against float64 (full logits, same inputs upcast), B={B} pairs, "
            f"T={T} (the first {T // 4} positions are prompt), H={H}, V={V}, beta=0.1, "
            f"BCO delta=0.\n\n"
            f"{table}\n")
    (out / f"loss_accuracy_{backend}.md").write_text(text)
    return text
