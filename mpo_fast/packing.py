"""Padding-free packing of preference batches (docs/DESIGN.md §4).

A micro-batch of S sequences padded to length T (for MPO, S = 2B: the B chosen sequences, then
the B rejected ones, pair i = (i, B + i)) becomes one flat row of N = sum(lengths) tokens:

    p = pack(input_ids, lengths)     # input_ids [S, T, *], lengths [S]
    p.tokens        [N, *]           the real tokens, sequence after sequence, in order
    p.cu_seqlens    int32 [S + 1]    cu_seqlens[s] = first packed row of sequence s, [S] = N
    p.position_ids  int64 [N]        0, 1, ..., len(s) - 1 for every sequence s
    p.max_seqlen    int              longest sequence (for the varlen attention kernels)
    p.segments      Segments         the three above as one `mpo_fast.layout.Segments`: pass it
                                     to MPOLoss(cu_seqlens=...) and attention, no host read
    unpack(values, p.cu_seqlens, T) [N, *] -> [S, T, *], zeros in the padding

`pack` and `unpack` move data only: every backend gives bit-identical results, and each is the
other's backward (both are differentiable, to any order). `shift_targets` builds the next-token
targets of a packed row, and `plan` groups whole pairs into micro-batches under a token budget.

Backends. The ops live in the compiled extension `mpo_fast._C` (torch custom ops
`torch.ops.mpo_fast.*`, CPU kernels and, when built with nvcc, CUDA kernels; Meta kernels make
them traceable by torch.compile). Without the extension, or for a device it has no kernel for,
the same functions run a pure-torch fallback (index_select / index_copy_). `backend()` says
where it runs for CUDA tensors if a GPU is present, else CPU tensors ("cuda" | "cpu" |
"torch"); `active_backend(device)` answers in the words every function's ``backend=`` takes,
``"extension" | "torch"``; with "auto", the environment variable
MPO_FAST_PACKING=torch|extension (read at every call, see `mpo_fast.backend`) decides.

Host syncs. `pack` reads ``lengths`` on the host once, to size the output and check the values
(lengths on the CPU cost no device sync at all). Passing ``total=`` (and ``max_seqlen=``) skips
it: then nothing syncs, and on CUDA the values are not checked — the kernels clamp every
sequence to [0, T] tokens and never write past ``total`` rows, so bad lengths give wrong
values, never an illegal memory access. `unpack`, `pack_values` and `shift_targets` never sync;
they check ``cu_seqlens`` values only when it lives on the CPU.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

from .backend import CHOICES, requested
from .layout import Segments, check_cu_seqlens

try:  # the compiled extension; its import registers torch.ops.mpo_fast.*
    from . import _C
except ImportError:  # not built: the pure-torch fallback serves every call
    _C = None

__all__ = [
    "Packed",
    "active_backend",
    "backend",
    "pack",
    "pack_values",
    "plan",
    "shift_targets",
    "unpack",
]

BACKENDS = CHOICES["packing"]
_EXT_CPU = _C is not None
_EXT_CUDA = _C is not None and bool(_C.has_cuda())
_INT32_MAX = 2**31 - 1


def backend() -> str:
    """Where packing runs: ``"cuda"`` (compiled CUDA kernels, used when a GPU is present),
    ``"cpu"`` (compiled CPU kernels) or ``"torch"`` (the pure-torch fallback)."""
    device = "cuda" if _EXT_CUDA and torch.cuda.is_available() else "cpu"
    return "torch" if active_backend(device) == "torch" else device


def active_backend(device: torch.device | str | None = None) -> str:
    """What ``backend="auto"`` runs for tensors on ``device`` (default: CUDA when a GPU is
    present, else the CPU), in the words ``backend=`` takes: ``"extension"`` or ``"torch"``."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return "extension" if _use_extension(torch.device(device), "auto") else "torch"


# --------------------------------------------------------------------------- public API


@dataclass(frozen=True)
class Packed:
    """A packed micro-batch (see the module docstring for shapes): the packed ``tokens``, their
    ``position_ids``, and their layout as a `mpo_fast.layout.Segments` (``cu_seqlens``,
    ``num_tokens``, ``max_seqlen``), which `MPOLoss` and `mpo_fast.attention` take as is, with
    no host read."""

    tokens: torch.Tensor
    position_ids: torch.Tensor
    segments: Segments
    padded_len: int  # T, the padded length the batch came from

    @property
    def cu_seqlens(self) -> torch.Tensor:
        """int32 ``[S + 1]``: sequence s is packed rows ``cu_seqlens[s] : cu_seqlens[s + 1]``."""
        return self.segments.cu_seqlens

    @property
    def max_seqlen(self) -> int:
        """The longest sequence (or the upper bound given to `pack`)."""
        return self.segments.max_seqlen

    @property
    def num_tokens(self) -> int:
        """N, the number of packed tokens."""
        return self.segments.num_tokens

    @property
    def num_seqs(self) -> int:
        """S, the number of sequences."""
        return self.segments.num_seqs

    def pack_like(self, values: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
        """Pack another ``[S, T, *]`` tensor (labels, masks, embeddings) with this layout,
        without reading the lengths again: ``[S, T, *] -> [N, *]``."""
        return pack_values(values, self.cu_seqlens, self.num_tokens, backend=backend)

    def unpack(self, values: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
        """``[N, *] -> [S, T, *]`` with zeros in the padding (see `unpack`)."""
        return unpack(values, self.cu_seqlens, self.padded_len, backend=backend)

    def shift_targets(self, completion_mask: torch.Tensor, ignore_index: int = -100, *,
                      backend: str = "auto") -> torch.Tensor:
        """`shift_targets` of ``self.tokens``; ``completion_mask`` is packed ``[N]`` or padded
        ``[S, T]`` (then packed with this layout first)."""
        if isinstance(completion_mask, torch.Tensor) and completion_mask.dim() == 2:
            completion_mask = self.pack_like(completion_mask, backend=backend)
        return shift_targets(self.tokens, self.cu_seqlens, completion_mask, ignore_index,
                             backend=backend)


def pack(
    input_ids: torch.Tensor,
    lengths: torch.Tensor,
    *,
    total: int | None = None,
    max_seqlen: int | None = None,
    backend: str = "auto",
) -> Packed:
    """Pack a right-padded batch into one flat row.

    Args:
        input_ids: ``[S, T, *]`` padded batch, any dtype (token ids, embeddings, masks);
            sequence s is ``input_ids[s, :lengths[s]]``.
        lengths: ``[S]`` integer tensor on the same device (or a list of ints), each in [0, T].
        total: ``sum(lengths)`` if the caller knows it: skips the one host read of ``lengths``
            (no sync at all; on CUDA the values are then not checked).
        max_seqlen: ``max(lengths)`` or an upper bound; defaults to the exact maximum, or to T
            when ``total`` is given for CUDA lengths.
        backend: ``"auto"``, ``"extension"`` or ``"torch"``.

    Returns:
        `Packed`: tokens ``[N, *]`` (differentiable w.r.t. ``input_ids``; the backward is
        `unpack`), position_ids int64 ``[N]`` restarting at 0 for every sequence, segments
        (cu_seqlens int32 ``[S + 1]``, num_tokens, max_seqlen; also reachable as
        ``p.cu_seqlens``, ``p.max_seqlen``, ``p.num_tokens``), padded_len = T.
    """
    _require_tensor("input_ids", input_ids)
    if input_ids.dim() < 2:
        raise ValueError(f"input_ids must be [S, T, ...] (at least 2-D), got shape "
                         f"{tuple(input_ids.shape)}")
    S, T = input_ids.shape[0], input_ids.shape[1]
    lengths = _as_lengths(lengths, S, input_ids.device)
    total, max_seqlen = _output_size(lengths, T, total, max_seqlen)
    use_ext = _use_extension(input_ids.device, backend)
    if use_ext:
        cu, positions = torch.ops.mpo_fast.seq_index(lengths, T, total)
    else:
        cu, positions = _seq_index_torch(lengths, T, total)
    tokens = _pack(input_ids, cu, total, use_ext)
    # trusted: cu comes from lengths checked by _output_size (or clamped to [0, T] by the
    # kernels when the caller vouched for `total`)
    return Packed(tokens, positions, Segments(cu, total, max_seqlen), T)


def pack_values(
    values: torch.Tensor,
    cu_seqlens: torch.Tensor,
    total: int,
    *,
    out: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Pack ``values [S, T, *]`` with a known layout: ``[S, T, *] -> [total, *]``.

    ``cu_seqlens`` is int32 ``[S + 1]`` (from `pack`), ``total = cu_seqlens[-1]`` as an int.
    Differentiable (backward: `unpack`), unless ``out`` is given: then the result is written
    into ``out`` (``[total, *]``, same dtype and device, contiguous) and returned.
    """
    _require_tensor("values", values)
    if values.dim() < 2:
        raise ValueError(f"values must be [S, T, ...] (at least 2-D), got shape "
                         f"{tuple(values.shape)}")
    total = _check_count("total", total)
    S, T = values.shape[0], values.shape[1]
    check_cu_seqlens(cu_seqlens, values.device, num_seqs=S, max_len=T, num_tokens=total,
                     owner="values")
    use_ext = _use_extension(values.device, backend)
    if out is not None:
        _check_out(out, (total, *values.shape[2:]), values)
        if use_ext:
            torch.ops.mpo_fast.pack_into(values, cu_seqlens, out)
        else:
            _pack_torch(values, cu_seqlens, total, out=out)
        return out
    return _pack(values, cu_seqlens, total, use_ext)


def unpack(
    values: torch.Tensor,
    cu_seqlens: torch.Tensor,
    T: int,
    *,
    out: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Scatter per-token results back to the padded layout: ``[N, *] -> [S, T, *]``.

    ``out[s, t] = values[cu_seqlens[s] + t]`` for ``t < len(s)``, exactly zero for
    ``len(s) <= t < T``. ``cu_seqlens`` is int32 ``[S + 1]`` with ``cu_seqlens[-1] = N``.
    Differentiable (backward: `pack_values`), unless ``out`` (``[S, T, *]``) is given.
    """
    _require_tensor("values", values)
    if values.dim() < 1:
        raise ValueError("values must be [N, ...], got a 0-d tensor")
    T = _check_count("T", T)
    check_cu_seqlens(cu_seqlens, values.device, max_len=T, num_tokens=values.shape[0],
                     owner="values")
    S = cu_seqlens.shape[0] - 1
    use_ext = _use_extension(values.device, backend)
    if out is not None:
        _check_out(out, (S, T, *values.shape[1:]), values)
        if use_ext:
            torch.ops.mpo_fast.unpack_into(values, cu_seqlens, out)
        else:
            _unpack_torch(values, cu_seqlens, T, out=out)
        return out
    if use_ext:
        return torch.ops.mpo_fast.unpack(values, cu_seqlens, T)
    return _TorchUnpack.apply(values, cu_seqlens, T)


def shift_targets(
    tokens: torch.Tensor,
    cu_seqlens: torch.Tensor,
    completion_mask: torch.Tensor,
    ignore_index: int = -100,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Next-token targets of a packed row, never across a sequence boundary.

    Args:
        tokens: ``[N]`` packed token ids (int32 or int64).
        cu_seqlens: int32 ``[S + 1]`` from `pack`.
        completion_mask: ``[N]`` bool (or 0/1 integers), aligned with ``tokens``: True where the
            token is a completion token (one the loss should score), False on prompt, image and
            template tokens.
        ignore_index: the value of positions that predict nothing.

    Returns:
        int64 ``[N]``: ``target[n] = tokens[n + 1]`` if token n + 1 belongs to the same sequence
        as token n AND ``completion_mask[n + 1]`` is True, else ``ignore_index``. The mask of
        the *predicted* token (n + 1) decides, not the mask of the position n that predicts it:
        the last prompt token predicts the first completion token, and the last token of every
        sequence gets ``ignore_index``. This is the layout `mpo_fast.fused_logprobs` expects
        (the hidden state at n scores ``target[n]``).
    """
    _require_tensor("tokens", tokens)
    _require_tensor("completion_mask", completion_mask)
    if tokens.dim() != 1:
        raise ValueError(f"tokens must be 1-D [N], got shape {tuple(tokens.shape)}")
    if tokens.dtype not in (torch.int32, torch.int64):
        if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            raise TypeError(f"tokens must be an integer tensor, got {tokens.dtype}")
        tokens = tokens.long()
    if completion_mask.shape != tokens.shape:
        raise ValueError(f"completion_mask must have the shape of tokens {tuple(tokens.shape)}, "
                         f"got {tuple(completion_mask.shape)}")
    if completion_mask.device != tokens.device:
        raise ValueError(f"completion_mask is on {completion_mask.device} but tokens is on "
                         f"{tokens.device}")
    if completion_mask.dtype != torch.bool:
        if completion_mask.dtype.is_floating_point or completion_mask.dtype.is_complex:
            raise TypeError(f"completion_mask must be bool (or integer 0/1), got "
                            f"{completion_mask.dtype}")
        completion_mask = completion_mask != 0
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    check_cu_seqlens(cu_seqlens, tokens.device, num_tokens=tokens.shape[0], owner="tokens")
    if _use_extension(tokens.device, backend):
        return torch.ops.mpo_fast.shift_targets(tokens, cu_seqlens, completion_mask, ignore_index)
    return _shift_targets_torch(tokens, cu_seqlens, completion_mask, ignore_index)


def plan(pair_tokens, max_tokens: int, *, backend: str = "auto") -> list[list[int]]:
    """Group whole preference pairs into micro-batches of at most ``max_tokens`` tokens.

    Best-fit decreasing: pairs are taken largest first (ties: lower index first); each goes to
    the open micro-batch with the least room left that still fits it (ties: the one opened
    first), or opens a new one. Both members of a pair always land in the same micro-batch;
    lay each micro-batch out as its chosen sequences, then its rejected ones, in the listed
    pair order (the chosen-first convention of `mpo_fast.MPOLoss`).

    Args:
        pair_tokens: ``[P]`` tokens of each pair as packed (chosen + rejected lengths), a 1-D
            integer tensor, array or list.
        max_tokens: the token budget of one micro-batch.
        backend: ``"extension"`` (C++), ``"torch"`` (the Python reference, identical output)
            or ``"auto"``.

    Returns:
        a list of micro-batches in the order they were opened, each a list of pair indices in
        ascending order.

    Raises:
        ValueError: a pair larger than ``max_tokens`` (named with its index), a negative
            count, or ``max_tokens <= 0``.
    """
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
        raise TypeError(f"max_tokens must be an int, got {type(max_tokens).__name__}")
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    sizes = _as_pair_tokens(pair_tokens)
    choice = requested("packing", backend)
    if choice == "extension" and _C is None:
        raise RuntimeError("backend='extension' but mpo_fast._C is not built")
    if choice != "torch" and _C is not None:
        return _C.plan(sizes, max_tokens)  # checks the sizes itself, same messages
    return _plan_python(sizes.tolist(), max_tokens)


# --------------------------------------------------------------------------- argument checks


def _require_tensor(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")


def _is_int_dtype(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def _check_count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if isinstance(value, int) and not 0 <= value <= _INT32_MAX:
        raise ValueError(f"{name} must be in [0, 2**31), got {value}")
    return value


def _as_lengths(lengths, S: int, device: torch.device) -> torch.Tensor:
    if not isinstance(lengths, torch.Tensor):
        try:
            lengths = torch.as_tensor(lengths, device=device)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(f"lengths must be an integer tensor or a list of ints ({exc})") \
                from exc
        if lengths.numel() == 0:
            lengths = lengths.long()  # an empty list: no dtype to check
    if not _is_int_dtype(lengths.dtype):
        raise TypeError(f"lengths must be an integer tensor, got {lengths.dtype}")
    if lengths.dim() != 1 or lengths.shape[0] != S:
        raise ValueError(f"lengths must be 1-D with one entry per sequence (S={S}), got shape "
                         f"{tuple(lengths.shape)}")
    if lengths.device != device:
        raise ValueError(f"lengths is on {lengths.device} but input_ids is on {device}")
    if lengths.dtype not in (torch.int32, torch.int64):
        lengths = lengths.long()
    return lengths


def _output_size(lengths: torch.Tensor, T: int, total, max_seqlen) -> tuple[int, int]:
    """(N, max_seqlen): one host read of ``lengths`` unless ``total`` is given for CUDA."""
    if total is not None:
        total = _check_count("total", total)
    if max_seqlen is not None:
        max_seqlen = _check_count("max_seqlen", max_seqlen)
    if total is not None and (lengths.device.type != "cpu" or torch.compiler.is_compiling()):
        return total, (T if max_seqlen is None else max_seqlen)
    if lengths.shape[0] == 0:
        n, longest, shortest = 0, 0, 0
    else:
        wide = lengths.long()
        n, longest, shortest = torch.stack([wide.sum(), wide.max(), wide.min()]).tolist()
    if shortest < 0:
        i = int((lengths < 0).nonzero()[0, 0])
        raise ValueError(f"lengths must be >= 0, but lengths[{i}] = {int(lengths[i])}")
    if longest > T:
        i = int((lengths > T).nonzero()[0, 0])
        raise ValueError(f"lengths must be <= T={T} (input_ids.shape[1]), but lengths[{i}] = "
                         f"{int(lengths[i])}")
    if n > _INT32_MAX:
        raise ValueError(f"lengths sum to {n} tokens; cu_seqlens is int32 (at most 2**31 - 1)")
    if total is not None and total != n:
        raise ValueError(f"total={total} but lengths sum to {n}")
    if max_seqlen is not None and max_seqlen < longest:
        raise ValueError(f"max_seqlen={max_seqlen} is below the longest sequence ({longest})")
    return n, (longest if max_seqlen is None else max_seqlen)


def _check_out(out, shape: tuple, like: torch.Tensor) -> None:
    _require_tensor("out", out)
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"out must have shape {tuple(shape)}, got {tuple(out.shape)}")
    if out.dtype != like.dtype:
        raise TypeError(f"out must have dtype {like.dtype}, got {out.dtype}")
    if out.device != like.device:
        raise ValueError(f"out is on {out.device} but the input is on {like.device}")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")
    if torch.is_grad_enabled() and (like.requires_grad or out.requires_grad):
        raise ValueError("out= is not differentiable: call without out= to get gradients")


def _as_pair_tokens(pair_tokens) -> torch.Tensor:
    try:
        sizes = torch.as_tensor(pair_tokens)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"pair_tokens must be a 1-D integer tensor, array or list ({exc})") \
            from exc
    if not isinstance(pair_tokens, torch.Tensor) and sizes.numel() == 0:
        sizes = sizes.long()  # an empty list: no dtype to check
    if not _is_int_dtype(sizes.dtype):
        raise TypeError(f"pair_tokens must hold integers, got {sizes.dtype}")
    if sizes.dim() != 1:
        raise ValueError(f"pair_tokens must be 1-D [P], got shape {tuple(sizes.shape)}")
    return sizes.to(device="cpu", dtype=torch.int64).contiguous()


def _use_extension(device: torch.device, backend: str) -> bool:
    choice = requested("packing", backend)
    if choice == "torch":
        return False
    available = (device.type == "cpu" and _EXT_CPU) or (device.type == "cuda" and _EXT_CUDA)
    if choice == "extension" and not available:
        raise RuntimeError(f"backend='extension' but the packing extension has no kernel for "
                           f"{device.type} tensors (packing.backend() = {backend()!r})")
    return available


# --------------------------------------------------------------------------- autograd


def _pack(padded: torch.Tensor, cu: torch.Tensor, total, use_ext: bool) -> torch.Tensor:
    if use_ext:
        return torch.ops.mpo_fast.pack(padded, cu, total)
    return _TorchPack.apply(padded, cu, total)


if _C is not None:

    def _ext_pack_setup(ctx, inputs, output):
        padded, cu, _ = inputs
        ctx.save_for_backward(cu)
        ctx.T = padded.shape[1]

    def _ext_pack_backward(ctx, grad):
        (cu,) = ctx.saved_tensors
        return torch.ops.mpo_fast.unpack(grad, cu, ctx.T), None, None

    def _ext_unpack_setup(ctx, inputs, output):
        values, cu, _ = inputs
        ctx.save_for_backward(cu)
        ctx.N = values.shape[0]

    def _ext_unpack_backward(ctx, grad):
        (cu,) = ctx.saved_tensors
        return torch.ops.mpo_fast.pack(grad, cu, ctx.N), None, None

    torch.library.register_autograd("mpo_fast::pack", _ext_pack_backward,
                                    setup_context=_ext_pack_setup)
    torch.library.register_autograd("mpo_fast::unpack", _ext_unpack_backward,
                                    setup_context=_ext_unpack_setup)


class _TorchPack(torch.autograd.Function):
    @staticmethod
    def forward(ctx, padded, cu, total):
        ctx.save_for_backward(cu)
        ctx.T = padded.shape[1]
        return _pack_torch(padded, cu, total)

    @staticmethod
    def backward(ctx, grad):
        (cu,) = ctx.saved_tensors
        return _TorchUnpack.apply(grad, cu, ctx.T), None, None


class _TorchUnpack(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, cu, T):
        ctx.save_for_backward(cu)
        ctx.N = values.shape[0]
        return _unpack_torch(values, cu, T)

    @staticmethod
    def backward(ctx, grad):
        (cu,) = ctx.saved_tensors
        return _TorchPack.apply(grad, cu, ctx.N), None, None


# --------------------------------------------------------------------------- torch fallback


def _padded_rows(cu: torch.Tensor, total, T) -> torch.Tensor:
    """int64 [total]: the row of each packed token in the flattened [S*T] padded layout."""
    S = cu.shape[0] - 1
    starts = cu[:-1].long()
    lengths = cu[1:].long() - starts
    seq = torch.repeat_interleave(torch.arange(S, device=cu.device), lengths, output_size=total)
    return seq * T + (torch.arange(total, device=cu.device) - starts[seq])


def _seq_index_torch(lengths: torch.Tensor, T, total) -> tuple[torch.Tensor, torch.Tensor]:
    S = lengths.shape[0]
    lengths = lengths.long().clamp(0, T)
    cu = torch.zeros(S + 1, dtype=torch.int32, device=lengths.device)
    cu[1:] = torch.cumsum(lengths, 0)
    seq = torch.repeat_interleave(torch.arange(S, device=lengths.device), lengths,
                                  output_size=total)
    positions = torch.arange(total, device=lengths.device) - cu[:-1].long()[seq]
    return cu, positions


def _pack_torch(padded: torch.Tensor, cu: torch.Tensor, total, out=None) -> torch.Tensor:
    S, T, rest = padded.shape[0], padded.shape[1], padded.shape[2:]
    rows = _padded_rows(cu, total, T)
    flat = padded.reshape(S * T, *rest)
    if out is None:
        return flat.index_select(0, rows)
    return torch.index_select(flat, 0, rows, out=out)


def _unpack_torch(values: torch.Tensor, cu: torch.Tensor, T, out=None) -> torch.Tensor:
    S, rest = cu.shape[0] - 1, values.shape[1:]
    if out is None:
        out = values.new_zeros((S, T, *rest))
    else:
        out.zero_()
    out.view(S * T, *rest).index_copy_(0, _padded_rows(cu, values.shape[0], T), values)
    return out


def _shift_targets_torch(tokens, cu, mask, ignore_index: int) -> torch.Tensor:
    N = tokens.shape[0]
    targets = torch.full((N,), ignore_index, dtype=torch.int64, device=tokens.device)
    if N > 1:
        starts = torch.zeros(N + 1, dtype=torch.bool, device=tokens.device)
        starts.index_fill_(0, cu.long(), True)  # starts[n + 1]: n is the last of its sequence
        keep = mask[1:] & ~starts[1:N]
        targets[:-1] = torch.where(keep, tokens[1:].long(), ignore_index)
    return targets


def _plan_python(sizes: list[int], max_tokens: int) -> list[list[int]]:
    """The reference planner: the same checks, algorithm and tie-breaks as csrc/planner.cpp."""
    for i, size in enumerate(sizes):
        if size < 0:
            raise ValueError(f"pair_tokens must be >= 0, but pair_tokens[{i}] = {size}")
        if size > max_tokens:
            raise ValueError(f"pair {i} has {size} tokens, more than max_tokens={max_tokens}: "
                             "a pair is never split, so raise the budget or truncate that pair")
    order = sorted(range(len(sizes)), key=lambda i: -sizes[i])  # stable: ties by index
    bins: list[list[int]] = []
    open_bins: list[tuple[int, int]] = []  # sorted (room left, bin id)
    for i in order:
        size = sizes[i]
        k = bisect.bisect_left(open_bins, (size, -1))
        if k == len(open_bins):
            b, room = len(bins), max_tokens
            bins.append([])
        else:
            room, b = open_bins.pop(k)
        bins[b].append(i)
        bisect.insort(open_bins, (room - size, b))
    return [sorted(b) for b in bins]
