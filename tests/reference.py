"""Float64 references written straight from docs/DESIGN.md, independent of the library's code."""

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


def seq_logps(token_logps, targets, ignore_index=-100):
    """Per-row sums and completion token counts of a padded [S, T] layout."""
    return token_logps.sum(-1), (targets != ignore_index).sum(-1).double()


def pair_losses(loss_type, c, r, c0, r0, Lc, Lr, beta, e=0.0, delta=0.0, tau=0.05):
    """Per-pair loss straight from the docs/DESIGN.md §3.3 table (float64, differentiable)."""
    ls, s = torch.nn.functional.logsigmoid, torch.sigmoid
    zc, zr = c - c0, r - r0
    D = zc - zr
    u = beta * D
    Lc, Lr = Lc.clamp(min=1), Lr.clamp(min=1)
    if loss_type == "sigmoid":
        return -(1 - e) * ls(u) - e * ls(-u)
    if loss_type == "hinge":
        return torch.relu(1 - u)
    if loss_type == "ipo":
        return (zc / Lc - zr / Lr - 1 / (2 * beta)) ** 2
    if loss_type == "robust":
        return (-(1 - e) * ls(u) + e * ls(-u)) / (1 - 2 * e)
    if loss_type == "bco_pair":
        return -ls(beta * zc - delta) - ls(-(beta * zr - delta))
    if loss_type == "sppo_hard":
        return (zc - 1 / (2 * beta)) ** 2 + (zr + 1 / (2 * beta)) ** 2
    if loss_type == "nca_pair":
        return -ls(beta * zc) - 0.5 * ls(-beta * zc) - 0.5 * ls(-beta * zr)
    if loss_type in ("aot", "aot_pair"):
        if loss_type == "aot":
            d = torch.sort(c - r).values - torch.sort(c0 - r0).values
        else:
            d = torch.sort(zc).values - torch.sort(zr).values
        return -(1 - e) * ls(beta * d) - e * ls(-beta * d)
    if loss_type == "exo_pair":
        return (s(u) * (ls(u) - torch.log(torch.tensor(1 - e, dtype=u.dtype)))
                + s(-u) * (ls(-u) - torch.log(torch.tensor(e, dtype=u.dtype))))
    if loss_type == "apo_zero":
        return 1 - s(beta * zc) + s(beta * zr)
    if loss_type == "apo_down":
        return s(beta * zc) + 1 - s(u)
    if loss_type == "discopop":
        m = s(u / tau)
        return (1 - m) * -ls(u) + m * torch.exp(-u)
    if loss_type == "orpo":
        a = (c / Lc).clamp(max=-1e-6)
        b = (r / Lr).clamp(max=-1e-6)
        lo = (a - b) - (torch.log1p(-torch.exp(a)) - torch.log1p(-torch.exp(b)))
        return -beta * ls(lo)
    raise KeyError(loss_type)


def mpo_loss(token_logps, ref_token_logps, targets, loss_types, loss_weights, beta, e=0.0,
             delta=0.0, tau=0.05, ignore_index=-100):
    """Combined loss from padded [2B, T] per-token log-probs (policy and reference)."""
    seq, count = seq_logps(token_logps, targets, ignore_index)
    ref = ref_token_logps.sum(-1) if ref_token_logps is not None else torch.zeros_like(seq)
    B = seq.shape[0] // 2
    c, r, c0, r0, Lc, Lr = seq[:B], seq[B:], ref[:B], ref[B:], count[:B], count[B:]
    total = torch.zeros((), dtype=torch.float64)
    for t, w in zip(loss_types, loss_weights, strict=True):
        if t == "sft":
            term = -c.sum() / Lc.sum().clamp(min=1)
        else:
            term = pair_losses(t, c, r, c0, r0, Lc, Lr, beta, e, delta, tau).mean()
        total = total + w * term
    return total
