"""mpo_fast.packing: the extension ops against a loop reference and the torch fallback.

Every test draws fresh random lengths (conftest seeds torch randomly) and forces the edge
cases in: an empty sequence, a length-1 sequence and a full-length one.
"""

import math

import pytest
import torch
from conftest import DEVICES, requires_cuda

from mpo_fast import packing

HAS_EXT = packing._C is not None
BACKENDS = ["torch"] + (["extension"] if HAS_EXT else [])
requires_ext = pytest.mark.skipif(not HAS_EXT, reason="mpo_fast._C is not built")

# (S, T): one sequence, tiny, typical, large S
SHAPES = [(1, 1), (1, 23), (6, 37), (513, 9)]


def need_kernel(device: str, backend: str) -> None:
    """Skip when the extension was built without kernels for this device (CUDA on a CPU build)."""
    if backend == "extension" and device == "cuda" and not packing._EXT_CUDA:
        pytest.skip("the extension was built without CUDA kernels")


def random_lengths(S: int, T: int, device="cpu") -> torch.Tensor:
    lengths = torch.randint(0, T + 1, (S,))
    special = torch.tensor([0, 1, T])[torch.randperm(3)][: min(S, 3)]
    lengths[torch.randperm(S)[: special.numel()]] = special
    return lengths.to(device)


def random_padded(S, T, rest=(), dtype=torch.float32, device="cpu"):
    if dtype == torch.bool:
        return torch.rand(S, T, *rest, device=device) > 0.5
    if not dtype.is_floating_point:
        return torch.randint(-(2**30), 2**30, (S, T, *rest), device=device).to(dtype)
    return torch.randn(S, T, *rest, device=device).to(dtype)


def loop_pack(x, lengths):
    """The obvious reference: concatenate the real tokens of each sequence."""
    L = lengths.tolist()
    tokens = torch.cat([x[s, : L[s]] for s in range(len(L))]) if L else x.reshape(0, *x.shape[2:])
    cu = torch.tensor([0, *torch.tensor(L, dtype=torch.int64).cumsum(0).tolist()],
                      dtype=torch.int32)
    positions = torch.cat([torch.arange(n) for n in L]) if L else torch.zeros(0, dtype=torch.long)
    return tokens, cu, positions


def loop_targets(tokens, cu, mask, ignore):
    out = torch.full_like(tokens, ignore, dtype=torch.int64)
    c = cu.tolist()
    for s in range(len(c) - 1):
        for n in range(c[s], c[s + 1] - 1):
            if mask[n + 1]:
                out[n] = tokens[n + 1]
    return out


def bits(t: torch.Tensor) -> torch.Tensor:
    """View as integers so NaN payloads and -0.0 compare bit for bit."""
    view = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16,
            torch.float16: torch.int16}
    return t.view(view[t.dtype]) if t.dtype in view else t


# ----------------------------------------------------------------------------- pack / unpack


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("S,T", SHAPES)
@pytest.mark.parametrize("rest,dtype", [((), torch.int64), ((), torch.int32), ((3,), torch.float32),
                                        ((2, 5), torch.bfloat16), ((4,), torch.bool)])
def test_pack_matches_loop_reference(device, backend, S, T, rest, dtype):
    need_kernel(device, backend)
    x = random_padded(S, T, rest, dtype, device)
    lengths = random_lengths(S, T, device)
    p = packing.pack(x, lengths, backend=backend)
    tokens, cu, positions = loop_pack(x.cpu(), lengths.cpu())
    assert torch.equal(p.tokens.cpu(), tokens)
    assert p.cu_seqlens.dtype == torch.int32 and torch.equal(p.cu_seqlens.cpu(), cu)
    assert p.position_ids.dtype == torch.int64 and torch.equal(p.position_ids.cpu(), positions)
    assert p.max_seqlen == int(lengths.max()) and p.padded_len == T
    assert p.num_tokens == int(lengths.sum()) and p.num_seqs == S


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("S,T", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
def test_roundtrip(device, backend, S, T, dtype):
    need_kernel(device, backend)
    x = random_padded(S, T, (7,), dtype, device)
    lengths = random_lengths(S, T, device)
    p = packing.pack(x, lengths, backend=backend)
    back = packing.unpack(p.tokens, p.cu_seqlens, T, backend=backend)
    valid = torch.arange(T, device=device)[None, :] < lengths[:, None]
    assert torch.equal(back, torch.where(valid[..., None], x, torch.zeros_like(x)))
    assert torch.equal(p.pack_like(back, backend=backend), p.tokens)
    assert torch.equal(p.unpack(p.tokens, backend=backend), back)


@requires_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("S,T", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_extension_bit_identical_to_fallback(device, S, T, dtype):
    need_kernel(device, "extension")
    x = random_padded(S, T, (3,), dtype, device)
    flat = x.view(-1)  # special values must move untouched
    flat[torch.randint(0, flat.numel(), (min(4, flat.numel()),), device=device)] = torch.tensor(
        [math.nan, -0.0, math.inf, -math.inf], dtype=dtype, device=device)[: min(4, flat.numel())]
    lengths = random_lengths(S, T, device)
    a = packing.pack(x, lengths, backend="extension")
    b = packing.pack(x, lengths, backend="torch")
    for name in ("tokens", "cu_seqlens", "position_ids"):
        assert torch.equal(bits(getattr(a, name)), bits(getattr(b, name))), name
    ua = packing.unpack(a.tokens, a.cu_seqlens, T, backend="extension")
    ub = packing.unpack(b.tokens, b.cu_seqlens, T, backend="torch")
    assert torch.equal(bits(ua), bits(ub))


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_buffers(backend):
    S, T = 9, 31
    x = torch.randn(S, T, 4)
    p = packing.pack(x, random_lengths(S, T), backend=backend)
    out = torch.full((p.num_tokens, 4), math.nan)
    assert packing.pack_values(x, p.cu_seqlens, p.num_tokens, out=out, backend=backend) is out
    assert torch.equal(out, p.tokens)
    padded = torch.full((S, T, 4), math.nan)  # every byte is rewritten, padding included
    assert packing.unpack(out, p.cu_seqlens, T, out=padded, backend=backend) is padded
    assert torch.equal(padded, packing.unpack(p.tokens, p.cu_seqlens, T, backend=backend))
    with pytest.raises(ValueError, match="out must have shape"):
        packing.unpack(out, p.cu_seqlens, T, out=torch.empty(S, T + 1, 4), backend=backend)
    with pytest.raises(TypeError, match="out must have dtype"):
        packing.unpack(out, p.cu_seqlens, T, out=torch.empty(S, T, 4, dtype=torch.float64),
                       backend=backend)
    with pytest.raises(ValueError, match="not differentiable"):
        packing.unpack(out.requires_grad_(), p.cu_seqlens, T, out=padded, backend=backend)


def test_total_and_max_seqlen_arguments():
    S, T = 5, 12
    x = torch.randn(S, T)
    lengths = random_lengths(S, T)
    n = int(lengths.sum())
    p = packing.pack(x, lengths, total=n, max_seqlen=T)
    assert p.num_tokens == n and p.max_seqlen == T
    with pytest.raises(ValueError, match=r"total=.* but lengths sum to"):
        packing.pack(x, lengths, total=n + 1)
    with pytest.raises(ValueError, match="max_seqlen"):
        packing.pack(x, torch.full((S,), 3), max_seqlen=2)


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_pack_unpack(backend):
    S, T = 4, 6
    lengths = random_lengths(S, T)
    x = torch.randn(S, T, 3, dtype=torch.float64, requires_grad=True)
    p = packing.pack(x.detach(), lengths)
    cu, n = p.cu_seqlens, p.num_tokens
    v = torch.randn(n, 3, dtype=torch.float64, requires_grad=True)

    def pk(t):
        return packing.pack_values(t, cu, n, backend=backend)

    def up(t):
        return packing.unpack(t, cu, T, backend=backend)

    assert torch.autograd.gradcheck(pk, (x,))
    assert torch.autograd.gradcheck(up, (v,))
    assert torch.autograd.gradgradcheck(pk, (x,))
    assert torch.autograd.gradgradcheck(up, (v,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_of_each_is_the_other(backend):
    S, T = 7, 10
    x = torch.randn(S, T, 5, requires_grad=True)
    p = packing.pack(x, random_lengths(S, T), backend=backend)
    g = torch.randn_like(p.tokens)
    (gx,) = torch.autograd.grad(p.tokens, x, g)
    assert torch.equal(gx, packing.unpack(g, p.cu_seqlens, T, backend=backend))
    v = p.tokens.detach().requires_grad_()
    gu = torch.randn(S, T, 5)
    (gv,) = torch.autograd.grad(packing.unpack(v, p.cu_seqlens, T, backend=backend), v, gu)
    assert torch.equal(gv, p.pack_like(gu, backend=backend))


# ----------------------------------------------------------------------------- shift_targets


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("S,T", SHAPES)
@pytest.mark.parametrize("tok_dtype", [torch.int64, torch.int32])
def test_shift_targets_matches_reference(device, backend, S, T, tok_dtype):
    need_kernel(device, backend)
    lengths = random_lengths(S, T, device)
    ids = torch.randint(0, 1000, (S, T), device=device, dtype=tok_dtype)
    p = packing.pack(ids, lengths)
    mask = torch.rand(p.num_tokens, device=device) > 0.3
    targets = packing.shift_targets(p.tokens, p.cu_seqlens, mask, ignore_index=-7, backend=backend)
    assert targets.dtype == torch.int64
    expected = loop_targets(p.tokens.cpu(), p.cu_seqlens.cpu(), mask.cpu(), -7)
    assert torch.equal(targets.cpu(), expected)
    # never across a boundary: the last token of every sequence predicts nothing
    cu = p.cu_seqlens.long().cpu()
    nonempty = cu[1:] > cu[:-1]
    assert bool((targets.cpu()[(cu[1:] - 1)[nonempty]] == -7).all())


def test_shift_targets_semantics():
    # two sequences: [p p c c] and [p c]; the predicted token's mask decides
    tokens = torch.tensor([10, 11, 12, 13, 20, 21])
    cu = torch.tensor([0, 4, 6], dtype=torch.int32)
    mask = torch.tensor([0, 0, 1, 1, 0, 1])  # integer 0/1 masks are accepted
    for backend in BACKENDS:
        got = packing.shift_targets(tokens, cu, mask, backend=backend)
        assert got.tolist() == [-100, 12, 13, -100, 21, -100]
    x = tokens.view(1, 6)
    p = packing.pack(x.repeat(2, 1), torch.tensor([4, 2]))
    padded_mask = torch.tensor([[0, 0, 1, 1, 0, 0], [0, 1, 0, 0, 0, 0]], dtype=torch.bool)
    assert p.shift_targets(padded_mask).tolist() == [-100, 12, 13, -100, 11, -100]


@requires_ext
def test_shift_targets_bit_identical_large():
    S, T = 300, 64
    lengths = random_lengths(S, T)
    p = packing.pack(torch.randint(0, 50000, (S, T)), lengths)
    mask = torch.rand(p.num_tokens) > 0.5
    a = packing.shift_targets(p.tokens, p.cu_seqlens, mask, backend="extension")
    b = packing.shift_targets(p.tokens, p.cu_seqlens, mask, backend="torch")
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------- planner


def lognormal_pairs(P: int) -> torch.Tensor:
    """Tokens per pair: a prompt (log-normal, 64..4096) shared by two completions (16..1024)."""
    prompt = torch.exp(torch.randn(P) * 0.9 + math.log(400)).clamp(64, 4096).long()
    chosen = torch.exp(torch.randn(P) * 0.8 + math.log(200)).clamp(16, 1024).long()
    rejected = torch.exp(torch.randn(P) * 0.8 + math.log(200)).clamp(16, 1024).long()
    return 2 * prompt + chosen + rejected


@pytest.mark.parametrize("P", [0, 1, 2, 57, 3000])
def test_plan_extension_matches_reference(P):
    sizes = torch.randint(0, 50, (P,))
    sizes[: P // 3] = torch.randint(0, 3, (P // 3,)) * 25  # many ties and zero-size pairs
    sizes = sizes[torch.randperm(P)]
    budget = 60
    ref = packing.plan(sizes, budget, backend="torch")
    if HAS_EXT:
        assert packing.plan(sizes, budget, backend="extension") == ref
        assert packing.plan(sizes.tolist(), budget) == ref
    assert sorted(i for b in ref for i in b) == list(range(P))
    assert all(sum(int(sizes[i]) for i in b) <= budget for b in ref)
    assert all(b == sorted(b) for b in ref)


def test_plan_small_example():
    # largest first: 7 -> bin0 (room 3); 5 -> bin1 (room 5); 3 -> bin0 (best fit); 2 -> bin1
    for backend in BACKENDS:
        assert packing.plan([5, 3, 7, 2], 10, backend=backend) == [[1, 2], [0, 3]]


def test_plan_padding_under_five_percent():
    sizes = lognormal_pairs(20000 if HAS_EXT else 4000)
    budget = 16384
    bins = packing.plan(sizes, budget)
    used = sum(int(sizes[b].sum()) for b in map(torch.tensor, bins))
    assert used == int(sizes.sum())
    padding = 1 - used / (len(bins) * budget)
    assert padding < 0.05, padding


@pytest.mark.parametrize("backend", BACKENDS)
def test_plan_bad_inputs(backend):
    with pytest.raises(ValueError, match=r"pair 2 has 11 tokens, more than max_tokens=10"):
        packing.plan([3, 4, 11, 2], 10, backend=backend)
    with pytest.raises(ValueError, match=r"pair_tokens must be >= 0, but pair_tokens\[1\] = -1"):
        packing.plan([3, -1], 10, backend=backend)
    with pytest.raises(ValueError, match="max_tokens must be positive"):
        packing.plan([3], 0)
    with pytest.raises(TypeError, match="max_tokens must be an int"):
        packing.plan([3], 10.0)
    with pytest.raises(TypeError, match="pair_tokens must hold integers"):
        packing.plan([3.0, 2.0], 10)
    with pytest.raises(ValueError, match="pair_tokens must be 1-D"):
        packing.plan([[3, 2]], 10)


# ----------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("backend", BACKENDS)
def test_pack_bad_inputs(backend):
    x = torch.randn(3, 5)
    with pytest.raises(ValueError, match=r"lengths must be <= T=5 .* lengths\[1\] = 6"):
        packing.pack(x, torch.tensor([1, 6, 2]), backend=backend)
    with pytest.raises(ValueError, match=r"lengths must be >= 0, but lengths\[2\] = -1"):
        packing.pack(x, torch.tensor([1, 2, -1]), backend=backend)
    with pytest.raises(TypeError, match="lengths must be an integer tensor"):
        packing.pack(x, torch.tensor([1.0, 2.0, 3.0]), backend=backend)
    with pytest.raises(ValueError, match=r"one entry per sequence \(S=3\)"):
        packing.pack(x, torch.tensor([1, 2]), backend=backend)
    with pytest.raises(ValueError, match="lengths is on meta"):
        packing.pack(x, torch.tensor([1, 2, 3], device="meta"), backend=backend)
    with pytest.raises(ValueError, match="at least 2-D"):
        packing.pack(torch.randn(5), torch.tensor([1]), backend=backend)
    with pytest.raises(TypeError, match=r"input_ids must be a torch\.Tensor"):
        packing.pack([[1, 2]], torch.tensor([1]), backend=backend)
    with pytest.raises(TypeError, match="total must be an int"):
        packing.pack(x, torch.tensor([1, 2, 3]), total=6.0, backend=backend)
    with pytest.raises(ValueError, match="backend must be one of"):
        packing.pack(x, torch.tensor([1, 2, 3]), backend="cuda")


@pytest.mark.parametrize("backend", BACKENDS)
def test_unpack_and_targets_bad_inputs(backend):
    v = torch.randn(6, 2)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    with pytest.raises(TypeError, match="cu_seqlens must be int32"):
        packing.unpack(v, cu.long(), 4, backend=backend)
    with pytest.raises(ValueError, match=r"step by 0..T=3, but sequence 1 has 4 tokens"):
        packing.unpack(v, cu, 3, backend=backend)
    with pytest.raises(ValueError, match=r"cu_seqlens\[-1\] = 6 but values has 5"):
        packing.unpack(v[:5], cu, 4, backend=backend)
    with pytest.raises(ValueError, match=r"starting at 0 .*but cu_seqlens\[0\] = 1"):
        packing.unpack(v, cu + 1, 4, backend=backend)
    with pytest.raises(ValueError, match="cu_seqlens is on meta"):
        packing.unpack(v, cu.to("meta"), 4, backend=backend)
    with pytest.raises(TypeError, match="T must be an int"):
        packing.unpack(v, cu, 4.0, backend=backend)
    with pytest.raises(ValueError, match="S=3 sequences"):
        packing.pack_values(torch.randn(3, 4), cu, 6, backend=backend)
    tokens = torch.arange(6)
    with pytest.raises(TypeError, match="completion_mask must be bool"):
        packing.shift_targets(tokens, cu, torch.ones(6), backend=backend)
    with pytest.raises(ValueError, match="completion_mask must have the shape"):
        packing.shift_targets(tokens, cu, torch.ones(5, dtype=torch.bool), backend=backend)
    with pytest.raises(TypeError, match="tokens must be an integer tensor"):
        packing.shift_targets(tokens.float(), cu, torch.ones(6, dtype=torch.bool), backend=backend)
    with pytest.raises(ValueError, match="non-decreasing"):
        packing.shift_targets(tokens, torch.tensor([0, 4, 3, 6], dtype=torch.int32),
                              torch.ones(6, dtype=torch.bool), backend=backend)


# ----------------------------------------------------------------------------- dispatch


def test_backend_reports_the_active_implementation(monkeypatch):
    monkeypatch.delenv("MPO_FAST_PACKING", raising=False)
    name = packing.backend()
    assert name in ("cuda", "cpu", "torch")
    assert (name == "torch") == (not HAS_EXT)


def test_active_backend_answers_in_the_words_backend_takes(monkeypatch):
    """active_backend(device) is what backend="auto" runs, in backend='s own words: passing
    the answer back as backend= runs the same implementation."""
    monkeypatch.delenv("MPO_FAST_PACKING", raising=False)
    for device in DEVICES:
        word = packing.active_backend(device)
        assert word in packing.BACKENDS and word != "auto"
        if device == "cpu":
            assert (word == "extension") == HAS_EXT
        x, lengths = torch.randn(3, 5, device=device), torch.tensor([2, 5, 0], device=device)
        assert torch.equal(packing.pack(x, lengths, backend=word).tokens,
                           packing.pack(x, lengths).tokens)
    monkeypatch.setenv("MPO_FAST_PACKING", "torch")
    assert packing.active_backend("cpu") == "torch"


def test_environment_override_is_read_at_every_call(monkeypatch):
    """MPO_FAST_PACKING applies to backend="auto" from the next call on; explicit wins."""
    x, lengths = torch.randn(3, 5), torch.tensor([2, 5, 0])
    calls = []
    monkeypatch.setattr(packing, "_pack_torch", lambda *a, **k: calls.append(1) or
                        torch.zeros(7))
    monkeypatch.setenv("MPO_FAST_PACKING", "torch")
    assert packing.backend() == "torch"
    packing.pack(x, lengths)
    assert calls == [1]
    if HAS_EXT:
        packing.pack(x, lengths, backend="extension")  # an explicit choice wins
        assert calls == [1]
        monkeypatch.setenv("MPO_FAST_PACKING", "extension")
        assert packing.backend() in ("cpu", "cuda")
        packing.pack(x, lengths)
        assert calls == [1]
    monkeypatch.setenv("MPO_FAST_PACKING", "cuda")
    with pytest.raises(ValueError, match="MPO_FAST_PACKING must be one of"):
        packing.pack(x, lengths)


@requires_ext
def test_opcheck_custom_ops():
    """Schemas, Meta kernels, autograd registration and AOT dispatch of the C++ ops."""
    S, T = 5, 8
    lengths = random_lengths(S, T)
    p = packing.pack(torch.randn(S, T), lengths)
    n = p.num_tokens
    x = torch.randn(S, T, 3, requires_grad=True)
    v = torch.randn(n, 3, requires_grad=True)
    mask = torch.rand(n) > 0.5
    ops = torch.ops.mpo_fast
    torch.library.opcheck(ops.seq_index.default, (lengths, T, n))
    torch.library.opcheck(ops.pack.default, (x, p.cu_seqlens, n))
    torch.library.opcheck(ops.unpack.default, (v, p.cu_seqlens, T))
    torch.library.opcheck(ops.shift_targets.default, (p.tokens.long(), p.cu_seqlens, mask, -100))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    S, T = 4, 9
    x = torch.randn(S, T, 2, requires_grad=True)
    p = packing.pack(x.detach(), random_lengths(S, T))

    def f(padded, cu):
        packed = packing.pack_values(padded, cu, p.num_tokens, backend=backend)
        return packing.unpack(packed * 2, cu, T, backend=backend)

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    out = compiled(x, p.cu_seqlens)
    assert torch.equal(out, f(x, p.cu_seqlens))
    out.sum().backward()
    valid = torch.arange(T)[None, :] < (p.cu_seqlens[1:] - p.cu_seqlens[:-1])[:, None]
    assert torch.equal(x.grad, 2 * valid[..., None].expand_as(x).float())


@requires_cuda
@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_no_host_sync_when_total_is_given(backend):
    if backend == "extension" and not packing._EXT_CUDA:
        pytest.skip("the extension was built without CUDA kernels")
    S, T = 16, 128
    lengths = random_lengths(S, T, "cuda")
    n = int(lengths.sum())
    x = torch.randn(S, T, 64, device="cuda")
    mask = torch.ones(n, dtype=torch.bool, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        p = packing.pack(x, lengths, total=n, max_seqlen=T, backend=backend)
        back = p.unpack(p.tokens, backend=backend)
        packing.shift_targets(p.tokens[:, 0].long(), p.cu_seqlens, mask, backend=backend)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    ref = packing.pack(x.cpu(), lengths.cpu())
    assert torch.equal(p.tokens.cpu(), ref.tokens)
    assert torch.equal(back.cpu(), ref.unpack(ref.tokens))
