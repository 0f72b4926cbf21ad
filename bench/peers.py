"""Adapters that run the *peer* implementations of the MPO loss head, for the head benchmark.

Mixed Preference Optimization (MPO) on a batch of ``2B`` sequences laid out as ``B`` chosen rows
followed by ``B`` rejected rows (pair ``i`` = rows ``(i, B + i)``)::

    L = w_sigmoid * mean_i[-logsigmoid(beta * (zc_i - zr_i))]                         (DPO)
      + w_bco     * mean_i[-logsigmoid(beta * zc_i) - logsigmoid(-beta * zr_i)]        (BCO pair, delta = 0)
      + w_sft     * -(sum of chosen token log-probs) / (number of chosen target tokens) (SFT)

with ``zc = c - c0`` and ``zr = r - r0`` the summed completion log-prob ratios of policy vs reference.
The BCO reward shift ``delta`` is 0 everywhere in this file: that is TRL >= 0.29 (and TRL 1.16, which
has no running mean at all) and Liger semantics, *not* InternVL / TRL <= 0.28 (running mean of rewards).

Every peer takes a :class:`HeadInputs` (hidden states, LM-head weight, shifted targets with ``-100``
for prompt/pad tokens, and the reference model's hidden states and weight) and returns a scalar loss
whose ``backward()`` fills ``hidden.grad`` and ``weight.grad``; the reference forward runs inside,
under ``no_grad``. Peers (``PEERS``):

``naive``
    Full ``[2B, T, V]`` fp32 logits, ``log_softmax`` + ``gather`` (InternVL / older TRL), our MPO math.
``trl_chunked``
    TRL 1.16's own fused LM head (``trl.trainer.utils.add_fused_lm_head`` ->
    ``trl.kernels.chunked_logprob.ChunkedLogProbFunction``) *and* TRL's own MPO loss
    (``trl.trainer.dpo_trainer.DPOTrainer._compute_loss`` with ``loss_type=["sigmoid", "bco_pair", "sft"]``),
    run on a stand-in trainer and stand-in models, so both the kernels and the loss math are TRL's.
``liger``
    ``liger_kernel.chunked_loss.LigerFusedLinearDPOLoss`` (sigmoid DPO + NLL; Liger has one loss type
    per call, so there is no BCO term).
``cce``
    Apple Cut Cross-Entropy ``linear_cross_entropy(..., reduction="none")`` for the per-token
    log-probs (CUDA only), our MPO math on top.

:func:`float64_reference` computes the same loss and gradients in float64 (optionally with a subset
of the terms, see :attr:`Peer.terms`) and :func:`rel_err` the relative error the benchmark reports.
"""

from __future__ import annotations

import functools
import inspect
import shutil
import types
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100
MPO_TERMS: tuple[str, ...] = ("sigmoid", "bco_pair", "sft")
"""Names of the three MPO terms, in the order of :attr:`HeadInputs.loss_weights`."""


# --------------------------------------------------------------------------------------------------
# Inputs, peers, shared math
# --------------------------------------------------------------------------------------------------


@dataclass
class HeadInputs:
    """One MPO head problem: ``2B`` rows, the first ``B`` chosen, the last ``B`` rejected."""

    hidden: Tensor  # [2B, T, H] policy final hidden states (requires_grad=True), fp32 or bf16
    weight: Tensor  # [V, H] lm_head weight (requires_grad=True)
    targets: Tensor  # [2B, T] int64, already shifted, -100 = ignored
    ref_hidden: Tensor  # [2B, T, H] reference model hidden states (no grad)
    ref_weight: Tensor  # [V, H]
    beta: float = 0.1
    loss_weights: tuple = (0.8, 0.2, 1.0)  # sigmoid, bco_pair, sft


@dataclass
class Peer:
    """A peer implementation of the MPO head, as the benchmark calls it."""

    name: str
    note: str  # one line for the table
    available: Callable[[torch.device], str | None]  # None if runnable, else the reason
    loss: Callable[[HeadInputs], Tensor]  # scalar; .backward() fills hidden.grad / weight.grad
    terms: tuple[str, ...] = field(default=MPO_TERMS)
    """The MPO terms this peer computes: compare it with ``float64_reference(inp, peer.terms)``."""


def _num_pairs(inp: HeadInputs) -> int:
    rows = inp.targets.shape[0]
    if (
        rows % 2
        or inp.hidden.shape[:2] != inp.targets.shape
        or inp.ref_hidden.shape != inp.hidden.shape
    ):
        raise ValueError(
            f"expected hidden/ref_hidden [2B, T, H] and targets [2B, T]; got {tuple(inp.hidden.shape)}, "
            f"{tuple(inp.ref_hidden.shape)}, {tuple(inp.targets.shape)}"
        )
    return rows // 2


def naive_token_logps(hidden: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
    """Per-token log-probs of ``targets`` from full fp32 logits (0 where the target is ignored)."""
    mask = targets != IGNORE_INDEX
    logits = (hidden @ weight.T).float()
    logps = logits.log_softmax(-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return logps * mask


def _mpo_from_logps(
    token_logps: Tensor,
    ref_seq_logps: Tensor,
    mask: Tensor,
    beta: float,
    loss_weights: Sequence[float],
    terms: Sequence[str] = MPO_TERMS,
) -> Tensor:
    """MPO loss (BCO delta = 0) from policy per-token log-probs and reference summed log-probs.

    ``token_logps`` is ``[2B, T]`` and already 0 at ignored positions; ``ref_seq_logps`` is ``[2B]``.
    Only the terms named in ``terms`` are added (each with its weight from ``loss_weights``).
    """
    n = token_logps.shape[0] // 2
    seq = token_logps.sum(-1)
    z = seq - ref_seq_logps.to(seq.dtype)
    zc, zr = z[:n], z[n:]
    parts = {
        "sigmoid": lambda: -F.logsigmoid(beta * (zc - zr)).mean(),
        "bco_pair": lambda: (-F.logsigmoid(beta * zc) - F.logsigmoid(-beta * zr)).mean(),
        "sft": lambda: -token_logps[:n].sum() / mask[:n].sum().clamp(min=1),
    }
    loss = token_logps.new_zeros(())
    for name, w in zip(MPO_TERMS, loss_weights, strict=True):
        if name in terms and w != 0:
            loss = loss + w * parts[name]()
    return loss


def rel_err(a: Tensor, b: Tensor) -> float:
    """Relative error ``||a - b|| / ||b||`` in float64 (``a`` is moved to ``b``'s device)."""
    a64 = a.detach().to(device=b.device, dtype=torch.float64)
    b64 = b.detach().to(torch.float64)
    return ((a64 - b64).norm() / b64.norm()).item()


def float64_reference(
    inp: HeadInputs, terms: Sequence[str] = MPO_TERMS, max_logits_elems: int = 1 << 24
) -> tuple[float, Tensor, Tensor]:
    """The MPO loss (BCO delta = 0) and its gradients in float64: ``(loss, grad_hidden, grad_weight)``.

    The inputs (as given, e.g. already rounded to bf16) are upcast to float64; the log-probs come from
    full-vocabulary logits, ``log_softmax`` and ``gather``, differentiated by autograd. To bound memory
    at benchmark shapes, the valid tokens are processed in chunks of at most ``max_logits_elems``
    logits: a first pass gets the per-token log-probs, autograd gives the loss's gradient w.r.t. them,
    and a second pass back-propagates that gradient chunk by chunk (exact: the loss depends on the
    logits only through the per-token log-probs). ``terms`` selects the MPO terms, as for
    :attr:`Peer.terms`. The gradients are float64 tensors on the inputs' device.
    """
    _num_pairs(inp)
    f64 = torch.float64
    mask = inp.targets != IGNORE_INDEX
    tgt = inp.targets[mask]  # [N]
    hid = inp.hidden.detach()[mask].to(f64)  # [N, H]
    w = inp.weight.detach().to(f64)
    rhid = inp.ref_hidden.detach()[mask].to(f64)
    rw = inp.ref_weight.detach().to(f64)
    step = max(1, max_logits_elems // w.shape[0])

    def logps(h: Tensor, wt: Tensor, t: Tensor) -> Tensor:
        return (h @ wt.T).log_softmax(-1).gather(-1, t.unsqueeze(-1)).squeeze(-1)

    with torch.no_grad():
        pol = torch.cat(
            [logps(hid[i : i + step], w, tgt[i : i + step]) for i in range(0, len(tgt), step)]
        )
        ref = torch.cat(
            [logps(rhid[i : i + step], rw, tgt[i : i + step]) for i in range(0, len(tgt), step)]
        )
    tok = torch.zeros(mask.shape, dtype=f64, device=w.device)
    ref_tok = torch.zeros_like(tok)
    tok[mask] = pol
    ref_tok[mask] = ref
    tok.requires_grad_(True)
    loss = _mpo_from_logps(tok, ref_tok.sum(-1), mask, inp.beta, inp.loss_weights, terms)
    (g_tok,) = torch.autograd.grad(loss, tok)
    g_tok = g_tok[mask]

    grad_hid = torch.zeros_like(hid)
    w = w.detach().requires_grad_(True)
    for i in range(0, len(tgt), step):
        h = hid[i : i + step].detach().requires_grad_(True)
        (logps(h, w, tgt[i : i + step]) * g_tok[i : i + step]).sum().backward()
        grad_hid[i : i + step] = h.grad
    grad_hidden = torch.zeros(inp.hidden.shape, dtype=f64, device=w.device)
    grad_hidden[mask] = grad_hid
    # w.grad is None when no token is valid
    grad_weight = w.grad if w.grad is not None else torch.zeros_like(w)
    return loss.item(), grad_hidden, grad_weight


# --------------------------------------------------------------------------------------------------
# naive: full fp32 logits (InternVL / older TRL)
# --------------------------------------------------------------------------------------------------


def _naive_available(device: torch.device) -> str | None:
    return None


def _naive_loss(inp: HeadInputs) -> Tensor:
    """Full fp32 logits + log_softmax + gather for policy and reference, MPO with delta = 0."""
    _num_pairs(inp)
    mask = inp.targets != IGNORE_INDEX
    tok = naive_token_logps(inp.hidden, inp.weight, inp.targets)
    with torch.no_grad():
        ref = naive_token_logps(inp.ref_hidden, inp.ref_weight, inp.targets).sum(-1)
    return _mpo_from_logps(tok, ref, mask, inp.beta, inp.loss_weights)


# --------------------------------------------------------------------------------------------------
# trl_chunked: TRL 1.16's fused LM head + TRL's own MPO loss
# --------------------------------------------------------------------------------------------------
#
# TRL 1.16 API used (read from the installed sources):
# * ``trl.trainer.utils.add_fused_lm_head(model, temperature=1.0, cast_lm_head_to_fp32=False,
#   outputs=("log_probs",))`` patches ``model.forward`` so that ``model(..., labels=..., shift_labels=...,
#   fused_lm_head=True)`` runs ``model.base_model(...)``, takes ``last_hidden_state`` and
#   ``model.get_output_embeddings().weight`` and calls
#   ``trl.kernels.chunked_logprob.ChunkedLogProbFunction.apply(hidden[N,H], weight[V,H], bias, targets[N],
#   temperature, chunk_size=32768, softcap, logit_scale, outputs)``: cuBLAS tiles of 4096 tokens x 32768
#   vocab folded into an online logsumexp by a Triton kernel (torch ops off CUDA/XPU), recomputed in the
#   backward. On CUDA it scores only the non-ignored positions (``hidden[mask]``); on CPU all positions.
#   With ``shift_labels`` given (TRL's context-parallel path) the hidden states are used unshifted, which
#   is exactly our pre-shifted layout, so no copy of ``hidden`` is made.
# * ``trl.trainer.dpo_trainer.DPOTrainer._compute_loss(self, model, inputs, return_outputs)`` (private;
#   ``compute_loss`` only wraps it) holds the loss math: summed completion log-probs, reference forward
#   under ``no_grad`` via ``self.ref_model``, then ``sum_k loss_weights[k] * per_sequence_loss_k.mean()``
#   over ``loss_types``. For ``sft`` it is ``-chosen_per_token_logps[chosen_mask].mean()`` (token mean),
#   for ``bco_pair`` it is ``-logsigmoid(beta*zc) - logsigmoid(-beta*zr)``: **no reward shift (delta =
#   0)**; TRL 1.16 has no running mean anywhere in DPOTrainer (removed in 0.29). The DPOTrainer asks the
#   policy head for ``("log_probs", "entropy", "mean_logits", "is_top1")`` (metrics) and the reference
#   head for ``("log_probs",)``; we do the same. Its metrics code runs too (a dozen ``.item()`` syncs).
# * Importing ``trl.trainer`` needs TRL's own dependencies ``datasets`` and ``pandas``.
#
# We call ``_compute_loss`` unbound on a stand-in trainer carrying exactly the attributes it reads, with
# stand-in models whose backbone returns the given hidden states: every line of kernel and loss math
# that runs is TRL's.

_TRL_POLICY_OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1")  # as DPOTrainer.__init__


class _PassthroughBackbone(torch.nn.Module):
    """Stands in for ``model.base_model``: returns the hidden states it is given, ignoring its inputs."""

    def __init__(self, hidden: Tensor) -> None:
        super().__init__()
        self.hidden = hidden

    def forward(self, *args: object, **kwargs: object) -> types.SimpleNamespace:
        return types.SimpleNamespace(last_hidden_state=self.hidden)


class _HeadOnlyLM(torch.nn.Module):
    """A causal-LM stand-in for ``add_fused_lm_head``: fixed hidden states and an LM-head weight."""

    def __init__(self, hidden: Tensor, weight: Tensor) -> None:
        from transformers import PretrainedConfig

        super().__init__()
        self.config = PretrainedConfig()
        self.base_model = _PassthroughBackbone(hidden)
        self.is_gradient_checkpointing = False
        self._lm_head = types.SimpleNamespace(weight=weight, bias=None)

    def get_output_embeddings(self) -> types.SimpleNamespace:
        return self._lm_head

    def forward(self, *args: object, **kwargs: object) -> None:  # replaced by add_fused_lm_head
        raise RuntimeError("call with fused_lm_head=True")


@functools.cache
def _trl_api() -> tuple[Callable, Callable]:
    from trl.trainer.dpo_trainer import DPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    return DPOTrainer._compute_loss, add_fused_lm_head


def _trl_available(device: torch.device) -> str | None:
    try:
        compute_loss, _ = _trl_api()
    except Exception as e:
        return f"TRL trainer import failed ({type(e).__name__}: {e}); it needs trl with datasets and pandas"
    if list(inspect.signature(compute_loss).parameters) != [
        "self",
        "model",
        "inputs",
        "return_outputs",
    ]:
        return "trl DPOTrainer._compute_loss has an unexpected signature (adapter written for trl 1.16)"
    if device.type not in ("cuda", "cpu", "xpu"):
        return f"not checked on {device.type}"
    return None


def _trl_loss(inp: HeadInputs) -> Tensor:
    """TRL's chunked fused LM head + ``DPOTrainer._compute_loss`` with MPO loss types and weights."""
    compute_loss, add_fused_lm_head = _trl_api()
    _num_pairs(inp)
    policy = _HeadOnlyLM(inp.hidden, inp.weight)
    ref = _HeadOnlyLM(inp.ref_hidden, inp.ref_weight)
    add_fused_lm_head(policy, outputs=_TRL_POLICY_OUTPUTS)
    add_fused_lm_head(ref)

    # TRL's batch: input_ids/completion_mask are unshifted [2B, T+1]; our targets are the shifted
    # labels, passed as `shift_labels` so the fused head scores them against `hidden` directly.
    rows, t = inp.targets.shape
    valid = inp.targets != IGNORE_INDEX
    input_ids = inp.targets.new_zeros(rows, t + 1)
    input_ids[:, 1:] = inp.targets.clamp(min=0)
    completion_mask = torch.zeros_like(input_ids)
    completion_mask[:, 1:] = valid
    inputs = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "completion_mask": completion_mask,
        "shift_labels": inp.targets,
    }

    identity = lambda x: x  # single process: gathers are identities
    trainer = types.SimpleNamespace(
        model=policy,
        ref_model=ref,
        accelerator=types.SimpleNamespace(
            device=inp.hidden.device, gather=identity, gather_for_metrics=identity
        ),
        args=types.SimpleNamespace(gradient_checkpointing_kwargs=None, discopop_tau=0.05),
        beta=inp.beta,
        loss_types=list(MPO_TERMS),
        loss_weights=list(inp.loss_weights),
        label_smoothing=0.0,
        f_divergence_type="reverse_kl",
        f_alpha_divergence_coef=1.0,
        ld_alpha=None,
        use_weighting=False,
        precompute_ref_logps=False,
        aux_loss_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    return compute_loss(trainer, policy, inputs, False)


# --------------------------------------------------------------------------------------------------
# liger: LigerFusedLinearDPOLoss (sigmoid + NLL, no BCO)
# --------------------------------------------------------------------------------------------------
#
# liger-kernel 0.8.5: ``liger_kernel.chunked_loss.LigerFusedLinearDPOLoss(ignore_index=-100, beta=0.1,
# alpha=1.0, compute_nll_loss=False, compiled=True, use_ref_model=True, average_log_prob=False,
# chunk_size=1, loss_type="sigmoid", label_smoothing=0.0, discopop_tau=0.05)``; its
# ``forward(lin_weight, _input, target, bias=None, ref_input=None, ref_weight=None, ref_bias=None)``
# (weight first; input is [chosen; rejected] stacked on dim 0) returns ``(loss, aux)``. Per chunk of
# ``chunk_size`` pairs it builds full logits (input dtype matmul, then fp32 log_softmax), and gets the
# gradients in the forward with ``torch.func.grad_and_value`` wrapped in ``torch.compile``.
# loss = sum_pairs(-logsigmoid(beta*(zc - zr))) / B + alpha * NLL, NLL = -(sum of chosen target
# log-probs) / (number of chosen targets) -- the same token mean as our SFT term. One loss type per call:
# ``bco_pair`` exists but cannot be mixed with ``sigmoid`` in one call. We set ``alpha = w_sft / w_sigmoid``
# and scale the result by ``w_sigmoid``, giving ``w_sigmoid * DPO + w_sft * SFT`` (no BCO term).
# torch.compile: the first call per (H, V, dtype, beta, alpha) compiles (T is marked dynamic); Dynamo
# falls back to eager after ``torch._dynamo.config.recompile_limit`` (8) variants, so a benchmark that
# sweeps shapes should call ``torch._dynamo.reset()`` before each new shape and warm up first.


@functools.cache
def _liger_module(beta: float, alpha: float) -> torch.nn.Module:
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    return LigerFusedLinearDPOLoss(
        beta=beta, alpha=alpha, compute_nll_loss=True, use_ref_model=True
    )


def _liger_available(device: torch.device) -> str | None:
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss  # noqa: F401
    except Exception as e:
        return f"liger_kernel import failed ({type(e).__name__}: {e})"
    if device.type == "cpu" and not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")):
        return "torch.compile (inductor) on CPU needs a C++ compiler"
    return None


def _liger_loss(inp: HeadInputs) -> Tensor:
    """``w_sigmoid * (DPO + (w_sft / w_sigmoid) * NLL)`` from ``LigerFusedLinearDPOLoss``."""
    _num_pairs(inp)
    w_sig, _, w_sft = inp.loss_weights
    if w_sig == 0:
        raise ValueError("the liger peer needs a non-zero sigmoid weight")
    module = _liger_module(float(inp.beta), float(w_sft) / float(w_sig))
    loss, _aux = module(
        inp.weight, inp.hidden, inp.targets, ref_input=inp.ref_hidden, ref_weight=inp.ref_weight
    )
    return loss * w_sig


# --------------------------------------------------------------------------------------------------
# cce: Apple Cut Cross-Entropy per-token NLL + MPO math
# --------------------------------------------------------------------------------------------------
#
# cut-cross-entropy 25.1.1: ``cut_cross_entropy.linear_cross_entropy(e, c, targets, ignore_index=-100,
# softcap=None, reduction="mean", shift=False, filter_eps="high", impl="cce")``; with reduction="none"
# it returns the per-token NLL with the shape of ``targets`` (0 at ignored positions). impl="cce" is
# Triton kernels (CUDA); its default gradient filter ``filter_eps="high"`` = finfo(e.dtype).eps / 32
# skips softmax entries below that (2.4e-4 for bf16, 3.7e-9 for fp32) in the backward. ``impl=
# "torch_compile"`` is a full-logits fallback, not the CCE algorithm: the peer does not use it.


def _cce_available(device: torch.device) -> str | None:
    try:
        from cut_cross_entropy import linear_cross_entropy  # noqa: F401
    except Exception as e:
        return f"cut_cross_entropy import failed ({type(e).__name__}: {e})"
    if device.type != "cuda":
        return "CUDA only (CCE's kernels are Triton GPU kernels)"
    return None


def _cce_loss(inp: HeadInputs, impl: str = "cce") -> Tensor:
    """Per-token log-probs from ``linear_cross_entropy(..., reduction="none")``, MPO with delta = 0."""
    from cut_cross_entropy import linear_cross_entropy

    _num_pairs(inp)
    mask = inp.targets != IGNORE_INDEX
    tok = -linear_cross_entropy(
        inp.hidden, inp.weight, inp.targets, reduction="none", impl=impl
    ).float()
    with torch.no_grad():
        ref_nll = linear_cross_entropy(
            inp.ref_hidden, inp.ref_weight, inp.targets, reduction="none", impl=impl
        )
        ref = -ref_nll.float().sum(-1)
    return _mpo_from_logps(tok, ref, mask, inp.beta, inp.loss_weights)


# --------------------------------------------------------------------------------------------------

PEERS: dict[str, Peer] = {
    "naive": Peer(
        name="naive",
        note="full fp32 [2B,T,V] logits + log_softmax (InternVL/old TRL); BCO delta=0",
        available=_naive_available,
        loss=_naive_loss,
    ),
    "trl_chunked": Peer(
        name="trl_chunked",
        note="TRL 1.16 add_fused_lm_head tiles + DPOTrainer MPO loss; BCO delta=0",
        available=_trl_available,
        loss=_trl_loss,
    ),
    "liger": Peer(
        name="liger",
        note="Liger FusedLinearDPO: sigmoid+nll only, no BCO term; torch.compile",
        available=_liger_available,
        loss=_liger_loss,
        terms=("sigmoid", "sft"),
    ),
    "cce": Peer(
        name="cce",
        note="Apple CCE per-token NLL (Triton, filter_eps=high) + MPO; BCO delta=0",
        available=_cce_available,
        loss=_cce_loss,
    ),
}
"""The peers, by name; see the module docstring."""
