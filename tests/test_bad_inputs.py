"""Every bad input to fused_logprobs is a clear error naming the argument, before any kernel."""

from __future__ import annotations

import pytest
import torch
from conftest import HAS_CUDA, HAS_TRITON

import mpo_fast

N, H, V = 10, 16, 50


def good(device="cpu"):
    return {
        "hidden": torch.randn(N, H, device=device),
        "weight": torch.randn(V, H, device=device),
        "targets": torch.randint(0, V, (N,), device=device),
    }


def call(backend="torch", device=None, **changes):
    """fused_logprobs on good inputs with `changes`; the triton backend gets CUDA tensors on a
    CUDA host (there the interpreter is off, and CPU tensors would fail for another reason)."""
    if device is None:
        device = "cuda" if backend == "triton" and HAS_CUDA else "cpu"
    args = good(device)
    kwargs = {k: changes.pop(k) for k in list(changes) if k not in args}
    for k, v in changes.items():
        args[k] = v.to(device) if isinstance(v, torch.Tensor) and v.device.type == "cpu" else v
    return mpo_fast.fused_logprobs(args["hidden"], args["weight"], args["targets"],
                                   backend=backend, **kwargs)


BACKENDS = ["torch"] + (["triton"] if HAS_TRITON else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("changes", "error", "pattern"),
    [
        ({"targets": torch.full((N,), V)}, ValueError, r"targets must be in \[0, V=50\)"),
        ({"targets": torch.full((N,), V + 10**6)}, ValueError, "targets"),
        ({"targets": torch.full((N,), -3)}, ValueError, "ignore_index=-100; found -3"),
        ({"hidden": torch.randn(N, H + 1)}, ValueError, "hidden's last dim must be H=16"),
        ({"weight": torch.randn(V, H, 1)}, ValueError, r"weight must be \[V, H\]"),
        ({"targets": torch.randint(0, V, (N + 1,))}, ValueError, "targets shape"),
        ({"targets": torch.rand(N)}, TypeError, "targets must be an integer tensor"),
        ({"targets": torch.ones(N, dtype=torch.bool)}, TypeError, "targets must be an integer"),
        ({"hidden": torch.randint(0, 5, (N, H))}, TypeError, "hidden must be bf16"),
        ({"weight": torch.randn(V, H, dtype=torch.bfloat16)}, TypeError, "weight dtype"),
        ({"weight": torch.randn(V, H, device="meta")}, ValueError, "weight on meta"),
        ({"targets": torch.zeros(N, dtype=torch.long, device="meta")}, ValueError,
         "targets on meta"),
        ({"bias": torch.randn(V + 1)}, ValueError, r"bias must be \[V=50\]"),
        ({"bias": torch.randn(V, dtype=torch.float64)}, TypeError, "bias dtype"),
        ({"bias": [0.0] * V}, TypeError, "bias must be a torch.Tensor"),
        ({"hidden": [[0.0] * H] * N}, TypeError, "hidden must be a torch.Tensor"),
        ({"temperature": 0.0}, ValueError, "temperature"),
        ({"temperature": float("nan")}, ValueError, "temperature"),
        ({"softcap": -1.0}, ValueError, "softcap"),
        ({"softcap": float("inf")}, ValueError, "softcap"),
        ({"ignore_index": 1.5}, TypeError, "ignore_index"),
    ],
)
def test_rejected_with_a_clear_message(backend, changes, error, pattern):
    with pytest.raises(error, match=pattern):
        call(backend, **changes)


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        call("cuda")


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_triton_needs_cuda_or_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        call("triton", device="cpu")


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_triton_rejects_fp64():
    with pytest.raises(TypeError, match="fp64 needs 'torch'"):
        call("triton", hidden=torch.randn(N, H, dtype=torch.float64),
             weight=torch.randn(V, H, dtype=torch.float64))


def test_ignore_index_is_not_range_checked():
    """Ignored positions may hold any value, including ones far outside [0, V)."""
    targets = torch.randint(0, V, (N,))
    targets[::2] = -100
    out = call(targets=targets)
    assert torch.isfinite(out).all() and (out[::2] == 0).all() and (out[1::2] < 0).all()


def test_empty_input():
    out = call(hidden=torch.randn(0, H), targets=torch.zeros(0, dtype=torch.long))
    assert out.shape == (0,)


# ---------------------------------------------------------------------------------------------
# MPOLoss: the errors a new user met first


def mpo_batch(B=2, T=6):
    hidden = torch.randn(2 * B, T, H)
    targets = torch.randint(0, V, (2 * B, T))
    targets[:, :2] = -100  # prompt
    return hidden, torch.randn(V, H), targets


def test_lengths_passed_as_cu_seqlens_say_what_offsets_are():
    hidden, weight, targets = mpo_batch()
    lengths = torch.tensor([5, 7, 6, 6], dtype=torch.int32)  # sum = 24 = N, but not offsets
    ph, pt = hidden.reshape(-1, H), targets.reshape(-1)
    with pytest.raises(ValueError, match=r"cumulative offsets starting at 0.*"
                       r"torch\.nn\.functional\.pad\(lengths\.cumsum\(0\), \(1, 0\)\)"):
        mpo_fast.MPOLoss(loss_types=("sft",))(ph, weight, pt, cu_seqlens=lengths)
    offsets = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)  # the fix
    out = mpo_fast.MPOLoss(loss_types=("sft",))(ph, weight, pt, cu_seqlens=offsets)
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_no_completion_tokens_is_an_error(layout):
    hidden, weight, targets = mpo_batch()
    targets[:] = -100
    kwargs = {}
    if layout == "packed":
        hidden, targets = hidden.reshape(-1, H), targets.reshape(-1)
        kwargs["cu_seqlens"] = mpo_fast.Segments.padded(4, 6)
    with pytest.raises(ValueError, match="no completion tokens: every target is "
                                         "ignore_index=-100"):
        mpo_fast.MPOLoss(loss_types=("sft",))(hidden, weight, targets, **kwargs)


def test_cu_seqlens_of_another_type():
    hidden, weight, targets = mpo_batch()
    with pytest.raises(TypeError, match=r"cu_seqlens must be a Segments \(packing.pack"):
        mpo_fast.MPOLoss(loss_types=("sft",))(hidden.reshape(-1, H), weight,
                                              targets.reshape(-1), cu_seqlens=[0, 6, 12, 18])


def test_preference_loss_asks_for_the_bco_shift_explicitly():
    c, r = -torch.rand(3) * 10, -torch.rand(3) * 10
    with pytest.raises(ValueError, match=r"needs bco_state: pass bco_state=mpo_fast\.losses\."
                                         r"new_bco_state\(\) .* or bco_delta='none'"):
        mpo_fast.preference_loss(c, r, c, r, loss_types=("bco_pair",))
    with pytest.raises(ValueError, match="bco_state is only used with bco_delta='running_mean'"):
        mpo_fast.preference_loss(c, r, c, r, loss_types=("bco_pair",), bco_delta="none",
                                 bco_state=torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="bco_delta must be 'running_mean' or 'none'"):
        mpo_fast.preference_loss(c, r, c, r, loss_types=("bco_pair",), bco_delta="ema")
