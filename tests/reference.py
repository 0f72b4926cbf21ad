"""Float64 references written straight from DESIGN.md, independent of the library's code."""

from __future__ import annotations

import torch


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN/inf anywhere in `out` is an infinite error."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    denom = ref.norm().item()
    return (out - ref).norm().item() / (denom if denom > 0 else 1.0)


def logprobs(hidden, weight, targets, bias=None, ignore_index=-100, temperature=1.0,
             softcap=None):
    """Full logits, log_softmax, gather — all in float64. Differentiable."""
    z = hidden.double() @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    logp = torch.log_softmax(z, dim=-1)
    valid = targets != ignore_index
    picked = logp.gather(-1, torch.where(valid, targets, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, picked, torch.zeros_like(picked))


def leaf64(t: torch.Tensor | None) -> torch.Tensor | None:
    """A float64 leaf copy of `t` (exactly its values) that records gradients."""
    return None if t is None else t.detach().double().requires_grad_()
