"""The preference-loss table, its config, and the functional core `preference_loss`.

Notation (docs/DESIGN.md §3.3): c, r = summed completion log-probs of chosen / rejected under the
policy, c0, r0 the same under the reference, L_c, L_r their completion token counts,
zc = c - c0, zr = r - r0, D = zc - zr, s = sigmoid, ls = logsigmoid, e = label_smoothing.
Each loss below is per pair; the total is sum_k w_k * mean_over_pairs(loss_k). "sft" is
normalized by ``sft_normalize``:

    "token"     -sum_i c_i / sum_i L_c_i           one token mean over the batch (TRL's)
    "sequence"  mean_i (-c_i / L_c_i)              each chosen answer by its own length, then
                                                   the mean over pairs (the paper's Eq. 5)

This is the torch implementation (differentiable by autograd). The fused epilogue kernel
(kernels/loss_epilogue.py) holds the same math in closed form under its own bit constants;
`mpo_fast.epilogue` maps these names to them, and the tests hold the two to each other and to
a float64 reference.

The BCO reward shift (the paper's delta) is the running mean of past rewards by default, both
in `MPOLoss` (a buffer of the module) and in `preference_loss` (the ``bco_state`` you pass and
keep): ``bco_delta="running_mean"``. ``bco_delta="none"`` gives delta = 0 (TRL >= 0.29, Liger).
``bco_delta="lagged"`` uses the mean of the previous calls, before this call's rewards are
folded in (not the paper's: its delta includes the current batch), so each pair's gradient
depends on that pair alone (the single-pass mode of `MPOLoss`).

Empty completions: a sequence with no completion token has log-prob 0 (probability 1), its
length counts as 1 in the per-token averages (ipo, orpo), and its pair still counts in the
batch means; "sft" with "token" divides by the real number of chosen tokens, with "sequence"
such a pair adds 0 to the mean over pairs. `MPOLoss` refuses a batch with no completion token
at all.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

ls = F.logsigmoid

# ORPO takes log(1 - exp(a)) of an average log-prob a <= 0: a is capped here so a completion
# with probability 1 (a = 0) gives a finite loss (the cap also stops its gradient).
ORPO_MAX_AVG_LOGP = -1e-6


@dataclass(frozen=True)
class Pairs:
    """Per-pair inputs of the loss table ([B] tensors) and the hyper-parameters."""

    c: torch.Tensor
    r: torch.Tensor
    c0: torch.Tensor
    r0: torch.Tensor
    len_c: torch.Tensor  # completion token counts, clamped to >= 1
    len_r: torch.Tensor
    beta: float
    e: float  # label smoothing
    delta: torch.Tensor | float  # BCO reward shift
    tau: float  # discopop temperature

    @property
    def zc(self):
        return self.c - self.c0

    @property
    def zr(self):
        return self.r - self.r0

    @property
    def u(self):
        return self.beta * (self.zc - self.zr)


def _smoothed_sigmoid(x, e):
    return -(1 - e) * ls(x) - e * ls(-x)


def _sorted_diff(a, b):
    return torch.sort(a).values - torch.sort(b).values


def _orpo(p: Pairs):
    a = (p.c / p.len_c).clamp(max=ORPO_MAX_AVG_LOGP)
    b = (p.r / p.len_r).clamp(max=ORPO_MAX_AVG_LOGP)
    log_odds = (a - b) - (torch.log(-torch.expm1(a)) - torch.log(-torch.expm1(b)))
    return -p.beta * ls(log_odds)


def _discopop(p: Pairs):
    u = p.u
    m = torch.sigmoid(u / p.tau)
    # m * exp(-u) as exp(ls(u / tau) - u): no inf * 0 when u is very negative
    return (1 - m) * -ls(u) + torch.exp(ls(u / p.tau) - u)


# loss_type -> per-pair loss. "sft" is handled apart (`sft_term`): a token mean or a mean of
# per-answer means, by `LossConfig.sft_normalize`.
# Papers: sigmoid = DPO, arXiv:2305.18290 (e > 0: cDPO); hinge = RSO, 2309.06657;
# ipo 2310.12036; robust 2403.00409; bco_pair 2404.04656; sppo_hard 2405.00675;
# nca_pair 2402.05369; aot, aot_pair 2406.05882; exo_pair 2402.00856; apo_zero, apo_down
# 2408.06266; discopop 2406.08414; orpo 2403.07691; MPO itself 2411.10442.
LOSSES = {
    "sigmoid": lambda p: _smoothed_sigmoid(p.u, p.e),
    "hinge": lambda p: torch.relu(1 - p.u),
    "ipo": lambda p: (p.zc / p.len_c - p.zr / p.len_r - 1 / (2 * p.beta)) ** 2,
    "robust": lambda p: (-(1 - p.e) * ls(p.u) + p.e * ls(-p.u)) / (1 - 2 * p.e),
    "bco_pair": lambda p: -ls(p.beta * p.zc - p.delta) - ls(-(p.beta * p.zr - p.delta)),
    "sppo_hard": lambda p: (p.zc - 1 / (2 * p.beta)) ** 2 + (p.zr + 1 / (2 * p.beta)) ** 2,
    "nca_pair": lambda p: (-ls(p.beta * p.zc) - 0.5 * ls(-p.beta * p.zc)
                           - 0.5 * ls(-p.beta * p.zr)),
    "aot": lambda p: _smoothed_sigmoid(p.beta * _sorted_diff(p.c - p.r, p.c0 - p.r0), p.e),
    "aot_pair": lambda p: _smoothed_sigmoid(p.beta * _sorted_diff(p.zc, p.zr), p.e),
    "exo_pair": lambda p: (torch.sigmoid(p.u) * (ls(p.u) - math.log1p(-p.e))
                           + torch.sigmoid(-p.u) * (ls(-p.u) - math.log(p.e))),
    "apo_zero": lambda p: 1 - torch.sigmoid(p.beta * p.zc) + torch.sigmoid(p.beta * p.zr),
    "apo_down": lambda p: torch.sigmoid(p.beta * p.zc) + 1 - torch.sigmoid(p.u),
    "discopop": _discopop,
    "orpo": _orpo,
}
LOSS_TYPES = (*LOSSES, "sft")
NO_REFERENCE = frozenset({"orpo", "sft"})  # the only types that need no reference log-probs
METRIC_NAMES = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected", "nll_loss", "bco/delta")
MPO_LOSS_TYPES = ("sigmoid", "bco_pair", "sft")
MPO_LOSS_WEIGHTS = (0.8, 0.2, 1.0)
BCO_DELTAS = ("running_mean", "none", "lagged")
SFT_NORMALIZE = ("token", "sequence")


@dataclass(frozen=True)
class LossConfig:
    """The combined loss: its terms, their weights and the hyper-parameters, checked once.

    Args:
        loss_types: names from `LOSS_TYPES`; default MPO = ("sigmoid", "bco_pair", "sft").
        loss_weights: one per type; None means MPO's (0.8, 0.2, 1.0) for the MPO types, else
            1.0 each.
        beta: KL coefficient of the preference terms.
        label_smoothing: e of cDPO / robust / exo_pair / aot.
        bco_delta: "running_mean" (the paper's reward shift, TRL <= 0.28 / InternVL) or
            "none" (delta = 0, TRL >= 0.29 / Liger) or "lagged" (the running mean of the
            previous calls only: a deviation from the paper that makes the gradient
            pair-local, for `MPOLoss(single_pass=...)`). Only "bco_pair" uses it.
        discopop_tau: temperature of the discopop modulation.
        sft_normalize: how "sft" averages the chosen answers' NLL: "token" (the token mean
            over the batch, TRL's) or "sequence" (each answer's NLL over its own length, then
            the mean over pairs: the paper's Eq. 5).
    """

    loss_types: Sequence[str] = MPO_LOSS_TYPES
    loss_weights: Sequence[float] | None = None
    beta: float = 0.1
    label_smoothing: float = 0.0
    bco_delta: str = "running_mean"
    discopop_tau: float = 0.05
    sft_normalize: str = "token"

    def __post_init__(self):
        types = (self.loss_types,) if isinstance(self.loss_types, str) else tuple(self.loss_types)
        if not types:
            raise ValueError("loss_types must name at least one loss")
        unknown = [t for t in types if t not in LOSS_TYPES]
        if unknown:
            raise ValueError(f"unknown loss_types {unknown}; choose from {list(LOSS_TYPES)}")
        if len(set(types)) != len(types):
            raise ValueError(f"loss_types has duplicates: {list(types)}")
        weights = self.loss_weights
        if weights is None:
            weights = MPO_LOSS_WEIGHTS if types == MPO_LOSS_TYPES else (1.0,) * len(types)
        weights = tuple(map(float, weights))
        if len(weights) != len(types):
            raise ValueError(f"loss_weights has {len(weights)} entries for {len(types)} "
                             f"loss_types {list(types)}")
        beta, e = float(self.beta), float(self.label_smoothing)
        if not beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if not 0 <= e < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if "robust" in types and not e < 0.5:
            raise ValueError(f"robust needs label_smoothing < 0.5, got {e}")
        if "exo_pair" in types and not e > 0:
            raise ValueError("exo_pair needs label_smoothing > 0 (its loss has "
                             "log(label_smoothing))")
        if self.bco_delta not in BCO_DELTAS:
            raise ValueError(f"bco_delta must be 'running_mean' or 'none', or 'lagged', got "
                             f"{self.bco_delta!r}")
        if self.sft_normalize not in SFT_NORMALIZE:
            raise ValueError(f"sft_normalize must be 'token' (TRL's token mean) or 'sequence' "
                             f"(the paper's per-answer mean), got {self.sft_normalize!r}")
        if not float(self.discopop_tau) > 0:
            raise ValueError(f"discopop_tau must be > 0, got {self.discopop_tau}")
        for name, value in (("loss_types", types), ("loss_weights", weights), ("beta", beta),
                            ("label_smoothing", e), ("discopop_tau", float(self.discopop_tau))):
            object.__setattr__(self, name, value)

    @property
    def needs_reference(self) -> bool:
        return not set(self.loss_types) <= NO_REFERENCE

    @property
    def running_delta(self) -> bool:
        """Whether a call updates and uses the BCO running mean ("running_mean", "lagged")."""
        return self.bco_delta in ("running_mean", "lagged") and "bco_pair" in self.loss_types

    @property
    def metric_names(self) -> tuple[str, ...]:
        """The metrics a call reports, in order: `METRIC_NAMES`, then "loss/<type>"."""
        return (*METRIC_NAMES, *(f"loss/{t}" for t in self.loss_types))


def new_bco_state(device: torch.device | str | None = None) -> torch.Tensor:
    """A fresh BCO running-mean state: float64 ``[2]`` (mean 0, count ~0, so the first call's
    mean becomes the state's mean). Keep it across calls (and in checkpoints)."""
    return torch.tensor([0.0, 1e-24], dtype=torch.float64, device=device)


def update_bco_state(state: torch.Tensor, rewards_mean: torch.Tensor) -> torch.Tensor:
    """Fold this call's mean reward into the running mean; returns the updated mean (delta).

    `state` is a float64 [2] tensor (mean, count), updated in place. Under torch.distributed
    the per-rank means are all-reduced (sum and count), so every rank gets the same delta,
    equal to what one process seeing every rank's batch would get.
    """
    stats = torch.stack([rewards_mean.detach().to(state), torch.ones((), dtype=state.dtype,
                                                                      device=state.device)])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(stats)
    total, count = stats[0], stats[1]
    new_count = state[1] + count
    state[0] += (total / count - state[0]) * count / new_count
    state[1] = new_count
    return state[0].clone()


def bco_shift(cfg: LossConfig, state: torch.Tensor, rewards_mean: torch.Tensor) -> torch.Tensor:
    """The BCO delta of this call, folding its mean reward into ``state``: the updated mean
    ("running_mean", the paper's), or the mean before this call ("lagged": previous steps
    only, so each pair's gradient is known without the rest of the batch)."""
    before = state[0].clone()
    after = update_bco_state(state, rewards_mean)
    return before if cfg.bco_delta == "lagged" else after


def preference_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    *,
    loss_types: Sequence[str] = MPO_LOSS_TYPES,
    loss_weights: Sequence[float] | None = None,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    sft_loss: torch.Tensor | None = None,
    bco_delta: str = "running_mean",
    bco_state: torch.Tensor | None = None,
    discopop_tau: float = 0.05,
    sft_normalize: str = "token",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """MPO-style combined loss on sequence log-probs (the functional core of `MPOLoss`).

    Args:
        chosen_logps, rejected_logps: ``[B]`` summed completion log-probs under the policy.
        ref_chosen_logps, ref_rejected_logps: ``[B]`` the same under the reference model;
            required unless every loss type is "orpo"/"sft".
        loss_types, loss_weights, beta, label_smoothing, discopop_tau: as in `LossConfig`
            (``L = sum_k w_k * mean_i loss_k(pair i)``; weights default to MPO's for the MPO
            types, else 1.0 each, as in `MPOLoss`).
        chosen_lengths, rejected_lengths: ``[B]`` completion token counts (ipo, orpo and "sft"
            without ``sft_loss`` use them).
        sft_loss: the SFT term if computed elsewhere (a scalar NLL, normalized by the caller:
            ``sft_normalize`` is then unused).
        sft_normalize: "token" (default, TRL's): "sft" is ``-sum(chosen_logps) /
            sum(chosen_lengths)``; "sequence" (the paper's Eq. 5): ``mean(-chosen_logps /
            chosen_lengths)``, lengths clamped to >= 1.
        bco_delta: the BCO reward shift, as in `MPOLoss` and with the same default:
            "running_mean" (the paper's) folds this call's mean reward into ``bco_state`` and
            uses the updated mean; "lagged" folds it in too but uses the mean before it;
            "none" uses delta = 0.
        bco_state: float64 ``[2]`` (running mean, count), updated in place; required with
            "bco_pair" and ``bco_delta="running_mean"`` (make one with `new_bco_state()` and
            keep it across calls). There is no hidden default state: without one the call
            raises rather than silently computing a different loss than `MPOLoss` would.

    Returns:
        (loss, metrics): the scalar loss and TRL-named metrics as detached 0-dim tensors.
    """
    cfg = LossConfig(loss_types, loss_weights, beta, label_smoothing, bco_delta, discopop_tau,
                     sft_normalize)
    c, r = chosen_logps, rejected_logps
    if c.dim() != 1 or c.shape != r.shape:
        raise ValueError(f"chosen_logps and rejected_logps must both be [B], got "
                         f"{tuple(c.shape)} and {tuple(r.shape)}")
    if ref_chosen_logps is None or ref_rejected_logps is None:
        if cfg.needs_reference:
            raise ValueError(f"loss_types {list(cfg.loss_types)} need ref_chosen_logps and "
                             "ref_rejected_logps")
        c0 = r0 = None
    else:
        c0, r0 = ref_chosen_logps.to(c), ref_rejected_logps.to(c)
        if c0.shape != c.shape or r0.shape != c.shape:
            raise ValueError("reference log-probs must have the policy's shape [B]")
    for needer in ("ipo", "orpo"):
        if needer in cfg.loss_types and (chosen_lengths is None or rejected_lengths is None):
            raise ValueError(f"{needer} needs chosen_lengths and rejected_lengths")
    if sft_loss is None and "sft" in cfg.loss_types and chosen_lengths is None:
        raise ValueError("sft needs sft_loss or chosen_lengths")
    if "bco_pair" in cfg.loss_types:
        if cfg.bco_delta != "none" and bco_state is None:
            raise ValueError(
                "bco_pair with bco_delta='running_mean' (the paper's reward shift, and "
                "MPOLoss's default) needs bco_state: pass bco_state=mpo_fast.losses."
                "new_bco_state() and keep it across calls, or bco_delta='none' for delta = 0")
        if cfg.bco_delta == "none" and bco_state is not None:
            raise ValueError("bco_state is only used with bco_delta='running_mean'")
    return combined_loss(cfg, c, r, c0, r0, chosen_lengths, rejected_lengths, sft_loss,
                         bco_state)


def sft_term(cfg: LossConfig, c, chosen_lengths=None, sft_tokens=None):
    """The SFT term on ``[B]`` chosen log-probs: "token" -sum(c) / T with T = ``sft_tokens``
    when given (the denominator from outside: e.g. a whole optimizer step's chosen tokens),
    else sum(L_c); "sequence" mean(-c / max(L_c, 1)). Without lengths every answer counts as
    one token."""
    if cfg.sft_normalize == "sequence":
        lengths = torch.ones_like(c) if chosen_lengths is None else chosen_lengths.to(c)
        return (-c / lengths.clamp(min=1)).mean()
    if sft_tokens is not None:
        return -c.sum() / sft_tokens
    tokens = chosen_lengths.to(c).sum() if chosen_lengths is not None else c.new_tensor(len(c))
    return -c.sum() / tokens.clamp(min=1)


def check_sft_tokens(cfg: LossConfig, sft_tokens) -> float | None:
    """``sft_tokens`` as a float, checked: a finite number > 0, only for the token mean."""
    if sft_tokens is None:
        return None
    if cfg.sft_normalize != "token":
        raise ValueError("sft_tokens is the denominator of the token-mean SFT term; "
                         f"sft_normalize={cfg.sft_normalize!r} has none")
    value = float(sft_tokens)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"sft_tokens must be a finite number > 0, got {sft_tokens!r}")
    return value


def combined_loss(cfg: LossConfig, c, r, c0=None, r0=None, chosen_lengths=None,
                  rejected_lengths=None, sft_loss=None, bco_state=None, sft_tokens=None):
    """`preference_loss` on checked inputs: ``[B]`` tensors (``c0``/``r0`` None = 0), the
    BCO state used only when ``cfg.running_delta``, ``sft_tokens`` the token mean's
    denominator when given (see `sft_term`). Returns (loss, metrics)."""
    zeros = torch.zeros_like(c)
    c0 = zeros if c0 is None else c0
    r0 = zeros if r0 is None else r0
    len_c = torch.ones_like(c) if chosen_lengths is None else chosen_lengths.to(c).clamp(min=1)
    len_r = torch.ones_like(c) if rejected_lengths is None else rejected_lengths.to(c).clamp(
        min=1)
    beta = cfg.beta
    zc, zr = (c - c0).detach(), (r - r0).detach()
    delta = torch.zeros((), dtype=c.dtype, device=c.device)
    if cfg.running_delta:
        delta = bco_shift(cfg, bco_state, torch.cat([beta * zc, beta * zr]).mean()).to(c)
    if sft_loss is None:
        sft_loss = sft_term(cfg, c, chosen_lengths, sft_tokens)

    pairs = Pairs(c, r, c0, r0, len_c, len_r, beta, cfg.label_smoothing, delta,
                  cfg.discopop_tau)
    metrics = {
        "rewards/chosen": (beta * zc).mean(),
        "rewards/rejected": (beta * zr).mean(),
        "rewards/accuracies": (zc > zr).to(c.dtype).mean(),
        "rewards/margins": (beta * (zc - zr)).mean(),
        "logps/chosen": c.detach().mean(),
        "logps/rejected": r.detach().mean(),
        "nll_loss": sft_loss.detach(),
        "bco/delta": delta,
    }
    loss = torch.zeros((), dtype=c.dtype, device=c.device)
    for name, w in zip(cfg.loss_types, cfg.loss_weights, strict=True):
        term = sft_loss if name == "sft" else LOSSES[name](pairs).mean()
        metrics[f"loss/{name}"] = term.detach()
        loss = loss + w * term
    return loss, metrics
