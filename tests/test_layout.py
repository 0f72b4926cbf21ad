"""mpo_fast.layout.Segments: the one segment type, from the packer to the loss.

What is checked: construction (packer, padded, user offsets), the one validation's messages,
sums / broadcasts / counts against loops, and that a packer-made Segments is never read back
to the host on its way through attention and MPOLoss (followed through every torch call,
CUDA-free), while a bare cu_seqlens tensor is read exactly once.
"""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from mpo_fast import MPOLoss, attention, layout, packing
from mpo_fast.layout import Segments, check_cu_seqlens

# --------------------------------------------------------------------------- host-read probe

_READS = {
    torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.__int__,
    torch.Tensor.__index__, torch.Tensor.__float__, torch.Tensor.numpy, torch.Tensor.cpu,
    torch.Tensor.nonzero, torch.nonzero, torch.Tensor.unique, torch.unique,
    torch.masked_select, torch.Tensor.masked_select,
}


def _is_cpu_copy(func, args, kwargs) -> bool:
    if func is not torch.Tensor.to:
        return False
    return any((isinstance(a, str) and a.startswith("cpu"))
               or (isinstance(a, torch.device) and a.type == "cpu")
               for a in (*args[1:], *kwargs.values()))


class HostReads(TorchFunctionMode):
    """Records every host read (``.tolist()``, ``.item()``, ``bool(t)``, a copy to the CPU,
    ``nonzero``: each waits for the device on a GPU) of a value computed from the followed
    tensors, through every torch call made inside the ``with`` block."""

    def __init__(self, *tensors: torch.Tensor):
        super().__init__()
        self._followed = list(tensors)  # kept alive, so their ids stay unique
        self._ids = {id(t) for t in tensors}
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves, _ = tree_flatten((args, kwargs))
        followed = any(isinstance(x, torch.Tensor) and id(x) in self._ids for x in leaves)
        if followed and (func in _READS or _is_cpu_copy(func, args, kwargs)):
            self.reads.append(getattr(func, "__name__", str(func)))
        out = func(*args, **kwargs)
        if followed:
            for x in tree_flatten(out)[0]:
                if isinstance(x, torch.Tensor) and id(x) not in self._ids:
                    self._followed.append(x)
                    self._ids.add(id(x))
        return out


def test_probe_sees_reads_of_derived_values():
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    with HostReads(cu) as probe:
        steps = (cu[1:] - cu[:-1]).long()
        bool(steps.any())
        steps.tolist()
        torch.arange(3).tolist()  # not computed from cu: not recorded
    assert probe.reads == ["__bool__", "tolist"]


# --------------------------------------------------------------------------- construction


def random_lengths(S: int, T: int) -> torch.Tensor:
    lengths = torch.randint(0, T + 1, (S,))
    lengths[torch.randperm(S)[:2]] = torch.tensor([0, T])
    return lengths


def loop_seq_ids(lengths) -> torch.Tensor:
    return torch.cat([torch.full((int(n),), s) for s, n in enumerate(lengths)] +
                     [torch.zeros(0, dtype=torch.long)])


def test_from_the_packer():
    S, T = 7, 9
    lengths = random_lengths(S, T)
    p = packing.pack(torch.randint(0, 50, (S, T)), lengths)
    segs = p.segments
    assert isinstance(segs, Segments)
    assert segs.cu_seqlens is p.cu_seqlens and segs.cu_seqlens.dtype == torch.int32
    assert segs.num_tokens == p.num_tokens == int(lengths.sum())
    assert segs.max_seqlen == p.max_seqlen == int(lengths.max())
    assert segs.num_seqs == S
    assert torch.equal(segs.seq_ids, loop_seq_ids(lengths))
    assert segs.seq_ids is segs.seq_ids  # made once, cached


def test_padded():
    S, T = 4, 6
    segs = Segments.padded(S, T)
    assert segs.cu_seqlens.tolist() == [0, 6, 12, 18, 24]
    assert (segs.num_tokens, segs.max_seqlen, segs.row_len) == (24, 6, 6)
    assert torch.equal(segs.seq_ids, torch.arange(S).repeat_interleave(T))
    assert Segments.padded(3, 0).cu_seqlens.tolist() == [0, 0, 0, 0]
    with pytest.raises(ValueError, match="does not fit int32"):
        Segments.padded(2**16, 2**16)


def test_from_cu_seqlens_reads_once_and_derives_the_rest():
    lengths = random_lengths(6, 11)
    cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    segs = Segments.from_cu_seqlens(cu)
    assert segs.num_tokens == int(lengths.sum()) and segs.max_seqlen == int(lengths.max())
    assert Segments.from_cu_seqlens(torch.zeros(1, dtype=torch.int32)).num_seqs == 0


@pytest.mark.parametrize("padded", [False, True])
def test_sum_broadcast_count_against_loops(padded):
    S, T = 6, 8
    lengths = torch.full((S,), T) if padded else random_lengths(S, T)
    cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    segs = Segments.padded(S, T) if padded else Segments.from_cu_seqlens(cu)
    N = segs.num_tokens
    values = torch.randn(N, dtype=torch.float64)
    c = cu.tolist()
    assert torch.allclose(segs.sum(values),
                          torch.stack([values[c[s]:c[s + 1]].sum() for s in range(S)]))
    per_seq = torch.randn(S)
    assert torch.equal(segs.broadcast(per_seq), per_seq.repeat_interleave(lengths))
    scored = torch.rand(N) < 0.4
    rows = scored.nonzero().squeeze(1)
    expected = [int(scored[c[s]:c[s + 1]].sum()) for s in range(S)]
    assert segs.count(rows).tolist() == expected


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("cu", "kwargs", "error", "pattern"),
    [
        ([5, 7, 6, 8], {}, ValueError,
         r"cumulative offsets starting at 0 .*cu_seqlens\[0\] = 5 .*"
         r"torch\.nn\.functional\.pad\(lengths\.cumsum\(0\), \(1, 0\)\)"),
        ([0, 7, 6, 8], {}, ValueError,
         r"non-decreasing .*cu_seqlens\[1\] = 7 > cu_seqlens\[2\] = 6.*lengths\.cumsum"),
        ([0, 3, 9], {"num_tokens": 10}, ValueError,
         r"cu_seqlens\[-1\] = 9 but the tokens has 10 tokens"),
        ([0, 3, 9], {"max_len": 4}, ValueError, r"step by 0..T=4, but sequence 1 has 6"),
        ([0, 3, 9], {"num_seqs": 3}, ValueError, r"3 entries but the tokens has S=3 sequences"),
    ],
)
def test_check_messages(cu, kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        check_cu_seqlens(torch.tensor(cu, dtype=torch.int32), None, read="always", **kwargs)


def test_check_metadata_without_reading():
    cu = torch.tensor([0, 2, 1], dtype=torch.int32)  # bad values, never read
    assert check_cu_seqlens(cu, None, read="never") is None
    assert check_cu_seqlens(cu.to("meta"), torch.device("meta")) is None  # "cpu": not on CPU
    with pytest.raises(TypeError, match=r"int32 \(as packing.pack makes it\), got torch.int64"):
        check_cu_seqlens(cu.long(), None, read="never")
    with pytest.raises(TypeError, match=r"cu_seqlens must be an int32 torch\.Tensor"):
        check_cu_seqlens([0, 1], None)
    with pytest.raises(ValueError, match="1-D with S \\+ 1 >= 1 entries"):
        check_cu_seqlens(torch.zeros(0, dtype=torch.int32), None)
    with pytest.raises(ValueError, match="cu_seqlens is on meta but values is on cpu"):
        check_cu_seqlens(cu.to("meta"), torch.device("cpu"), owner="values")
    with pytest.raises(ValueError, match="read must be"):
        check_cu_seqlens(cu, None, read="sometimes")


def test_segments_constructor_checks_metadata_only():
    with pytest.raises(TypeError, match="must be int32"):
        Segments(torch.tensor([0, 3]), 3, 3)
    with pytest.raises(TypeError, match="num_tokens must be an int"):
        Segments(torch.tensor([0, 3], dtype=torch.int32), 3.0, 3)
    with pytest.raises(TypeError, match="max_seqlen must be an int >= 0"):
        Segments(torch.tensor([0, 3], dtype=torch.int32), 3, -1)
    segs = Segments(torch.tensor([0, 3], dtype=torch.int32), 3, 3)
    with pytest.raises(ValueError, match="segments cover 3 tokens but targets has 4"):
        segs.check_tokens(4, torch.device("cpu"), owner="targets")
    with pytest.raises(ValueError, match=r"segments .* are on cpu but targets is on meta"):
        segs.check_tokens(3, torch.device("meta"), owner="targets")


# --------------------------------------------------------------------------- no host reads


def packed_batch(B=2, T=7, H=8, V=30):
    S = 2 * B
    lengths = torch.randint(2, T + 1, (S,))
    ids = torch.randint(0, V, (S, T))
    p = packing.pack(ids, lengths)
    completion = torch.rand(p.num_tokens) < 0.7
    completion[p.cu_seqlens[1:].long() - 1] = True  # every sequence scores a token
    targets = p.shift_targets(completion)
    hidden = torch.randn(p.num_tokens, H, requires_grad=True)
    return p, targets, hidden, torch.randn(V, H) / H**0.5


def test_mpo_loss_never_reads_the_packers_segments():
    p, targets, hidden, weight = packed_batch()
    ref = (torch.randn(2), torch.randn(2))
    fn = MPOLoss(backend="torch")
    with HostReads(p.cu_seqlens) as probe:
        out = fn(hidden, weight, targets, cu_seqlens=p.segments, ref_logps=ref)
        out.loss.backward()
    assert probe.reads == []
    # a bare tensor is the user's own: checked, which reads it back (once, in one place)
    calls = []
    real = layout._check_values
    layout._check_values = lambda *a: calls.append(1) or real(*a)
    try:
        with HostReads(p.cu_seqlens) as probe:
            again = fn(hidden, weight, targets, cu_seqlens=p.cu_seqlens, ref_logps=ref)
    finally:
        layout._check_values = real
    assert calls == [1] and probe.reads
    assert torch.equal(again.chosen_logps, out.chosen_logps)


def test_attention_never_reads_the_packers_segments():
    """The GPU paths take the packer's Segments as they are (the one-call masked "sdpa" is
    checked here); on a CPU, "sdpa" reads the offsets once per call to attend sequence by
    sequence, where a host read costs nothing."""
    p, _, _, _ = packed_batch()
    q, k, v = (torch.randn(p.num_tokens, 2, 4) for _ in range(3))
    with HostReads(p.cu_seqlens) as probe:
        masked = attention._masked_attention(q, k, v, p.segments.seq_ids, 0.5, True, None,
                                             None, 0.0)
    assert probe.reads == []
    with HostReads(p.cu_seqlens) as probe:
        out = attention.varlen_attention(q, k, v, p.segments, backend="sdpa")
    assert probe.reads == ["tolist"]
    torch.testing.assert_close(out, masked)
    kwargs = attention.attention_kwargs(p)
    assert kwargs["cu_seq_lens_q"] is p.cu_seqlens and kwargs["max_length_q"] == p.max_seqlen
    assert torch.equal(out, attention.varlen_attention(q, k, v, p.cu_seqlens, p.max_seqlen))
    with pytest.raises(TypeError, match=r"expected a mpo_fast\.layout\.Segments"):
        attention.attention_kwargs(p.cu_seqlens)
