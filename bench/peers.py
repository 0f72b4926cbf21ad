"""The peers of the MPO loss head, each running its own code, and a float64 reference.

MPO on 2B sequences, B chosen rows then B rejected rows (pair i = rows (i, B + i)):

    L = w_sigmoid * mean_i[-ls(beta * (zc_i - zr_i))]                    DPO
      + w_bco     * mean_i[-ls(beta * zc_i) - ls(-beta * zr_i)]           BCO pair, delta = 0
      + w_sft     * -(sum of chosen token log-probs) / (chosen tokens)    SFT (a token mean)

zc = c - c0, zr = r - r0: summed completion log-probs, policy minus reference; ls = logsigmoid.
The BCO reward shift delta is 0 everywhere here: TRL >= 0.29 (TRL 1.16 has no running mean)
and Liger semantics, not InternVL / TRL <= 0.28 (a running mean of the rewards).

Each peer takes a `HeadInputs` (hidden states, LM-head weight, shifted targets with -100 at
prompt/pad positions, the reference's hidden states and weight) and returns a scalar loss
whose backward() fills hidden.grad and weight.grad; the reference forward runs inside, under
no_grad. `PEERS`:

    naive        full [2B, T, V] fp32 logits, log_softmax + gather (InternVL / older TRL)
    trl_chunked  TRL 1.16's fused LM head and DPOTrainer's own MPO loss
    liger        LigerFusedLinearDPOLoss: sigmoid DPO + NLL (one loss type a call: no BCO)
    cce          Apple Cut Cross-Entropy per-token log-probs (CUDA), our MPO math on top

`float64_reference` gives the same loss and gradients in float64 (optionally a subset of the
terms, `Peer.terms`), `rel_err` the relative error the benchmark reports.
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
MPO_TERMS: tuple[str, ...] = ("sigmoid", "bco_pair", "sft")  # order of HeadInputs.loss_weights


@dataclass
class HeadInputs:
    """One MPO head problem: 2B rows, the first B chosen, the last B rejected."""

    hidden: Tensor  # [2B, T, H] policy final hidden states (requires_grad), fp32 or bf16
    weight: Tensor  # [V, H] LM-head weight (requires_grad)
    targets: Tensor  # [2B, T] int64, already shifted, -100 = ignored
    ref_hidden: Tensor  # [2B, T, H] reference hidden states (no grad)
    ref_weight: Tensor  # [V, H]
    beta: float = 0.1
    loss_weights: tuple = (0.8, 0.2, 1.0)  # sigmoid, bco_pair, sft


@dataclass
class Peer:
    """A peer implementation of the MPO head, as the benchmark calls it."""

    name: str
    note: str  # one line for the table
    available: Callable[[torch.device], str | None]  # None if runnable, else the reason
    loss: Callable[[HeadInputs], Tensor]  # scalar; .backward() fills hidden.grad, weight.grad
    terms: tuple[str, ...] = field(default=MPO_TERMS)  # compare with float64_reference(terms)


def _num_pairs(inp: HeadInputs) -> int:
    rows = inp.targets.shape[0]
    if (rows % 2 or inp.hidden.shape[:2] != inp.targets.shape
            or inp.ref_hidden.shape != inp.hidden.shape):
        raise ValueError(f"expected hidden/ref_hidden [2B, T, H] and targets [2B, T]; got "
                         f"{tuple(inp.hidden.shape)}, {tuple(inp.ref_hidden.shape)}, "
                         f"{tuple(inp.targets.shape)}")
    return rows // 2


def naive_token_logps(hidden: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
    """Per-token log-probs of `targets` from full fp32 logits (0 where the target is ignored)."""
    mask = targets != IGNORE_INDEX
    logits = (hidden @ weight.T).float()
    logps = logits.log_softmax(-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return logps * mask


def _mpo_from_logps(token_logps: Tensor, ref_seq_logps: Tensor, mask: Tensor, beta: float,
                    loss_weights: Sequence[float], terms: Sequence[str] = MPO_TERMS) -> Tensor:
    """MPO loss (delta = 0) from policy token log-probs [2B, T] (0 at ignored positions) and
    reference sequence log-probs [2B]; only the `terms` named are added, each with its weight."""
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
    """||a - b|| / ||b|| in float64 (`a` is moved to `b`'s device)."""
    a64 = a.detach().to(device=b.device, dtype=torch.float64)
    b64 = b.detach().to(torch.float64)
    return ((a64 - b64).norm() / b64.norm()).item()


def _f64_logps(h: Tensor, wt: Tensor, t: Tensor) -> Tensor:
    return (h @ wt.T).log_softmax(-1).gather(-1, t.unsqueeze(-1)).squeeze(-1)


def _chunked_logps(h: Tensor, w: Tensor, t: Tensor, step: int) -> Tensor:
    return torch.cat([_f64_logps(h[i:i + step], w, t[i:i + step]) for i in range(0, len(t), step)])


def float64_reference(inp: HeadInputs, terms: Sequence[str] = MPO_TERMS,
                      max_logits_elems: int = 1 << 24) -> tuple[float, Tensor, Tensor]:
    """(loss, grad_hidden, grad_weight) of the MPO loss (delta = 0) in float64.

    The inputs as given (e.g. already rounded to bf16) are upcast; log-probs come from full
    logits, log_softmax and gather. Memory stays bounded at benchmark shapes: the valid tokens
    go in chunks of at most `max_logits_elems` logits, a first pass gives the token log-probs,
    autograd the loss's gradient w.r.t. them, and a second pass back-propagates it chunk by
    chunk (exact: the loss sees the logits only through the token log-probs). Gradients are
    float64 on the inputs' device.
    """
    _num_pairs(inp)
    f64 = torch.float64
    mask = inp.targets != IGNORE_INDEX
    tgt = inp.targets[mask]  # [N]
    hid = inp.hidden.detach()[mask].to(f64)  # [N, H]
    w = inp.weight.detach().to(f64)
    step = max(1, max_logits_elems // w.shape[0])
    with torch.no_grad():
        pol = _chunked_logps(hid, w, tgt, step)
        ref = _chunked_logps(inp.ref_hidden.detach()[mask].to(f64),
                             inp.ref_weight.detach().to(f64), tgt, step)
    tok = torch.zeros(mask.shape, dtype=f64, device=w.device)
    ref_tok = torch.zeros_like(tok)
    tok[mask] = pol
    ref_tok[mask] = ref
    tok.requires_grad_(True)
    loss = _mpo_from_logps(tok, ref_tok.sum(-1), mask, inp.beta, inp.loss_weights, terms)
    (g_tok,) = torch.autograd.grad(loss, tok)
    grad_hid, w = _backprop_chunks(hid, w, tgt, g_tok[mask], step)
    grad_hidden = torch.zeros(inp.hidden.shape, dtype=f64, device=w.device)
    grad_hidden[mask] = grad_hid
    grad_weight = w.grad if w.grad is not None else torch.zeros_like(w)  # None: no valid token
    return loss.item(), grad_hidden, grad_weight


def _backprop_chunks(hid: Tensor, w: Tensor, tgt: Tensor, g_tok: Tensor, step: int):
    """(d hidden rows, w with .grad) for upstream token gradients `g_tok`, chunk by chunk."""
    grad_hid = torch.zeros_like(hid)
    w = w.detach().requires_grad_(True)
    for i in range(0, len(tgt), step):
        h = hid[i:i + step].detach().requires_grad_(True)
        (_f64_logps(h, w, tgt[i:i + step]) * g_tok[i:i + step]).sum().backward()
        grad_hid[i:i + step] = h.grad
    return grad_hid, w


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


# trl_chunked. TRL 1.16, read from the installed sources:
# - `trl.trainer.utils.add_fused_lm_head(model, temperature=1.0, cast_lm_head_to_fp32=False,
#   outputs=("log_probs",))` patches model.forward: `model(..., labels, shift_labels,
#   fused_lm_head=True)` runs model.base_model, takes last_hidden_state and
#   get_output_embeddings().weight, and calls `trl.kernels.chunked_logprob.
#   ChunkedLogProbFunction` (cuBLAS tiles of 4096 tokens x 32768 vocab folded into an online
#   logsumexp by a Triton kernel, torch ops off CUDA/XPU; recomputed in the backward). On CUDA
#   it scores only non-ignored positions, on the CPU all. With shift_labels given (its
#   context-parallel path) the hidden states are used unshifted: our pre-shifted layout, no copy.
# - `DPOTrainer._compute_loss(self, model, inputs, return_outputs)` (private; compute_loss only
#   wraps it) holds the loss math: summed completion log-probs, the reference forward under
#   no_grad via self.ref_model, then sum_k loss_weights[k] * per_sequence_loss_k.mean(). Its sft
#   is -chosen_per_token_logps[chosen_mask].mean() (a token mean); its bco_pair has no reward
#   shift (the running mean was removed in 0.29). The policy head is asked for log_probs,
#   entropy, mean_logits, is_top1 (metrics; a dozen .item() syncs), the reference for log_probs.
# - importing trl.trainer needs TRL's own dependencies datasets and pandas.
# `_compute_loss` runs unbound on a stand-in trainer with exactly the attributes it reads, and
# stand-in models whose backbone returns the given hidden states: every line of kernel and loss
# math that runs is TRL's.

_TRL_POLICY_OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1")  # as DPOTrainer.__init__


class _PassthroughBackbone(torch.nn.Module):
    """Stands in for model.base_model: returns the hidden states it holds, whatever the input."""

    def __init__(self, hidden: Tensor) -> None:
        super().__init__()
        self.hidden = hidden

    def forward(self, *args: object, **kwargs: object) -> types.SimpleNamespace:
        return types.SimpleNamespace(last_hidden_state=self.hidden)


class _HeadOnlyLM(torch.nn.Module):
    """A causal-LM stand-in for add_fused_lm_head: fixed hidden states and an LM-head weight."""

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
        return (f"TRL trainer import failed ({type(e).__name__}: {e}); it needs trl with "
                "datasets and pandas")
    if list(inspect.signature(compute_loss).parameters) != ["self", "model", "inputs",
                                                            "return_outputs"]:
        return ("trl DPOTrainer._compute_loss has an unexpected signature (adapter written for "
                "trl 1.16)")
    if device.type not in ("cuda", "cpu", "xpu"):
        return f"not checked on {device.type}"
    return None


def _trl_batch(targets: Tensor) -> dict:
    """TRL's batch for our shifted targets: input_ids and completion_mask unshifted [2B, T+1];
    the targets themselves go in as shift_labels, scored against hidden directly."""
    rows, t = targets.shape
    input_ids = targets.new_zeros(rows, t + 1)
    input_ids[:, 1:] = targets.clamp(min=0)
    completion_mask = torch.zeros_like(input_ids)
    completion_mask[:, 1:] = targets != IGNORE_INDEX
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "completion_mask": completion_mask, "shift_labels": targets}


def _trl_trainer(policy, ref, inp: HeadInputs) -> types.SimpleNamespace:
    """The attributes DPOTrainer._compute_loss reads, for one process, MPO types and weights."""
    identity = lambda x: x  # single process: gathers are identities
    accelerator = types.SimpleNamespace(device=inp.hidden.device, gather=identity,
                                        gather_for_metrics=identity)
    return types.SimpleNamespace(
        model=policy, ref_model=ref, accelerator=accelerator,
        args=types.SimpleNamespace(gradient_checkpointing_kwargs=None, discopop_tau=0.05),
        beta=inp.beta, loss_types=list(MPO_TERMS), loss_weights=list(inp.loss_weights),
        label_smoothing=0.0, f_divergence_type="reverse_kl", f_alpha_divergence_coef=1.0,
        ld_alpha=None, use_weighting=False, precompute_ref_logps=False, aux_loss_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1)


def _trl_loss(inp: HeadInputs) -> Tensor:
    """TRL's chunked fused LM head + DPOTrainer._compute_loss with MPO loss types and weights."""
    compute_loss, add_fused_lm_head = _trl_api()
    _num_pairs(inp)
    policy = _HeadOnlyLM(inp.hidden, inp.weight)
    ref = _HeadOnlyLM(inp.ref_hidden, inp.ref_weight)
    add_fused_lm_head(policy, outputs=_TRL_POLICY_OUTPUTS)
    add_fused_lm_head(ref)
    return compute_loss(_trl_trainer(policy, ref, inp), policy, _trl_batch(inp.targets), False)


# liger. liger-kernel 0.8.5: `LigerFusedLinearDPOLoss(ignore_index=-100, beta=0.1, alpha=1.0,
# compute_nll_loss=False, compiled=True, use_ref_model=True, average_log_prob=False,
# chunk_size=1, loss_type="sigmoid", label_smoothing=0.0, discopop_tau=0.05)`;
# `forward(lin_weight, _input, target, bias=None, ref_input=None, ref_weight=None,
# ref_bias=None)` (weight first; input is [chosen; rejected] on dim 0) returns (loss, aux). Per
# chunk of chunk_size pairs it builds full logits (input-dtype matmul, fp32 log_softmax) and
# gets the gradients in the forward with torch.func.grad_and_value under torch.compile.
# loss = sum_pairs(-ls(beta * (zc - zr))) / B + alpha * NLL, NLL = -(sum of chosen target
# log-probs) / (chosen targets): the same token mean as our SFT. One loss type a call
# (bco_pair exists but cannot be mixed with sigmoid), so alpha = w_sft / w_sigmoid and the
# result is scaled by w_sigmoid: w_sigmoid * DPO + w_sft * SFT, no BCO term. torch.compile
# compiles on the first call per (H, V, dtype, beta, alpha) (T is dynamic) and falls back to
# eager after torch._dynamo.config.recompile_limit (8) variants: a sweep over shapes should
# torch._dynamo.reset() before each new shape and warm up first.


@functools.cache
def _liger_module(beta: float, alpha: float) -> torch.nn.Module:
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    return LigerFusedLinearDPOLoss(beta=beta, alpha=alpha, compute_nll_loss=True,
                                   use_ref_model=True)


def _liger_available(device: torch.device) -> str | None:
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss  # noqa: F401
    except Exception as e:
        return f"liger_kernel import failed ({type(e).__name__}: {e})"
    if device.type == "cpu" and not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")):
        return "torch.compile (inductor) on CPU needs a C++ compiler"
    return None


def _liger_loss(inp: HeadInputs) -> Tensor:
    """w_sigmoid * (DPO + (w_sft / w_sigmoid) * NLL) from LigerFusedLinearDPOLoss."""
    _num_pairs(inp)
    w_sig, _, w_sft = inp.loss_weights
    if w_sig == 0:
        raise ValueError("the liger peer needs a non-zero sigmoid weight")
    module = _liger_module(float(inp.beta), float(w_sft) / float(w_sig))
    loss, _aux = module(inp.weight, inp.hidden, inp.targets, ref_input=inp.ref_hidden,
                        ref_weight=inp.ref_weight)
    return loss * w_sig


# cce. cut-cross-entropy 25.1.1: `linear_cross_entropy(e, c, targets, ignore_index=-100,
# softcap=None, reduction="mean", shift=False, filter_eps="high", impl="cce")`; with
# reduction="none" it returns the per-token NLL of targets' shape (0 at ignored positions).
# impl="cce" is Triton (CUDA); its default gradient filter filter_eps="high" =
# finfo(e.dtype).eps / 32 skips softmax entries below that (2.4e-4 for bf16, 3.7e-9 for fp32)
# in the backward. impl="torch_compile" is a full-logits fallback, not the CCE algorithm: unused.


def _cce_available(device: torch.device) -> str | None:
    try:
        from cut_cross_entropy import linear_cross_entropy  # noqa: F401
    except Exception as e:
        return f"cut_cross_entropy import failed ({type(e).__name__}: {e})"
    if device.type != "cuda":
        return "CUDA only (CCE's kernels are Triton GPU kernels)"
    return None


def _cce_loss(inp: HeadInputs, impl: str = "cce") -> Tensor:
    """Token log-probs from linear_cross_entropy(..., reduction="none"), MPO with delta = 0."""
    from cut_cross_entropy import linear_cross_entropy

    _num_pairs(inp)
    mask = inp.targets != IGNORE_INDEX
    tok = -linear_cross_entropy(inp.hidden, inp.weight, inp.targets, reduction="none",
                                impl=impl).float()
    with torch.no_grad():
        ref_nll = linear_cross_entropy(inp.ref_hidden, inp.ref_weight, inp.targets,
                                       reduction="none", impl=impl)
        ref = -ref_nll.float().sum(-1)
    return _mpo_from_logps(tok, ref, mask, inp.beta, inp.loss_weights)


PEERS: dict[str, Peer] = {
    "naive": Peer(
        name="naive",
        note="full fp32 [2B,T,V] logits + log_softmax (InternVL/old TRL); BCO delta=0",
        available=_naive_available, loss=_naive_loss),
    "trl_chunked": Peer(
        name="trl_chunked",
        note="TRL 1.16 add_fused_lm_head tiles + DPOTrainer MPO loss; BCO delta=0",
        available=_trl_available, loss=_trl_loss),
    "liger": Peer(
        name="liger",
        note="Liger FusedLinearDPO: sigmoid+nll only, no BCO term; torch.compile",
        available=_liger_available, loss=_liger_loss, terms=("sigmoid", "sft")),
    "cce": Peer(
        name="cce",
        note="Apple CCE per-token NLL (Triton, filter_eps=high) + MPO; BCO delta=0",
        available=_cce_available, loss=_cce_loss),
}
