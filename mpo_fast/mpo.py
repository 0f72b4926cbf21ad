"""`MPOLoss`: the combined preference loss (MPO by default) straight from hidden states.

    hidden --fused_logprobs--> token log-probs --Epilogue--> loss, metrics, sequence log-probs

Neither the policy nor the reference ever materializes logits; the reference pass runs without
grad and saves nothing. The BCO reward shift's running mean is a buffer of this module, so it
is in `state_dict()` and survives checkpoints.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .epilogue import Epilogue, LossConfig
from .layout import Segments
from .logprobs import fused_logprobs, resolve_backend
from .losses import check_loss_config

MPO_LOSS_TYPES = ("sigmoid", "bco_pair", "sft")
MPO_LOSS_WEIGHTS = (0.8, 0.2, 1.0)


@dataclass
class MPOOutput:
    loss: torch.Tensor  # scalar, differentiable
    metrics: dict[str, torch.Tensor]  # TRL names, detached 0-dim tensors (no host sync)
    chosen_logps: torch.Tensor  # [B] fp32 summed completion log-probs, differentiable
    rejected_logps: torch.Tensor  # [B]


class MPOLoss(nn.Module):
    """Weighted sum of preference losses on (chosen, rejected) pairs, from hidden states.

    Args:
        beta: KL coefficient of the preference terms.
        loss_types: any of `mpo_fast.losses.LOSS_TYPES`; default MPO = sigmoid + bco_pair + sft.
        loss_weights: one per type; None means (0.8, 0.2, 1.0) for the MPO default, else 1.0.
        label_smoothing: e of cDPO / robust / exo_pair / aot.
        bco_delta: "running_mean" (the paper's reward shift; TRL <= 0.28 / InternVL) or "none".
        ignore_index: target value of prompt, image and padding positions.
        temperature, softcap, backend: passed to `fused_logprobs`.
        discopop_tau: temperature of the discopop modulation.
    """

    def __init__(
        self,
        beta: float = 0.1,
        loss_types: Sequence[str] = MPO_LOSS_TYPES,
        loss_weights: Sequence[float] | None = None,
        label_smoothing: float = 0.0,
        bco_delta: str = "running_mean",
        ignore_index: int = -100,
        temperature: float = 1.0,
        softcap: float | None = None,
        discopop_tau: float = 0.05,
        backend: str = "auto",
    ):
        super().__init__()
        if loss_weights is None and tuple(loss_types) == MPO_LOSS_TYPES:
            loss_weights = MPO_LOSS_WEIGHTS
        types, weights = check_loss_config(loss_types, loss_weights, beta, label_smoothing)
        if bco_delta not in ("running_mean", "none"):
            raise ValueError(f"bco_delta must be 'running_mean' or 'none', got {bco_delta!r}")
        self.cfg = LossConfig(types, weights, float(beta), float(label_smoothing),
                              float(discopop_tau), int(ignore_index),
                              running_delta=bco_delta == "running_mean" and "bco_pair" in types)
        self.head = {"temperature": temperature, "softcap": softcap, "backend": backend,
                     "ignore_index": int(ignore_index)}
        # BCO running mean and count (count starts at ~0, so the first batch sets the mean)
        self.register_buffer("bco_state", torch.tensor([0.0, 1e-24], dtype=torch.float64))

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"loss_types={c.loss_types}, loss_weights={c.loss_weights}, beta={c.beta}, "
                f"label_smoothing={c.label_smoothing}, running_delta={c.running_delta}")

    def forward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        *,
        cu_seqlens: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        ref_logps: tuple[torch.Tensor, torch.Tensor] | None = None,
        ref_hidden: torch.Tensor | None = None,
        ref_weight: torch.Tensor | None = None,
        ref_bias: torch.Tensor | None = None,
    ) -> MPOOutput:
        """Loss of a batch of 2B sequences: rows 0..B-1 chosen, B..2B-1 rejected (pair i is
        (i, B+i)).

        Padded: hidden [2B, T, H], targets [2B, T]. Packed: hidden [N, H], targets [N] and
        cu_seqlens int32 [2B+1]. Targets are shifted; prompt/image/pad positions are
        ignore_index. Reference: `ref_logps=(ref_chosen [B], ref_rejected [B])`, or reference
        hidden states (same layout as hidden) with the reference head `ref_weight` (and
        `ref_bias`). ORPO and SFT need no reference.
        """
        segs = self._segments(hidden, targets, cu_seqlens)
        B = segs.num_seqs // 2
        logp = fused_logprobs(hidden, weight, targets, bias=bias, **self.head).reshape(-1)
        ref_logp, ref_seq = self._reference(hidden, targets, B, ref_logps, ref_hidden,
                                            ref_weight, ref_bias)
        if self.bco_state.device != logp.device:
            self.bco_state = self.bco_state.to(logp.device)
        state = self.bco_state if self.cfg.running_delta else None
        backend = resolve_backend(self.head["backend"], logp.device, hidden.dtype)
        loss, seq, vec = Epilogue.apply(logp, ref_logp, ref_seq, targets.reshape(-1).long(),
                                        segs, self.cfg, state, backend)
        names = self.cfg.metric_names()
        metrics = {n: vec[i] for i, n in enumerate(names)
                   if not n.startswith("loss/") or n[5:] in self.cfg.loss_types}
        return MPOOutput(loss, metrics, seq[:B], seq[B:])

    def _segments(self, hidden, targets, cu_seqlens) -> Segments:
        if not isinstance(hidden, torch.Tensor) or not isinstance(targets, torch.Tensor):
            raise TypeError("hidden and targets must be tensors")
        if cu_seqlens is None:
            if hidden.dim() != 3 or targets.dim() != 2:
                raise ValueError("padded layout needs hidden [2B, T, H] and targets [2B, T] "
                                 f"(got {tuple(hidden.shape)} and {tuple(targets.shape)}); "
                                 "pass cu_seqlens for the packed layout")
            S, T = targets.shape
            _check_even(S)
            return Segments.padded(S, T, targets.device)
        if hidden.dim() != 2 or targets.dim() != 1:
            raise ValueError("packed layout (cu_seqlens given) needs hidden [N, H] and targets "
                             f"[N], got {tuple(hidden.shape)} and {tuple(targets.shape)}")
        N = targets.shape[0]
        if isinstance(cu_seqlens, Segments):  # made by the packer or checked once: no read
            cu_seqlens.check_tokens(N, targets.device, owner="targets")
            segs = cu_seqlens
        else:  # the user's own offsets: checked here, one host read
            segs = Segments.from_cu_seqlens(cu_seqlens, N, owner="targets")
            if segs.device != targets.device:
                raise ValueError(f"cu_seqlens is on {segs.device}, targets on "
                                 f"{targets.device}")
        _check_even(segs.num_seqs)
        return segs

    def _reference(self, hidden, targets, B, ref_logps, ref_hidden, ref_weight, ref_bias):
        """(ref token log-probs [N] or None, ref sequence log-probs [2B] or None)."""
        if ref_logps is not None and ref_hidden is not None:
            raise ValueError("give either ref_logps or ref_hidden, not both")
        if ref_logps is not None:
            if (not isinstance(ref_logps, (tuple, list)) or len(ref_logps) != 2
                    or any(tuple(t.shape) != (B,) for t in ref_logps)):
                raise ValueError(f"ref_logps must be (ref_chosen [B={B}], ref_rejected [B])")
            return None, torch.cat([t.detach() for t in ref_logps]).float()
        if ref_hidden is None:
            if self.cfg.needs_reference:
                raise ValueError(f"loss_types {list(self.cfg.loss_types)} need a reference: "
                                 "pass ref_logps or ref_hidden")
            return None, None
        if ref_hidden.shape != hidden.shape:
            raise ValueError(f"ref_hidden shape {tuple(ref_hidden.shape)} must equal hidden's "
                             f"{tuple(hidden.shape)}")
        if ref_weight is None:
            raise ValueError("ref_hidden needs ref_weight, the reference model's LM head "
                             "(pass weight.detach() if the head is frozen and shared)")
        with torch.no_grad():
            ref = fused_logprobs(ref_hidden, ref_weight, targets, bias=ref_bias, **self.head)
        return ref.reshape(-1), None


def _check_even(S: int) -> None:
    if S < 2 or S % 2:
        raise ValueError(f"need 2B sequences (B chosen then B rejected), got {S}")
