"""fused_logprobs against a float64 full-logits reference, on both backends.

On a CPU machine the "triton" cases run the real kernels under TRITON_INTERPRET=1 (slow:
shapes stay small); on a GPU machine they run on CUDA.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import HAS_CUDA, HAS_TRITON
from reference import leaf64, logprobs, rel_err

import mpo_fast
from mpo_fast import torch_backend
from mpo_fast.logprobs import resolve_backend

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
CASES = [pytest.param("torch", "cpu", id="torch-cpu")]
if HAS_TRITON and INTERPRETING:
    CASES.append(pytest.param("triton", "cpu", id="triton-interpreter"))
if HAS_CUDA:
    CASES += [pytest.param("torch", "cuda", id="torch-cuda")]
    if HAS_TRITON:
        CASES += [pytest.param("triton", "cuda", id="triton-cuda")]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 5e-3}


def make_inputs(lead, H, V, dtype, device, bias=False, ignore_frac=0.3):
    """Random head inputs; logits have std ~3 so the softmax is neither flat nor one-hot."""
    hidden = torch.randn(*lead, H, device=device).to(dtype)
    weight = (torch.randn(V, H, device=device) * 3 / H**0.5).to(dtype)
    b = torch.randn(V, device=device).to(dtype) if bias else None
    targets = torch.randint(0, V, lead, device=device)
    targets[torch.rand(lead, device=device) < ignore_frac] = -100
    return hidden, weight, b, targets


def run_and_compare(backend, device, dtype, lead=(37,), H=50, V=1003, bias=False, **head):
    hidden, weight, b, targets = make_inputs(lead, H, V, dtype, device, bias)
    leaves = [t.requires_grad_() for t in (hidden, weight, b) if t is not None]
    out = mpo_fast.fused_logprobs(hidden, weight, targets, bias=b, backend=backend, **head)
    assert out.dtype == torch.float32 and out.shape == targets.shape
    upstream = torch.randn(out.shape, device=device)
    (out * upstream).sum().backward()

    refs = [leaf64(t) for t in (hidden, weight, b) if t is not None]
    ref = logprobs(refs[0], refs[1], targets, refs[2] if b is not None else None, **head)
    (ref * upstream.double()).sum().backward()

    tol = TOL[dtype]
    assert rel_err(out, ref) <= tol
    assert (out[targets == -100] == 0).all()
    for name, leaf, r in zip(("hidden", "weight", "bias"), leaves, refs, strict=False):
        assert leaf.grad.dtype == leaf.dtype, name
        assert rel_err(leaf.grad, r.grad) <= tol, name
    return out


@pytest.mark.parametrize(("backend", "device"), CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "head",
    [{}, {"bias": True}, {"softcap": 4.0, "temperature": 0.7},
     {"bias": True, "softcap": 2.5, "temperature": 1.3}],
    ids=["plain", "bias", "softcap-temp", "all"],
)
def test_matches_float64_reference(backend, device, dtype, head):
    run_and_compare(backend, device, dtype, **head)


@pytest.mark.parametrize(("backend", "device"), CASES)
def test_fp16(backend, device):
    run_and_compare(backend, device, torch.float16, bias=True)


@pytest.mark.parametrize(("backend", "device"), CASES)
def test_padded_layout_with_an_all_ignored_row(backend, device):
    """hidden [2B, T, H] as MPO feeds it; one sequence has no completion token at all."""
    hidden, weight, _, targets = make_inputs((4, 9), 24, 300, torch.float32, device)
    targets[2] = -100
    hidden.requires_grad_()
    out = mpo_fast.fused_logprobs(hidden, weight, targets, backend=backend)
    out.sum().backward()
    ref = logprobs(hidden.double(), weight.double(), targets)
    assert rel_err(out, ref) <= 1e-5
    assert (out[2] == 0).all() and (hidden.grad[2] == 0).all()


@pytest.mark.parametrize(("backend", "device"), CASES)
def test_every_position_ignored(backend, device):
    hidden, weight, b, targets = make_inputs((3, 5), 16, 64, torch.float32, device, bias=True)
    targets.fill_(-100)
    for t in (hidden, weight, b):
        t.requires_grad_()
    out = mpo_fast.fused_logprobs(hidden, weight, targets, bias=b, backend=backend)
    out.sum().backward()
    assert (out == 0).all()
    for t in (hidden, weight, b):
        assert (t.grad == 0).all()


@pytest.mark.parametrize(("backend", "device"), CASES)
def test_custom_ignore_index_and_int32_targets(backend, device):
    hidden, weight, _, targets = make_inputs((20,), 16, 100, torch.float32, device)
    targets[targets == -100] = 7  # a real token id used as the ignore marker
    out = mpo_fast.fused_logprobs(hidden, weight, targets.int(), ignore_index=7, backend=backend)
    ref = logprobs(hidden.double(), weight.double(), targets, ignore_index=7)
    assert rel_err(out, ref) <= 1e-5 and (out[targets == 7] == 0).all()


@pytest.mark.parametrize(("backend", "device"), CASES)
def test_non_contiguous_hidden(backend, device):
    _, weight, _, targets = make_inputs((12,), 32, 200, torch.float32, device)
    strided = torch.randn(32, 12, device=device).T  # [12, 32] with stride (1, 12)
    strided.requires_grad_()
    out = mpo_fast.fused_logprobs(strided, weight, targets, backend=backend)
    out.sum().backward()
    leaf = leaf64(strided)
    ref = logprobs(leaf, weight.double(), targets)
    ref.sum().backward()
    assert rel_err(out, ref) <= 1e-5 and rel_err(strided.grad, leaf.grad) <= 1e-5


def test_torch_backend_many_chunks(monkeypatch):
    """A tiny workspace forces many token and vocab chunks, none dividing N or V."""
    monkeypatch.setenv("MPO_FAST_WORKSPACE_MB", "0.05")
    tc, vc = torch_backend.plan_chunks(300, 1003, 40, torch.float32, softcap=True)
    assert tc < 300 and vc < 1003
    for dtype in (torch.float32, torch.bfloat16):
        run_and_compare("torch", "cpu", dtype, lead=(300,), H=40, V=1003, bias=True,
                        softcap=3.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plan_chunks_respects_the_workspace(dtype):
    for M, V, H, budget in [(8192, 65536, 512, 256 * 2**20), (16384, 151646, 4096, 256 * 2**20),
                            (100, 50000, 2048, 64 * 2**20), (5, 1000, 64, 2**20)]:
        tc, vc = torch_backend.plan_chunks(M, V, H, dtype, softcap=True, budget=budget)
        copies = 1 if dtype == torch.float32 else 2
        used = 4 * (2 * tc * vc + copies * vc * H + 2 * tc * H)
        assert 1 <= tc <= M and 1 <= vc <= V
        assert used <= budget or (tc == 64 and vc == 128)


@pytest.mark.skipif(not (HAS_TRITON and INTERPRETING), reason="interpreter-only split check")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_vocab_splits_and_dw_slabs(monkeypatch, dtype):
    """Enough vocab for several forward splits, and a dW slab smaller than V (bf16)."""
    from mpo_fast.kernels import logprob_backward, logprob_forward

    assert logprob_forward._vocab_splits(40, 2500, torch.device("cpu")) > 1
    monkeypatch.setattr(logprob_backward, "SLAB_ROWS", 96)
    run_and_compare("triton", "cpu", dtype, lead=(40,), H=32, V=2500, bias=True)


@pytest.mark.skipif(not (HAS_TRITON and INTERPRETING), reason="poisoning checks the interpreter")
def test_triton_writes_every_output(monkeypatch):
    """Buffers from torch.empty are NaN-poisoned: any element a kernel forgets shows up."""
    real_empty = torch.empty

    def poisoned(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-(2**30))

    monkeypatch.setattr(torch, "empty", poisoned)
    run_and_compare("triton", "cpu", torch.float32, lead=(50,), H=20, V=2100, bias=True)


def test_gradcheck_fp64_torch_backend(monkeypatch):
    monkeypatch.setenv("MPO_FAST_WORKSPACE_MB", "0.01")  # several chunks
    hidden, weight, b, targets = make_inputs((70,), 6, 150, torch.float64, "cpu", bias=True)
    for t in (hidden, weight, b):
        t.requires_grad_()

    def f(h, w, bb):
        return mpo_fast.fused_logprobs(h, w, targets, bias=bb, softcap=3.0, temperature=0.8,
                                       backend="torch")

    assert torch.autograd.gradcheck(f, (hidden, weight, b))


def test_reference_forward_saves_nothing():
    hidden, weight, _, targets = make_inputs((30,), 16, 100, torch.float32, "cpu")
    hidden.requires_grad_()
    with torch.no_grad():
        out = mpo_fast.fused_logprobs(hidden, weight, targets)
    assert out.grad_fn is None and not out.requires_grad
    frozen = mpo_fast.fused_logprobs(hidden.detach(), weight, targets)
    assert frozen.grad_fn is None


def test_backend_resolution(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv("MPO_FAST_BACKEND", raising=False)
    assert resolve_backend("auto", cpu, torch.float32) == "torch"
    assert resolve_backend("auto", cuda, torch.float64) == "torch"
    assert resolve_backend("torch", cuda, torch.bfloat16) == "torch"
    if HAS_TRITON:
        assert resolve_backend("auto", cuda, torch.bfloat16) == "triton"
    monkeypatch.setenv("MPO_FAST_BACKEND", "torch")
    assert resolve_backend("auto", cuda, torch.bfloat16) == "torch"
    assert resolve_backend("triton", cuda, torch.bfloat16) == "triton"  # explicit wins
    monkeypatch.setenv("MPO_FAST_BACKEND", "cuda")
    with pytest.raises(ValueError, match="MPO_FAST_BACKEND"):
        resolve_backend("auto", cpu, torch.float32)


@pytest.mark.slow
def test_vocab_times_hidden_beyond_int32():
    """weight has V*H > 2^31 elements; targets sit in rows past the 2^31-th element."""
    H, V = 64, 2**25 + 3
    assert V * H > 2**31
    weight = torch.empty(V, H, dtype=torch.bfloat16)
    for v0 in range(0, V, 2**22):  # fill in pieces: no full fp32 temporary
        weight[v0:v0 + 2**22] = torch.randn(min(2**22, V - v0), H) * 0.3
    hidden = torch.randn(4, H, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.tensor([V - 1, V - 2, 2**31 // H, 5])
    g = torch.randn(4)
    out = mpo_fast.fused_logprobs(hidden, weight, targets, backend="torch")
    (out * g).sum().backward()

    # float64 reference, chunked over the vocabulary (a full [4, V] fp64 tile is 1 GiB; fine,
    # but a full fp64 weight would be 17 GiB)
    h64 = hidden.detach().double()
    lse = torch.full((4,), float("-inf"), dtype=torch.float64)
    grad_h = torch.zeros(4, H, dtype=torch.float64)
    chunks = range(0, V, 2**22)
    for v0 in chunks:
        z = h64 @ weight[v0:v0 + 2**22].double().T
        lse = torch.logaddexp(lse, torch.logsumexp(z, 1))
    for v0 in chunks:
        w = weight[v0:v0 + 2**22].double()
        p = torch.exp(h64 @ w.T - lse[:, None])
        grad_h -= (g.double()[:, None] * p) @ w
    zy = (h64 * weight[targets].double()).sum(1)
    grad_h += g.double()[:, None] * weight[targets].double()
    assert rel_err(out, zy - lse) <= 1e-2
    assert rel_err(hidden.grad, grad_h) <= 1e-2


@pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="Triton addressing check needs CUDA")
def test_triton_vocab_times_hidden_beyond_int32_cuda():
    """The kernels' row * stride offsets are int64: rows past element 2^31 of weight."""
    H, V = 128, 2**24 + 5
    assert V * H > 2**31
    weight = (torch.randn(V, H, device="cuda", dtype=torch.bfloat16) * 0.3).requires_grad_()
    hidden = torch.randn(8, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    targets = torch.tensor([V - 1, V - 2, 2**31 // H + 1, 5, V - 3, 0, V // 2, 2**31 // H],
                           device="cuda")
    g = torch.randn(8, device="cuda")
    out = mpo_fast.fused_logprobs(hidden, weight, targets, backend="triton")
    (out * g).sum().backward()
    ref = mpo_fast.fused_logprobs(hidden.detach(), weight.detach(), targets, backend="torch")
    assert rel_err(out, ref) <= 1e-3
    rows = targets.unique()
    h = leaf64(hidden)
    w_rows = weight.detach()[rows].double()
    lse = torch.logsumexp(h.detach() @ weight.detach().double().T, dim=1)  # [8, V] fp64: 1 GiB
    p = torch.exp(h.detach() @ w_rows.T - lse[:, None])
    onehot = (targets[:, None] == rows[None, :]).double()
    grad_rows = ((onehot - p) * g.double()[:, None]).T @ h.detach()
    assert rel_err(weight.grad[rows], grad_rows) <= 1e-2
