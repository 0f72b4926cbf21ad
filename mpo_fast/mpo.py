"""`MPOLoss`: the combined preference loss (MPO by default) straight from hidden states.

    hidden --fused_logprobs--> token log-probs --Epilogue--> loss, metrics, sequence log-probs

Neither the policy nor the reference ever materializes logits; the reference pass runs without
grad and saves nothing. The scored positions (targets != ignore_index) are found once per call
and shared by the policy pass, the reference pass and the completion token counts. The BCO
reward shift's running mean is a buffer of this module, so it is in `state_dict()` and survives
checkpoints.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .epilogue import Epilogue
from .layout import Segments
from .logprobs import _check_inputs, fused_logprobs_at, resolve_backend, scored_rows
from .losses import MPO_LOSS_TYPES, LossConfig, check_sft_tokens, new_bco_state
from .single_pass import SinglePassJob, check_options, single_pass_loss
from .single_pass import applies as single_pass_applies
from .torch_backend import accum_dtype

__all__ = ["LOSS_STATE_FILE", "HeadConfig", "MPOLoss", "MPOOutput", "load_loss_state",
           "save_loss_state"]

LOSS_STATE_FILE = "loss.safetensors"  # MPOLoss's state beside any checkpoint
_LEGACY_LOSS_STATE_FILE = "mpo_loss.pt"  # what the drop-ins wrote before (a torch.save)


@dataclass
class MPOOutput:
    loss: torch.Tensor  # scalar, differentiable
    metrics: dict[str, torch.Tensor]  # TRL names, detached 0-dim tensors (no host sync)
    chosen_logps: torch.Tensor  # [B] fp32 summed completion log-probs, differentiable
    rejected_logps: torch.Tensor  # [B]


@dataclass(frozen=True)
class HeadConfig:
    """How the LM head turns hidden states into token log-probs: `fused_logprobs`' options
    (checked by it at every call, with its messages)."""

    ignore_index: int = -100
    temperature: float = 1.0
    softcap: float | None = None
    backend: str = "auto"
    frozen_head: bool | str = "auto"


class MPOLoss(nn.Module):
    """Weighted sum of preference losses on (chosen, rejected) pairs, from hidden states.

    Args:
        beta: KL coefficient of the preference terms.
        loss_types: any of `mpo_fast.losses.LOSS_TYPES`; default MPO = sigmoid + bco_pair + sft.
        loss_weights: one per type; None means (0.8, 0.2, 1.0) for the MPO default, else 1.0.
        label_smoothing: e of cDPO / robust / exo_pair / aot.
        bco_delta: "running_mean" (the paper's reward shift; TRL <= 0.28 / InternVL) or "none".
            `mpo_fast.preference_loss` has the same parameter and default.
        ignore_index: target value of prompt, image and padding positions.
        temperature, softcap, backend: passed to `fused_logprobs`.
        discopop_tau: temperature of the discopop modulation.
        sft_normalize: how "sft" averages the chosen answers' NLL: "token" (default; TRL's
            token mean over the batch) or "sequence" (the paper's Eq. 5: each answer's NLL over
            its own completion length, then the mean over pairs). Under gradient accumulation
            scale each micro-batch's loss by its pairs / the step's pairs (as for every
            per-pair term): with "sequence" the sum is then exactly the step's loss; with
            "token" pass the forward's ``sft_tokens`` (the denominator from outside, Liger's
            ``full_target`` idea), as `mpo_fast.train.loop.objective` does.
        single_pass: False (default: forward, then a backward that recomputes the logits),
            True or "auto" (True on the torch backend when the losses allow it): compute the
            loss's gradient in the forward, one pass over the vocabulary per group of whole
            pairs (8NHV instead of 10NHV with a reference). Needs pair-local losses (not
            "aot"/"aot_pair"; "bco_pair" with bco_delta "none" or "lagged"); gradients then
            flow through ``out.loss`` only (see `mpo_fast.single_pass`).
        frozen_head: "auto" (default), True or False: with a head that takes no gradient
            (LoRA) the forward prepares d logp / d hidden and the backward never revisits the
            vocabulary (see `mpo_fast.fused_logprobs`); exact with every loss.
        dw_accum: single-pass mode's dW sum across groups of pairs (half-precision weights):
            "split" (default: the gradient plus a remainder in its dtype, about one rounding
            like the two-pass path, V x H x 2 bytes more), "fp32" (V x H x 4 bytes more) or
            "weight" (no extra memory, one rounding per group; `mpo_fast.single_pass`).

    The options live in two frozen config objects, one per op: ``self.loss_config`` (a
    `mpo_fast.losses.LossConfig`, checked here) and ``self.head_config`` (a `HeadConfig`).
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
        sft_normalize: str = "token",
        single_pass: bool | str = False,
        frozen_head: bool | str = "auto",
        dw_accum: str = "split",
    ):
        super().__init__()
        self.loss_config = LossConfig(loss_types, loss_weights, beta, label_smoothing, bco_delta,
                                      discopop_tau, sft_normalize)
        self.head_config = HeadConfig(ignore_index, temperature, softcap, backend, frozen_head)
        check_options(single_pass, dw_accum, self.loss_config)
        self.single_pass, self.dw_accum = single_pass, dw_accum
        # BCO running mean and count (count starts at ~0, so the first batch sets the mean);
        # updated by calls in training mode only
        self.register_buffer("bco_state", new_bco_state())

    def extra_repr(self) -> str:
        return f"{self.loss_config}, {self.head_config}"

    def forward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        *,
        cu_seqlens: Segments | torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        ref_logps: tuple[torch.Tensor, torch.Tensor] | None = None,
        ref_hidden: torch.Tensor | None = None,
        ref_weight: torch.Tensor | None = None,
        ref_bias: torch.Tensor | None = None,
        sft_tokens: float | None = None,
    ) -> MPOOutput:
        """Loss of a batch of 2B sequences: rows 0..B-1 chosen, B..2B-1 rejected (pair i is
        (i, B+i)).

        Layouts:
            padded  hidden [2B, T, H], targets [2B, T], no cu_seqlens.
            packed  hidden [N, H] (or a model's [1, N, H]), targets [N] (or [1, N]), and
                    cu_seqlens: the `Segments` of `mpo_fast.packing.pack` (``p.segments``, used
                    with no host read) or int32 offsets [2B+1] (checked: one host read).
        Targets are shifted; prompt/image/pad positions are ignore_index. At least one target
        in the batch must be a completion token; a sequence with none has log-prob 0 (see
        `mpo_fast.losses`).

        Reference: `ref_logps=(ref_chosen [B], ref_rejected [B])`, or reference hidden states
        (same layout as hidden) with the reference head `ref_weight` (and `ref_bias`). ORPO
        and SFT need no reference.

        ``sft_tokens``: the token-mean SFT term's denominator (a number > 0) instead of this
        batch's chosen completion tokens; for a micro-batch that is a fraction f of the step's
        pairs, ``f * loss`` with ``sft_tokens = f * (the step's chosen tokens)`` sums over the
        micro-batches to the step's token mean exactly. Only with ``sft_normalize="token"``.
        """
        sft_tokens = check_sft_tokens(self.loss_config, sft_tokens)
        hidden, targets, ref_hidden = _packed_row(hidden, targets, ref_hidden, cu_seqlens)
        segs = self._segments(hidden, targets, cu_seqlens)
        B = segs.num_seqs // 2
        head = self.head_config
        _check_inputs(hidden, weight, targets, bias, head.ignore_index, head.temperature,
                      head.softcap)
        rows = scored_rows(targets, head.ignore_index, weight.shape[0])  # the one mask
        if rows.numel() == 0:
            raise ValueError(f"no completion tokens: every target is ignore_index="
                             f"{head.ignore_index}, so there is nothing to score (are the "
                             "targets shifted and the completions unmasked?)")
        if single_pass_applies(self.single_pass, self.loss_config,
                               resolve_backend(head.backend, hidden.device, hidden.dtype),
                               hidden, weight, bias):
            return self._single_pass(hidden, weight, targets, rows, bias, segs, sft_tokens,
                                     ref_logps, ref_hidden, ref_weight, ref_bias)
        logp = self._logprobs(hidden, weight, targets, rows, bias).reshape(-1)
        ref_logp, ref_seq = self._reference(hidden, weight, targets, rows, B, ref_logps,
                                            ref_hidden, ref_weight, ref_bias)
        if self.bco_state.device != logp.device:
            self.bco_state = self.bco_state.to(logp.device)
        backend = resolve_backend(head.backend, logp.device, hidden.dtype)
        count = segs.count(rows).to(logp.dtype)
        # eval() scores with this batch folded into the running mean but keeps the state as
        # it was: evaluating never moves the reward shift training will use
        state = self.bco_state if self.training else self.bco_state.clone()
        loss, seq, vec = Epilogue.apply(logp, ref_logp, ref_seq, count, segs, self.loss_config,
                                        state, backend, sft_tokens)
        metrics = dict(zip(self.loss_config.metric_names, vec, strict=True))
        return MPOOutput(loss, metrics, seq[:B], seq[B:])

    def _logprobs(self, hidden, weight, targets, rows, bias):
        h = self.head_config
        return fused_logprobs_at(hidden, weight, targets, rows, bias, h.temperature, h.softcap,
                                 h.backend, h.frozen_head)

    def _single_pass(self, hidden, weight, targets, rows, bias, segs, sft_tokens, ref_logps,
                     ref_hidden, ref_weight, ref_bias) -> MPOOutput:
        """`forward` in single-pass mode (`mpo_fast.single_pass`): same outputs; the
        sequence log-probs are values (a backward through them raises)."""
        B, head = segs.num_seqs // 2, self.head_config
        ref_logp, ref_seq = self._reference(hidden, weight, targets, rows, B, ref_logps,
                                            ref_hidden, ref_weight, ref_bias)
        if ref_logp is not None:
            ref_seq = segs.sum(ref_logp)
        if self.bco_state.device != hidden.device:
            self.bco_state = self.bco_state.to(hidden.device)
        H = weight.shape[1]
        job = SinglePassJob(
            rows=rows, targets=targets.reshape(-1).long().index_select(0, rows), segs=segs,
            ref=ref_seq, count=segs.count(rows).to(accum_dtype(hidden.dtype)), cfg=self.loss_config,
            bco_state=self.bco_state if self.training else self.bco_state.clone(),
            backend=resolve_backend(head.backend, hidden.device, hidden.dtype),
            inv_temp=1.0 / head.temperature, softcap=head.softcap, sft_tokens=sft_tokens,
            dw_accum=self.dw_accum)
        hidden2d = hidden.reshape(-1, H)
        loss, seq, vec = single_pass_loss(job, hidden2d, weight, bias)
        metrics = dict(zip(self.loss_config.metric_names, vec, strict=True))
        return MPOOutput(loss, metrics, seq[:B], seq[B:])

    def _segments(self, hidden, targets, cu_seqlens) -> Segments:
        if cu_seqlens is None:
            if hidden.dim() != 3 or targets.dim() != 2:
                raise ValueError("padded layout needs hidden [2B, T, H] and targets [2B, T] "
                                 f"(got {tuple(hidden.shape)} and {tuple(targets.shape)}); "
                                 "pass cu_seqlens for the packed layout")
            S, T = targets.shape
            _check_even(S)
            return Segments.padded(S, T, targets.device)
        if hidden.dim() != 2 or targets.dim() != 1:
            raise ValueError("packed layout (cu_seqlens given) needs hidden [N, H] (or "
                             f"[1, N, H]) and targets [N], got {tuple(hidden.shape)} and "
                             f"{tuple(targets.shape)}")
        N = targets.shape[0]
        if isinstance(cu_seqlens, Segments):  # valid by construction: no host read
            cu_seqlens.check_tokens(N, targets.device, owner="targets")
            segs = cu_seqlens
        elif isinstance(cu_seqlens, torch.Tensor):  # the caller's own offsets: one host read
            segs = Segments.from_cu_seqlens(cu_seqlens, N, owner="targets")
            segs.check_tokens(N, targets.device, owner="targets")
        else:
            raise TypeError(f"cu_seqlens must be a Segments (packing.pack(...).segments) or an "
                            f"int32 tensor [2B+1], got {type(cu_seqlens).__name__}")
        _check_even(segs.num_seqs)
        return segs

    def _reference(self, hidden, weight, targets, rows, B, ref_logps, ref_hidden, ref_weight,
                   ref_bias):
        """(ref token log-probs [N] or None, ref sequence log-probs [2B] or None)."""
        if ref_logps is not None and ref_hidden is not None:
            raise ValueError("give either ref_logps or ref_hidden, not both")
        if ref_logps is not None:
            if (not isinstance(ref_logps, (tuple, list)) or len(ref_logps) != 2
                    or any(tuple(t.shape) != (B,) for t in ref_logps)):
                raise ValueError(f"ref_logps must be (ref_chosen [B={B}], ref_rejected [B])")
            return None, torch.cat([t.detach() for t in ref_logps]).float()
        if ref_hidden is None:
            if self.loss_config.needs_reference:
                raise ValueError(f"loss_types {list(self.loss_config.loss_types)} need a "
                                 "reference: pass ref_logps or ref_hidden")
            return None, None
        if ref_hidden.shape != hidden.shape:
            raise ValueError(f"ref_hidden shape {tuple(ref_hidden.shape)} must equal hidden's "
                             f"{tuple(hidden.shape)}")
        if ref_weight is None:
            raise ValueError("ref_hidden needs ref_weight, the reference model's LM head "
                             "(pass weight.detach() if the head is frozen and shared)")
        h = self.head_config
        _check_inputs(ref_hidden, ref_weight, targets, ref_bias, h.ignore_index, h.temperature,
                      h.softcap)
        if ref_weight.shape[0] != weight.shape[0]:
            raise ValueError(f"ref_weight has V={ref_weight.shape[0]} rows but weight has "
                             f"V={weight.shape[0]}: policy and reference share a vocabulary")
        with torch.no_grad():
            ref = self._logprobs(ref_hidden, ref_weight, targets, rows, ref_bias)
        return ref.reshape(-1), None


def _packed_row(hidden, targets, ref_hidden, cu_seqlens):
    """A model's packed row [1, N, H] (and targets [1, N]) as [N, H] and [N]."""
    if not isinstance(hidden, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise TypeError("hidden and targets must be tensors")
    if cu_seqlens is None or hidden.dim() != 3 or hidden.shape[0] != 1:
        return hidden, targets, ref_hidden
    if targets.dim() == 2 and targets.shape[0] == 1:
        targets = targets[0]
    if ref_hidden is not None and ref_hidden.dim() == 3 and ref_hidden.shape[0] == 1:
        ref_hidden = ref_hidden[0]
    return hidden[0], targets, ref_hidden


def _check_even(S: int) -> None:
    if S < 2 or S % 2:
        raise ValueError(f"need 2B sequences (B chosen then B rejected), got {S}")


# --------------------------------------------------------------------------- loss state


def save_loss_state(loss_fn: MPOLoss, folder: str) -> str:
    """Write ``loss_fn.state_dict()`` (the BCO running mean and count, float64 [2]) into
    ``folder`` as safetensors (`LOSS_STATE_FILE`): tensors only, nothing that runs code when
    read. Every kind of checkpoint keeps the loss's state this way. Returns the file's path."""
    import os

    from safetensors.torch import save_file

    path = os.path.join(folder, LOSS_STATE_FILE)
    state = {k: v.detach().cpu().contiguous() for k, v in loss_fn.state_dict().items()}
    save_file(state, path)
    return path


def load_loss_state(loss_fn: MPOLoss, folder: str) -> bool:
    """Restore ``loss_fn``'s state from ``folder``: `LOSS_STATE_FILE`, or an older
    ``mpo_loss.pt`` (read with ``torch.load(weights_only=True)``). Keys may carry the prefix of
    the module that held the loss (the trainer's ``loss_fn.``). False when neither file is
    there."""
    import os

    path = os.path.join(folder, LOSS_STATE_FILE)
    legacy = os.path.join(folder, _LEGACY_LOSS_STATE_FILE)
    if os.path.exists(path):
        from safetensors.torch import load_file

        state = load_file(path)
    elif os.path.exists(legacy):
        state = torch.load(legacy, map_location="cpu", weights_only=True)
    else:
        return False
    own = loss_fn.state_dict().keys()
    state = {next((k for k in own if key == k or key.endswith("." + k)), key): value
             for key, value in state.items()}
    loss_fn.load_state_dict(state)
    return True
