"""`Segments`: which of N flat tokens belong to which of S sequences.

The one currency between packing, attention and the loss, as ``cu_seqlens`` + ``max_seqlen``
are in flash-attention:

    cu_seqlens  int32 [S + 1] on the tokens' device: cu_seqlens[0] = 0, non-decreasing,
                cu_seqlens[S] = N; sequence s is tokens cu_seqlens[s] : cu_seqlens[s + 1]
    num_tokens  N
    max_seqlen  the longest sequence (an upper bound is fine), for the varlen attention kernels
    seq_ids     int64 [N]: the sequence of every token (made on first use, then cached)

Three ways to make one:

    packing.pack(input_ids, lengths).segments   built by the packer from lengths it checked
    Segments.padded(S, T, device)               a padded [S, T] batch: sequence s is s*T:(s+1)*T
    Segments.from_cu_seqlens(cu_seqlens)        offsets made elsewhere: checked, one host read

A `Segments` is valid by construction, so the ops that take one never check it again (and
never read it back from a GPU; CPU attention reads its offsets to go sequence by sequence,
which costs nothing there). `Segments(cu_seqlens, num_tokens, max_seqlen)` itself checks
only what it can without reading values (dtype, shape, device): like flash-attention, it
trusts the offsets, and is what the packer uses; build from offsets you did not make with
`from_cu_seqlens`.

`check_cu_seqlens` is the one validation of a bare ``cu_seqlens`` tensor in the package; it
reads the values only when asked to, or when they are on the CPU (where reading costs no
device sync).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

__all__ = ["Segments", "check_cu_seqlens"]

_INT32_MAX = 2**31 - 1
_LENGTHS_HINT = ("; if these are sequence lengths, pass their offsets: "
                 "torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)")


@dataclass(frozen=True, eq=False)
class Segments:
    """S sequences over N flat tokens (see the module docstring).

    Args:
        cu_seqlens: int32 ``[S + 1]`` offsets, trusted (not read back).
        num_tokens: N, the number of tokens the offsets cover (``cu_seqlens[-1]``).
        max_seqlen: the longest sequence, or an upper bound.
        row_len: T when the tokens are a padded ``[S, T]`` batch (sequence s is rows
            ``s*T : (s+1)*T``); lets sums and broadcasts use views instead of indices.
    """

    cu_seqlens: torch.Tensor
    num_tokens: int
    max_seqlen: int
    row_len: int | None = None

    def __post_init__(self):
        check_cu_seqlens(self.cu_seqlens, None, read="never")
        for name in ("num_tokens", "max_seqlen"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)) or (
                    isinstance(value, int) and value < 0):
                raise TypeError(f"Segments.{name} must be an int >= 0, got {value!r}")

    @classmethod
    def padded(cls, S: int, T: int, device: torch.device | str = "cpu") -> Segments:
        """The layout of a padded ``[S, T]`` batch flattened to ``[S*T]`` (no host read)."""
        if S * T > _INT32_MAX:
            raise ValueError(f"a padded batch of S*T = {S * T} tokens does not fit int32 "
                             "cu_seqlens: pack it, or split it into smaller micro-batches")
        cu = (torch.arange(S + 1, device=device) * T).to(torch.int32)
        return cls(cu, S * T, T, row_len=T)

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: torch.Tensor, num_tokens: int | None = None, *,
                        owner: str = "the tokens") -> Segments:
        """Check offsets made elsewhere (one host read of ``cu_seqlens``) and wrap them.

        ``num_tokens`` is the N the offsets must end at (default: ``cu_seqlens[-1]``); the
        message of a failed check names ``owner`` as the holder of those N tokens.
        """
        device = cu_seqlens.device if isinstance(cu_seqlens, torch.Tensor) else None
        longest, last = check_cu_seqlens(cu_seqlens, device, num_tokens=num_tokens,
                                         owner=owner, read="always")
        return cls(cu_seqlens, last if num_tokens is None else num_tokens, longest)

    @property
    def num_seqs(self) -> int:
        """S, the number of sequences."""
        return self.cu_seqlens.shape[0] - 1

    @property
    def device(self) -> torch.device:
        return self.cu_seqlens.device

    @functools.cached_property
    def seq_ids(self) -> torch.Tensor:
        """int64 ``[N]``: the sequence of every token (searchsorted: no host sync)."""
        tokens = torch.arange(self.num_tokens, device=self.device)
        return torch.searchsorted(self._cu64[1:], tokens, right=True)

    @functools.cached_property
    def _cu64(self) -> torch.Tensor:
        return self.cu_seqlens.long()

    def check_tokens(self, num_tokens: int, device: torch.device, owner: str = "the tokens"):
        """That these segments describe ``num_tokens`` tokens on ``device`` (no host read)."""
        if self.device != device:
            raise ValueError(f"segments (cu_seqlens) are on {self.device} but {owner} is on "
                             f"{device}")
        if self.num_tokens != num_tokens:
            raise ValueError(f"segments cover {self.num_tokens} tokens but {owner} has "
                             f"{num_tokens}")

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """``[N] -> [S]``: the sum over each sequence's tokens."""
        if self.row_len is not None:
            return values.view(self.num_seqs, self.row_len).sum(dim=1)
        return values.new_zeros(self.num_seqs).index_add_(0, self.seq_ids, values)

    def broadcast(self, per_seq: torch.Tensor) -> torch.Tensor:
        """``[S] -> [N]``: each sequence's value on every one of its tokens."""
        if self.row_len is not None:
            return per_seq[:, None].expand(self.num_seqs, self.row_len).reshape(-1)
        return per_seq[self.seq_ids]

    def count(self, rows: torch.Tensor) -> torch.Tensor:
        """int64 ``[S]``: how many of ``rows`` (ascending token indices, e.g. the scored
        positions from ``mask.nonzero()``) fall in each sequence. O(S log M), no host sync."""
        return torch.diff(torch.searchsorted(rows, self._cu64))


def check_cu_seqlens(
    cu_seqlens,
    device: torch.device | None,
    *,
    num_tokens: int | None = None,
    num_seqs: int | None = None,
    max_len: int | None = None,
    owner: str = "the tokens",
    read: str = "cpu",
) -> tuple[int, int] | None:
    """Check a ``cu_seqlens`` tensor against the tokens it describes.

    Always (no host read): a torch.Tensor, int32, 1-D with at least one entry, on ``device``,
    and ``num_seqs + 1`` entries when ``num_seqs`` is given. The values (starts at 0,
    non-decreasing, each step <= ``max_len``, ends at ``num_tokens``) are read back with one
    host copy when ``read="always"``, or ``"cpu"`` and the tensor is on the CPU (free: no device
    sync); ``read="never"`` reads nothing. Never reads under torch.compile.

    Returns:
        (longest sequence, cu_seqlens[-1]) when the values were read, else None.

    Raises:
        TypeError / ValueError naming ``cu_seqlens`` and what it should be.
    """
    if read not in ("always", "cpu", "never"):
        raise ValueError(f"read must be 'always', 'cpu' or 'never', got {read!r}")
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be an int32 torch.Tensor [S + 1] (or a Segments), "
                        f"got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"cu_seqlens must be int32 (as packing.pack makes it), got "
                        f"{cu_seqlens.dtype}; convert with .to(torch.int32)")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 1:
        raise ValueError(f"cu_seqlens must be 1-D with S + 1 >= 1 entries, got shape "
                         f"{tuple(cu_seqlens.shape)}")
    if device is not None and cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but {owner} is on {device}")
    if num_seqs is not None and cu_seqlens.shape[0] != num_seqs + 1:
        raise ValueError(f"cu_seqlens has {cu_seqlens.shape[0]} entries but {owner} has "
                         f"S={num_seqs} sequences (expected S + 1)")
    reading = read == "always" or (read == "cpu" and cu_seqlens.device.type == "cpu")
    if not reading or torch.compiler.is_compiling():
        return None
    return _check_values(cu_seqlens.to("cpu", torch.int64), num_tokens, max_len, owner)


def _check_values(c: torch.Tensor, num_tokens, max_len, owner) -> tuple[int, int]:
    steps = c[1:] - c[:-1]
    first, last = int(c[0]), int(c[-1])
    if first != 0:
        raise ValueError(f"cu_seqlens must be cumulative offsets starting at 0 "
                         f"([0, len_0, len_0 + len_1, ..., N]), but cu_seqlens[0] = {first} "
                         f"(got {_preview(c)}){_LENGTHS_HINT}")
    bad = steps < 0 if max_len is None else (steps < 0) | (steps > max_len)
    if bool(bad.any()):
        s = int(bad.nonzero()[0, 0])
        n = int(steps[s])
        if n < 0:
            raise ValueError(f"cu_seqlens must be non-decreasing cumulative offsets, but "
                             f"cu_seqlens[{s}] = {int(c[s])} > cu_seqlens[{s + 1}] = "
                             f"{int(c[s + 1])} (got {_preview(c)}){_LENGTHS_HINT}")
        raise ValueError(f"cu_seqlens must step by 0..T={max_len}, but sequence {s} has {n} "
                         f"tokens")
    if num_tokens is not None and isinstance(num_tokens, int) and last != num_tokens:
        raise ValueError(f"cu_seqlens[-1] = {last} but {owner} has {num_tokens} tokens "
                         f"(cu_seqlens must end at N)")
    return (int(steps.max()) if steps.numel() else 0), last


def _preview(c: torch.Tensor) -> str:
    v = c.tolist()
    return str(v) if len(v) <= 8 else f"[{', '.join(map(str, v[:4]))}, ..., {v[-1]}]"
