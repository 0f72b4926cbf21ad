"""`fused_logprobs`: per-token log p(target) from hidden states and the LM head, without logits.

This file owns the public contract (argument checks, backend choice, the autograd Function);
the math lives in the backends: `mpo_fast.torch_backend` (chunked torch, any device) and the
Triton kernels in `mpo_fast.kernels` (CUDA, or the CPU under TRITON_INTERPRET=1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import ModuleType, SimpleNamespace

import torch

from . import torch_backend
from .backend import CHOICES, requested, triton_available, triton_interpreting

BACKENDS = CHOICES["logprobs"]
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def fused_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
    backend: str = "auto",
    frozen_head: bool | str = "auto",
) -> torch.Tensor:
    """Log-probability of each target token under the LM head, computed chunk-wise.

    Args:
        hidden: ``[..., H]`` final hidden states (bf16, fp16, fp32; fp64 on the torch backend).
        weight: ``[V, H]`` LM-head weight, same dtype and device as ``hidden``.
        targets: ``[...]`` integer token ids (``hidden.shape[:-1]``), already shifted:
            ``targets[..., t]`` is the token predicted from ``hidden[..., t, :]``. Positions equal
            to ``ignore_index`` are skipped (no FLOPs) and get exactly 0.0.
        bias: optional ``[V]`` LM-head bias.
        temperature: logits are divided by it (after the softcap).
        softcap: if set, logits ``a`` become ``softcap * tanh(a / softcap)`` (Gemma-2 style).
        backend: ``"triton"`` (fused kernels; CUDA, or CPU under ``TRITON_INTERPRET=1``),
            ``"torch"`` (chunked PyTorch, any device) or ``"auto"`` (triton on CUDA, else
            torch; the ``MPO_FAST_BACKEND`` environment variable overrides the automatic pick).
        frozen_head: ``"auto"`` (default), ``True`` or ``False``. In frozen-head mode (the
            head's weight and bias need no gradient, e.g. LoRA, and hidden does) the forward
            also computes ``E = d logp / d hidden = c_y W[y] - softmax(z) c @ W`` per token
            (an online-softmax pass, attention with K = V = W) and the backward is
            ``dH = grad * E``: no second pass over the vocabulary, exact for any upstream
            gradient. Costs 4MHV FLOPs instead of 2 + 4 (forward, recompute, dH) and keeps
            E, fp32 ``[M, H]``, from forward to backward. ``"auto"`` uses it when the
            weight is frozen on the torch backend (the Triton backend keeps its two passes
            until its frozen-head path, cuBLAS products + a Triton row kernel in
            kernels/frozen_head.py, is measured faster on a GPU); ``True`` insists.

    Returns:
        fp32 tensor of ``targets.shape`` (fp64 for fp64 inputs):
        ``z[target] - logsumexp(z)`` with ``z = softcap*tanh((hidden @ weight.T + bias)/softcap)
        / temperature``. Differentiable w.r.t. hidden, weight and bias for any upstream
        gradient; under ``torch.no_grad()`` nothing is saved for backward.

    Memory: no ``[N, V]`` tensor is ever allocated. Beyond inputs, outputs and gradients the
    op keeps O(N) fp32 (row indices, log-sum-exp) plus a bounded workspace (both backends:
    ``MPO_FAST_WORKSPACE_MB``, default 256 MiB; see ``mpo_fast.torch_backend`` and
    ``mpo_fast.kernels.logprob_backward``), and in the Triton backward an fp32 [M, H]
    accumulator for d hidden.
    """
    _check_inputs(hidden, weight, targets, bias, ignore_index, temperature, softcap)
    rows = scored_rows(targets, ignore_index, weight.shape[0])
    return fused_logprobs_at(hidden, weight, targets, rows, bias, temperature, softcap, backend,
                             frozen_head)


def scored_rows(targets: torch.Tensor, ignore_index: int, V: int) -> torch.Tensor:
    """int64 ``[M]``, ascending: the flat positions of ``targets`` that are not
    ``ignore_index`` (the only ones that cost FLOPs), after checking those targets are in
    [0, V). Two host syncs (the range check, then the count M): a caller scoring the same
    targets several times (policy and reference, token counts) makes them once and passes them
    to `fused_logprobs_at`."""
    flat = targets.reshape(-1).long()
    valid = flat != ignore_index
    _check_target_range(flat, valid, V, ignore_index)
    return valid.nonzero().squeeze(1)


def fused_logprobs_at(hidden, weight, targets, rows, bias, temperature, softcap, backend,
                      frozen_head="auto"):
    """`fused_logprobs` of inputs already checked by `_check_inputs`, scoring only ``rows``
    (from `scored_rows` of these targets); every other position gets 0.0."""
    impl = _backend_module(backend, hidden)
    frozen = use_frozen_head(frozen_head, impl, hidden, weight, bias)
    H = weight.shape[1]
    hidden2d = hidden.reshape(-1, H)
    if hidden2d.numel() and hidden2d.stride(-1) != 1:
        hidden2d = hidden2d.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    flat = targets.reshape(-1).long()
    head = _Head(impl, 1.0 / temperature, softcap)
    args = (hidden2d, weight, bias, rows, flat.index_select(0, rows))
    differentiable = [t for t in (hidden, weight, bias) if t is not None and t.requires_grad]
    if torch.is_grad_enabled() and frozen:
        out = _FrozenHeadLogProbs.apply(head, *args)
    elif torch.is_grad_enabled() and differentiable:
        out = _FusedLogProbs.apply(head, *args)
    else:
        with torch.no_grad():
            out = _scatter(head.forward(*args)[0], rows, flat.numel(), hidden.dtype)
    return out.view(targets.shape)


@dataclass(frozen=True)
class _Head:
    """A backend bound to the head's elementwise transform (1/temperature, softcap)."""

    impl: ModuleType | SimpleNamespace  # forward / backward of the chosen backend
    inv_temp: float
    softcap: float | None

    def forward(self, hidden, weight, bias, rows, targets):
        lse, zy = self.impl.forward(hidden, weight, bias, rows, targets,
                                            self.inv_temp, self.softcap)
        return zy - lse, lse

    def forward_frozen(self, hidden, weight, bias, rows, targets):
        impl = self.impl if hasattr(self.impl, "forward_frozen") else torch_backend
        lse, zy, E = impl.forward_frozen(hidden, weight, bias, rows, targets, self.inv_temp,
                                         self.softcap)
        return zy - lse, E

    def backward(self, hidden, weight, bias, rows, targets, lse, grad, needs):
        return self.impl.backward(hidden, weight, bias, rows, targets, lse, grad,
                                          self.inv_temp, self.softcap, needs)


class _FusedLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, head, hidden, weight, bias, rows, targets):
        logp, lse = head.forward(hidden, weight, bias, rows, targets)
        ctx.head = head
        ctx.save_for_backward(hidden, weight, bias, rows, targets, lse)
        return _scatter(logp, rows, hidden.shape[0], hidden.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        hidden, weight, bias, rows, targets, lse = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[1:4])
        grad = grad_out.index_select(0, rows).to(lse.dtype).contiguous()
        gh, gw, gb = ctx.head.backward(hidden, weight, bias, rows, targets, lse, grad, needs)
        return None, gh, gw, gb, None, None


class _FrozenHeadLogProbs(torch.autograd.Function):
    """Frozen head: the forward keeps E = d logp / d hidden [M, H]; backward is grad * E."""

    @staticmethod
    def forward(ctx, head, hidden, weight, bias, rows, targets):
        logp, E = head.forward_frozen(hidden, weight, bias, rows, targets)
        ctx.shape, ctx.dtype = hidden.shape, hidden.dtype
        ctx.save_for_backward(rows, E)
        return _scatter(logp, rows, hidden.shape[0], hidden.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        rows, E = ctx.saved_tensors
        grad = grad_out.index_select(0, rows).to(E.dtype)
        gh = E.new_zeros(ctx.shape, dtype=ctx.dtype)
        gh.index_copy_(0, rows, (E * grad[:, None]).to(ctx.dtype))
        return None, gh, None, None, None, None


FROZEN_HEAD = ("auto", True, False)


def use_frozen_head(frozen_head, impl, hidden, weight, bias) -> bool:
    """Whether `fused_logprobs_at` takes the frozen-head path (see `fused_logprobs`)."""
    if frozen_head not in FROZEN_HEAD or not isinstance(frozen_head, (bool, str)):
        raise ValueError(f"frozen_head must be 'auto', True or False, got {frozen_head!r}")
    if frozen_head is False or not torch.is_grad_enabled():
        return False
    head_grad = weight.requires_grad or (bias is not None and bias.requires_grad)
    if frozen_head is True:
        if head_grad:
            raise ValueError("frozen_head=True needs a head that takes no gradient: weight "
                             "(and bias) with requires_grad=False (detach it, or freeze it)")
        return hidden.requires_grad
    return (hidden.requires_grad and not head_grad
            and getattr(impl, "frozen_by_default", impl is torch_backend))


def warmup(V: int, H: int, dtype: torch.dtype = torch.bfloat16,
           device: torch.device | str = "cuda", *, bias: bool = False,
           softcap: float | None = None, loss=None, frozen_head: bool = False) -> int:
    """Compile the Triton kernels for an LM head [V, H] of `dtype` ahead of the first step.

    The first `fused_logprobs` / `MPOLoss` call otherwise pays Triton's compilation (a few
    seconds per kernel). Nothing is launched or allocated. Returns how many kernel variants
    were compiled (0 where the Triton backend is not used: CPU, interpreter, no triton).

    `loss`: the `MPOLoss` (or its `LossConfig`) the steps will run; the loss epilogue's kernels
    (segment sums, broadcast, the pair terms of its loss types and SFT normalization) are
    compiled for it too. None means MPO's default configuration. No kernel specializes on the
    token or pair count, so these variants serve every batch. `frozen_head=True` (or a
    `loss` built with it) also compiles the frozen-head row kernel, a `loss` with
    ``single_pass=True`` the single-pass row kernels.
    """
    if not triton_available() or torch.device(device).type != "cuda":
        return 0
    from .epilogue import kernel_bits
    from .kernels.warmup import warmup as compile_kernels
    from .kernels.warmup import warmup_epilogue
    from .losses import LossConfig

    head = getattr(loss, "head_config", None)
    frozen = frozen_head is True or getattr(head, "frozen_head", None) is True
    compiled = compile_kernels(V, H, dtype, device, bias=bias, softcap=softcap is not None,
                               frozen=frozen, single_pass=getattr(loss, "single_pass", 0) is True)
    cfg = LossConfig() if loss is None else getattr(loss, "loss_config", loss)
    bits = kernel_bits()
    if set(cfg.loss_types) <= bits.keys():  # (the batch-sorting aot losses run in torch)
        types = sum(1 << bits[t] for t in cfg.loss_types)
        compiled += warmup_epilogue(types, cfg.sft_normalize == "sequence", device)
    return compiled


def _scatter(values: torch.Tensor, rows: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """[M] values at `rows` of an [n] vector that is exactly 0 elsewhere."""
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    out = torch.zeros(n, device=values.device, dtype=out_dtype)
    return out.index_copy_(0, rows, values.to(out_dtype))


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend name `fused_logprobs` would use for tensors on `device` of `dtype`
    (``MPO_FAST_BACKEND`` is read now, by `mpo_fast.backend.requested`)."""
    backend = requested("logprobs", backend)
    if backend == "auto":
        usable = device.type == "cuda" and dtype != torch.float64 and triton_available()
        return "triton" if usable else "torch"
    return backend


def _backend_module(backend: str, hidden: torch.Tensor) -> ModuleType | SimpleNamespace:
    name = resolve_backend(backend, hidden.device, hidden.dtype)
    if name == "torch":
        return torch_backend
    if not triton_available():
        raise RuntimeError("backend='triton' needs the `triton` package; use backend='torch'")
    # checked before importing the kernels: Triton fixes a kernel's mode (compiled or
    # interpreted) when its module is first imported
    if hidden.device.type != "cuda" and not triton_interpreting():
        raise ValueError(
            f"backend='triton' needs CUDA tensors (hidden is on {hidden.device}); set "
            "TRITON_INTERPRET=1 to run the kernels on the CPU, or use backend='torch'")
    if hidden.dtype == torch.float64:
        raise TypeError("backend='triton' takes bf16, fp16 or fp32 hidden; fp64 needs 'torch'")
    from .kernels import frozen_head, logprob_backward, logprob_forward, single_pass

    # frozen_head="auto" keeps the two-pass kernels here until the frozen-head path (cuBLAS
    # products + a Triton row kernel) is measured faster on a GPU; True uses it
    return SimpleNamespace(forward=logprob_forward.forward, backward=logprob_backward.backward,
                           forward_frozen=frozen_head.forward_frozen, frozen_by_default=False,
                           single_pass_group=single_pass.single_pass_group,
                           group_tokens=single_pass.group_tokens)


def _check_inputs(hidden, weight, targets, bias, ignore_index, temperature, softcap) -> None:
    for name, t in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if hidden.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"hidden must be bf16, fp16, fp32 or fp64, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must match hidden dtype {hidden.dtype}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"targets must be an integer tensor, got {targets.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be [V, H], got shape {tuple(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden's last dim must be H={weight.shape[1]} (weight is "
                         f"{tuple(weight.shape)}), got hidden shape {tuple(hidden.shape)}")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"targets shape {tuple(targets.shape)} must equal hidden.shape[:-1] = "
                         f"{tuple(hidden.shape[:-1])}")
    devices = {"hidden": hidden.device, "weight": weight.device, "targets": targets.device}
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must be [V={weight.shape[0]}], got {tuple(bias.shape)}")
        if bias.dtype != weight.dtype:
            raise TypeError(f"bias dtype {bias.dtype} must match weight dtype {weight.dtype}")
        devices["bias"] = bias.device
    if len(set(devices.values())) > 1:
        raise ValueError("hidden, weight, targets and bias must be on one device, got "
                         + ", ".join(f"{k} on {v}" for k, v in devices.items()))
    if not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)
            and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if softcap is not None and not (isinstance(softcap, (int, float)) and
                                    math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"softcap must be None or a finite number > 0, got {softcap!r}")


def _check_target_range(flat: torch.Tensor, valid: torch.Tensor, V: int, ignore_index: int):
    bad = valid & ((flat < 0) | (flat >= V))
    if bool(bad.any()):
        first = int(flat[bad][0])
        raise ValueError(f"targets must be in [0, V={V}) or ignore_index={ignore_index}; "
                         f"found {first}")
