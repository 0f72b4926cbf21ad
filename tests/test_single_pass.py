"""Single-pass pair-local mode and frozen-head mode against the two-pass path and float64.

The float64 references are written independently in tests/reference.py (full logits,
log_softmax, gather, the docs/DESIGN.md §3.3 loss table). Shapes are tiny; small workspaces
(MPO_FAST_WORKSPACE_MB) force several groups of pairs, and a pair longer than a group.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import HAS_CUDA, HAS_TRITON
from reference import leaf64, logprobs, mpo_loss, pair_losses, rel_err

import mpo_fast
from mpo_fast import single_pass, torch_backend
from mpo_fast.losses import LossConfig

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
# Triton cases: the interpreter on a CPU machine, the real kernels on CUDA where there is one
DEVICE = "cuda" if HAS_CUDA else "cpu"
requires_triton = pytest.mark.skipif(
    not (HAS_TRITON and (HAS_CUDA or os.environ.get("TRITON_INTERPRET") == "1")),
    reason="needs triton on CUDA or under TRITON_INTERPRET=1")
MPO_LAGGED = {"loss_types": ("sigmoid", "bco_pair", "sft"), "bco_delta": "lagged"}


def make_batch(B=3, T=11, H=16, V=97, dtype=torch.float32, lengths=None):
    """A padded batch of B pairs: prompts ignored, ragged completions, a reference model."""
    hidden = torch.randn(2 * B, T, H).to(dtype)
    weight = (torch.randn(V, H) * 2 / H**0.5).to(dtype)
    targets = torch.randint(0, V, (2 * B, T))
    targets[:, :2] = -100  # prompt
    lengths = lengths or [int(n) for n in torch.randint(4, T + 1, (2 * B,))]
    for s, n in enumerate(lengths):
        targets[s, n:] = -100  # padding
    ref_hidden = (hidden.float() + 0.3 * torch.randn(2 * B, T, H)).to(dtype)
    ref_weight = (weight.float() + 0.05 * torch.randn(V, H)).to(dtype)
    return hidden, weight, targets, ref_hidden, ref_weight, lengths


def packed(lengths, *padded):
    """Each padded [S, T, ...] tensor as its sequences' first `length` rows back to back, and
    the int32 cu_seqlens [S + 1] of that layout (built here, independent of the packer)."""
    rows = [torch.cat([t[s, :n] for s, n in enumerate(lengths)]) for t in padded]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return (*rows, cu)


def run(loss_fn, hidden, weight, targets, ref_hidden, ref_weight, scale=1.0, bias=None,
        train_head=True, **kw):
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_(train_head)
    b = None if bias is None else bias.clone().requires_grad_()
    out = loss_fn(h, w, targets, bias=b, ref_hidden=ref_hidden, ref_weight=ref_weight, **kw)
    (out.loss * scale).backward()
    return out, h.grad, w.grad, None if b is None else b.grad


def reference64(hidden, weight, targets, ref_hidden, ref_weight, loss_types, weights, beta=0.1,
                delta="lagged0", scale=1.0, bias=None, **head):
    """(loss, dH, dW, db) in float64. delta "lagged0": 0 (a fresh state's previous mean);
    "paper": this batch's mean reward (a fresh state's updated mean), held constant."""
    h, w, b = leaf64(hidden), leaf64(weight), leaf64(bias)
    logp = logprobs(h, w, targets, b, **head)
    with torch.no_grad():
        ref = logprobs(ref_hidden.double(), ref_weight.double(), targets, **head)
    if delta == "paper":
        seq, sref = logp.sum(-1).detach(), ref.sum(-1)
        d = (0.1 * (seq - sref)).mean().item()
    else:
        d = 0.0
    loss = mpo_loss(logp, ref, targets, loss_types, weights, beta, delta=d)
    (loss * scale).backward()
    return loss.detach(), h.grad, w.grad, None if b is None else b.grad


# ------------------------------------------------------------------------- frozen head


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("head", [{}, {"softcap": 3.0, "temperature": 0.7}, {"bias": True}],
                         ids=["plain", "softcap-temp", "frozen-bias"])
def test_frozen_head_logprobs_match_float64(dtype, head, monkeypatch):
    monkeypatch.setenv("MPO_FAST_WORKSPACE_MB", "0.02")  # several token and vocab chunks
    H, V = 24, 301
    hidden = torch.randn(4, 9, H).to(dtype).requires_grad_()
    weight = (torch.randn(V, H) * 3 / H**0.5).to(dtype)  # frozen: no requires_grad
    bias = torch.randn(V).to(dtype) if head.get("bias") else None
    targets = torch.randint(0, V, (4, 9))
    targets[torch.rand(4, 9) < 0.3] = -100
    kw = {k: v for k, v in head.items() if k != "bias"}
    out = mpo_fast.fused_logprobs(hidden, weight, targets, bias=bias, backend="torch", **kw)
    assert "FrozenHead" in type(out.grad_fn).__name__ or "FrozenHead" in str(
        out.grad_fn.next_functions)  # "auto" took the frozen-head path
    upstream = torch.randn(out.shape)
    (out * upstream).sum().backward()
    h64 = leaf64(hidden)
    ref = logprobs(h64, weight.double(), targets, None if bias is None else bias.double(), **kw)
    (ref * upstream.double()).sum().backward()
    assert rel_err(out, ref) <= TOL[dtype]
    assert rel_err(hidden.grad, h64.grad) <= TOL[dtype]
    assert (hidden.grad.view(-1, H)[(targets == -100).view(-1)] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("head", [{}, {"softcap": 3.0, "temperature": 0.7}, {"bias": True}],
                         ids=["plain", "softcap-temp", "frozen-bias"])
@requires_triton
def test_frozen_head_triton_kernel_matches_float64(dtype, head, monkeypatch):
    """kernels/frozen_head.py (cuBLAS products + the Triton row kernel; the interpreter on
    the CPU) over several vocab slabs, against float64."""
    monkeypatch.setenv("MPO_FAST_WORKSPACE_MB", "0.05")  # 2-3 slabs of 256 rows
    from mpo_fast.kernels import frozen_head

    H, V = 24, 601
    hidden = torch.randn(3, 7, H).to(DEVICE, dtype).requires_grad_()
    weight = (torch.randn(V, H) * 3 / H**0.5).to(DEVICE, dtype)
    bias = torch.randn(V).to(DEVICE, dtype) if head.get("bias") else None
    targets = torch.randint(0, V, (3, 7)).to(DEVICE)
    targets[torch.rand(3, 7) < 0.3] = -100
    kw = {k: v for k, v in head.items() if k != "bias"}
    calls = []
    real = frozen_head.forward_frozen
    monkeypatch.setattr(frozen_head, "forward_frozen",
                        lambda *a: calls.append(1) or real(*a))
    out = mpo_fast.fused_logprobs(hidden, weight, targets, bias=bias, backend="triton",
                                  frozen_head=True, **kw)
    assert calls and frozen_head.slab_rows(21, V, hidden.element_size()) < V
    upstream = torch.randn(out.shape, device=DEVICE)
    (out * upstream).sum().backward()
    h64 = leaf64(hidden)
    ref = logprobs(h64, weight.double(), targets, None if bias is None else bias.double(), **kw)
    (ref * upstream.double()).sum().backward()
    assert rel_err(out, ref) <= 1e-5
    assert rel_err(hidden.grad, h64.grad) <= (1e-5 if dtype == torch.float32 else 1e-2)
    # "auto" keeps the Triton backend's two passes until a GPU measures the frozen path
    auto = mpo_fast.fused_logprobs(hidden, weight, targets, bias=bias, backend="triton", **kw)
    assert "FrozenHead" not in type(auto.grad_fn).__name__


def test_frozen_head_equals_two_pass_and_needs_a_frozen_head():
    H, V = 16, 203
    hidden = torch.randn(13, H, requires_grad=True)
    weight = torch.randn(V, H) * 0.4
    targets = torch.randint(0, V, (13,))
    grads = []
    for frozen in (True, False):
        hidden.grad = None
        out = mpo_fast.fused_logprobs(hidden, weight, targets, backend="torch",
                                      frozen_head=frozen)
        (out * torch.linspace(-1, 2, 13)).sum().backward()
        grads.append(hidden.grad.clone())
    assert rel_err(grads[0], grads[1]) <= 1e-6
    with pytest.raises(ValueError, match="frozen_head=True needs a head"):
        mpo_fast.fused_logprobs(hidden, weight.requires_grad_(), targets, backend="torch",
                                frozen_head=True)
    with pytest.raises(ValueError, match="frozen_head must be"):
        mpo_fast.fused_logprobs(hidden, weight, targets, backend="torch", frozen_head="yes")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_frozen_head_mpo_with_the_papers_coupled_delta(dtype):
    """Frozen head + MPO with the paper's current-batch BCO shift: exact (E needs no g)."""
    hidden, weight, targets, rh, rw, _ = make_batch(dtype=dtype)
    types, weights = ("sigmoid", "bco_pair", "sft"), (0.8, 0.2, 1.0)
    results = []
    for frozen in (True, False):
        loss_fn = mpo_fast.MPOLoss(backend="torch", frozen_head=frozen)  # running_mean
        results.append(run(loss_fn, hidden, weight, targets, rh, rw, scale=0.37,
                           train_head=False))
    (out, gh, gw, _), (out2, gh2, _, _) = results
    assert gw is None
    loss64, gh64, _, _ = reference64(hidden, weight, targets, rh, rw, types, weights,
                                     delta="paper", scale=0.37)
    assert rel_err(out.loss, loss64) <= TOL[dtype]
    assert rel_err(gh, gh64) <= TOL[dtype]
    assert rel_err(gh, gh2) <= TOL[dtype]
    assert rel_err(out.loss, out2.loss) <= 1e-6


# ------------------------------------------------------------------------- single pass


CONFIGS = [
    pytest.param(MPO_LAGGED, id="mpo-lagged"),
    pytest.param({"loss_types": ("sigmoid", "bco_pair", "sft"), "bco_delta": "none"},
                 id="mpo-none"),
    pytest.param({"loss_types": ("ipo", "hinge", "sft"), "loss_weights": (1.0, 0.5, 0.3)},
                 id="ipo-hinge-sft"),
    pytest.param({"loss_types": ("sigmoid", "sft"), "sft_normalize": "sequence"},
                 id="sft-sequence"),
]


def _types_weights(kw):
    types = kw["loss_types"]
    weights = kw.get("loss_weights") or ((0.8, 0.2, 1.0) if types == ("sigmoid", "bco_pair",
                                                                       "sft") else (1.0,) * 3)
    return types, weights[:len(types)]


@pytest.mark.parametrize("kw", CONFIGS)
@pytest.mark.parametrize("workspace", ["0.02", "256"], ids=["groups", "one-group"])
def test_single_pass_matches_two_pass_and_float64_padded(kw, workspace, monkeypatch):
    monkeypatch.setenv("MPO_FAST_WORKSPACE_MB", workspace)
    # 0.02 MiB: 16 tokens a group: pair 0 (18 tokens) alone, in two passes; pairs 1-2 (16)
    hidden, weight, targets, rh, rw, _ = make_batch(lengths=[11, 5, 6, 11, 4, 9])
    long_pairs = []
    two_pass_pair = single_pass.SinglePassJob._two_pass_pair
    monkeypatch.setattr(single_pass.SinglePassJob, "_two_pass_pair",
                        lambda self, *a: long_pairs.append(1) or two_pass_pair(self, *a))
    ref_out = run(mpo_fast.MPOLoss(backend="torch", **kw), hidden, weight, targets, rh, rw,
                  scale=0.5)
    out = run(mpo_fast.MPOLoss(backend="torch", single_pass=True, **kw), hidden, weight,
              targets, rh, rw, scale=0.5)
    (o, gh, gw, _), (o2, gh2, gw2, _) = out, ref_out
    assert rel_err(o.loss, o2.loss) <= 1e-6
    assert rel_err(o.chosen_logps, o2.chosen_logps) <= 1e-6
    assert rel_err(o.rejected_logps, o2.rejected_logps) <= 1e-6
    for name in o2.metrics:
        assert torch.allclose(o.metrics[name], o2.metrics[name], rtol=1e-5, atol=1e-6), name
    assert rel_err(gh, gh2) <= 1e-5 and rel_err(gw, gw2) <= 1e-5
    assert len(long_pairs) == (1 if workspace == "0.02" else 0)
    if kw.get("sft_normalize") != "sequence":
        types, weights = _types_weights(kw)
        loss64, gh64, gw64, _ = reference64(hidden, weight, targets, rh, rw, types, weights,
                                            scale=0.5)
        assert rel_err(o.loss, loss64) <= 1e-5
        assert rel_err(gh, gh64) <= 1e-5 and rel_err(gw, gw64) <= 1e-5


def test_single_pass_groups_are_whole_pairs_and_bounded():
    assert single_pass.plan_groups([3, 4, 9, 2, 2], 8) == [(0, 2), (2, 3), (3, 5)]
    assert single_pass.plan_groups([20], 8) == [(0, 1)]
    cap = torch_backend.group_tokens(1000, 64, torch.float32, False, budget=2**20)
    assert cap * 4 * (1000 + 2 * 64) + 2 * 4 * 1000 * 64 <= 2**20


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_single_pass_packed_with_bias_softcap_micro_batched(dtype, monkeypatch):
    monkeypatch.setenv("MPO_FAST_WORKSPACE_MB", "0.03")
    B, T, H, V = 3, 10, 16, 97
    hidden, weight, targets, rh, rw, lengths = make_batch(B, T, H, V, dtype,
                                                          lengths=[10, 6, 8, 5, 9, 7])
    bias = (0.5 * torch.randn(V)).to(dtype)
    head = {"softcap": 5.0, "temperature": 0.8}
    # packed: each sequence's first `length` positions, back to back
    ph, prh, pt, cu = packed(lengths, hidden, rh, targets)
    segs = mpo_fast.Segments.from_cu_seqlens(cu)
    kw = {**MPO_LAGGED, **head}
    outs = [run(mpo_fast.MPOLoss(backend="torch", single_pass=sp, **kw), ph, weight, pt, prh,
                rw, scale=0.25, bias=bias, cu_seqlens=segs) for sp in (True, False)]
    (o, gh, gw, gb), (o2, gh2, gw2, gb2) = outs
    tol = TOL[dtype]
    assert rel_err(o.loss, o2.loss) <= 1e-6
    assert rel_err(gh, gh2) <= tol and rel_err(gw, gw2) <= tol and rel_err(gb, gb2) <= tol
    # float64 on the padded layout (same tokens, the same pairs)
    loss64, gh64, gw64, gb64 = reference64(hidden, weight, targets, rh, rw,
                                           ("sigmoid", "bco_pair", "sft"), (0.8, 0.2, 1.0),
                                           scale=0.25, bias=bias, **head)
    gh64 = torch.cat([gh64[s, :n] for s, n in enumerate(lengths)])
    assert rel_err(o.loss, loss64) <= tol
    assert rel_err(gh, gh64) <= tol and rel_err(gw, gw64) <= tol and rel_err(gb, gb64) <= tol
    assert gh.dtype == dtype and gw.dtype == dtype and gb.dtype == dtype


def test_single_pass_frozen_head_and_dw_accumulators(monkeypatch):
    monkeypatch.setenv("MPO_FAST_WORKSPACE_MB", "0.02")
    hidden, weight, targets, rh, rw, _ = make_batch(dtype=torch.bfloat16,
                                                    lengths=[7, 9, 5, 8, 6, 9])
    _, gh64, gw64, _ = reference64(hidden, weight, targets, rh, rw,
                                        ("sigmoid", "bco_pair", "sft"), (0.8, 0.2, 1.0))
    errs = {}
    for acc in ("weight", "split", "fp32"):
        _, gh, gw, _ = run(mpo_fast.MPOLoss(backend="torch", single_pass=True, dw_accum=acc,
                                            **MPO_LAGGED), hidden, weight, targets, rh, rw)
        assert rel_err(gh, gh64) <= 1e-2 and rel_err(gw, gw64) <= 1e-2
        errs[acc] = rel_err(gw, gw64)
    # the split sum costs about one rounding, as the fp32 accumulator (bench/dw_accum.py)
    assert errs["split"] <= 1.05 * errs["fp32"] + 1e-5
    _, gh, gw, _ = run(mpo_fast.MPOLoss(backend="torch", single_pass=True, **MPO_LAGGED),
                       hidden, weight, targets, rh, rw, train_head=False)  # dH only
    assert gw is None and rel_err(gh, gh64) <= 1e-2


def test_lagged_delta_is_the_previous_steps_mean():
    """bco_delta="lagged": call k uses the mean of calls < k (0 first), then folds its own."""
    hidden, weight, targets, rh, rw, _ = make_batch()
    loss_fn = mpo_fast.MPOLoss(backend="torch", single_pass=True, **MPO_LAGGED)
    two_pass = mpo_fast.MPOLoss(backend="torch", **MPO_LAGGED)
    means = []
    for step in range(3):
        h = hidden + 0.2 * step
        o = loss_fn(h.requires_grad_(), weight, targets, ref_hidden=rh, ref_weight=rw)
        o2 = two_pass(h, weight, targets, ref_hidden=rh, ref_weight=rw)
        want = sum(means) / len(means) if means else 0.0
        assert abs(o.metrics["bco/delta"].item() - want) <= 1e-5
        assert abs(o2.metrics["bco/delta"].item() - want) <= 1e-5
        assert abs(o.loss.item() - o2.loss.item()) <= 1e-5 * abs(o2.loss.item())
        means.append(o.metrics["rewards/chosen"].item() / 2 +
                     o.metrics["rewards/rejected"].item() / 2)
    assert torch.allclose(loss_fn.bco_state, two_pass.bco_state)


def test_single_pass_auto_and_bad_inputs():
    hidden, weight, targets, rh, rw, _ = make_batch()
    with pytest.raises(ValueError, match=r"\['aot'\]"):
        mpo_fast.MPOLoss(loss_types=("aot", "sft"), single_pass=True)
    with pytest.raises(ValueError, match="aot_pair"):
        mpo_fast.MPOLoss(loss_types=("aot_pair",), single_pass=True)
    with pytest.raises(ValueError, match="bco_delta='running_mean'"):
        mpo_fast.MPOLoss(single_pass=True)  # the paper's coupled shift
    with pytest.raises(ValueError, match="single_pass must be"):
        mpo_fast.MPOLoss(single_pass="yes")
    with pytest.raises(ValueError, match="dw_accum"):
        mpo_fast.MPOLoss(dw_accum="bf16")
    assert mpo_fast.MPOLoss().dw_accum == "split"
    # "auto": one pass for pair-local losses on the torch backend, two for the coupled shift
    cfg = LossConfig(**MPO_LAGGED)
    assert single_pass.applies("auto", cfg, "torch", hidden.requires_grad_())
    assert not single_pass.applies("auto", LossConfig(), "torch", hidden)
    assert not single_pass.applies(True, cfg, "torch", hidden.detach())  # nothing to grad
    # gradients only through loss: a backward through chosen_logps says so
    loss_fn = mpo_fast.MPOLoss(backend="torch", single_pass=True, **MPO_LAGGED)
    o = loss_fn(hidden, weight, targets, ref_hidden=rh, ref_weight=rw)
    with pytest.raises(RuntimeError, match="for `loss` only"):
        (o.loss + o.chosen_logps.sum()).backward()


def test_group_loss_gradient_is_the_batch_gradient():
    """The per-group closed form (sum / B, SFT over the batch's tokens) sums to the loss."""
    B = 5
    c, r, c0, r0 = (torch.randn(B, dtype=torch.float64) - 3 for _ in range(4))
    Lc, Lr = torch.randint(1, 9, (B,)).double(), torch.randint(1, 9, (B,)).double()
    cfg = LossConfig(("sigmoid", "ipo", "bco_pair", "sft"), (0.8, 0.3, 0.2, 1.0),
                     bco_delta="lagged")
    delta = torch.tensor(0.07, dtype=torch.float64)
    total = sum(single_pass.group_loss(cfg, c[a:b], r[a:b], c0[a:b], r0[a:b], Lc[a:b],
                                       Lr[a:b], B, Lc.sum(), delta) for a, b in ((0, 2), (2, 5)))
    want = sum(w * pair_losses(t, c, r, c0, r0, Lc, Lr, 0.1, delta=0.07).mean()
               for t, w in zip(("sigmoid", "ipo", "bco_pair"), (0.8, 0.3, 0.2), strict=True))
    want = want - c.sum() / Lc.sum()
    assert abs(total.item() - want.item()) <= 1e-12


def test_single_pass_micro_batches_with_sft_tokens_sum_to_the_step():
    """Two micro-batches, each `f * loss` with the step's SFT denominator (sft_tokens): the
    summed single-pass gradients equal the two-pass ones and the float64 step gradient."""
    hidden, weight, targets, rh, rw, _ = make_batch(B=4, lengths=[9, 5, 7, 6, 8, 4, 10, 6])
    parts = [[0, 1, 4, 5], [2, 3, 6, 7]]  # pairs (0, 1) and (2, 3), chosen then rejected
    step_tokens = float((targets[:4] != -100).sum())
    kw = {"loss_types": ("sigmoid", "ipo", "sft"), "loss_weights": (0.8, 0.3, 1.0)}
    grads = {}
    for sp in (True, False):
        loss_fn = mpo_fast.MPOLoss(backend="torch", single_pass=sp, **kw)
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        for idx in parts:
            f = len(idx) / 8
            out = loss_fn(h[idx], w, targets[idx], ref_hidden=rh[idx], ref_weight=rw,
                          sft_tokens=f * step_tokens)
            (f * out.loss).backward()
        grads[sp] = (h.grad, w.grad)
    _, gh64, gw64, _ = reference64(hidden, weight, targets, rh, rw, *_types_weights(kw))
    assert rel_err(grads[True][0], grads[False][0]) <= 1e-5
    assert rel_err(grads[True][1], grads[False][1]) <= 1e-5
    assert rel_err(grads[True][0], gh64) <= 1e-5 and rel_err(grads[True][1], gw64) <= 1e-5


def test_half_operand_products_of_the_gpu_path(monkeypatch):
    """On CUDA the one-pass modes keep bf16 operands (fp32 results); the same rounding is
    simulated here on the CPU (`_mm32` upcasts after rounding dZ / P to bf16)."""
    monkeypatch.setattr(torch_backend, "tensor_core_products", lambda hidden: True)
    monkeypatch.setenv("MPO_FAST_WORKSPACE_MB", "0.02")
    hidden, weight, targets, rh, rw, _ = make_batch(dtype=torch.bfloat16)
    _, gh64, gw64, _ = reference64(hidden, weight, targets, rh, rw,
                                   ("sigmoid", "bco_pair", "sft"), (0.8, 0.2, 1.0))
    _, gh, gw, _ = run(mpo_fast.MPOLoss(backend="torch", single_pass=True, **MPO_LAGGED),
                       hidden, weight, targets, rh, rw)
    assert rel_err(gh, gh64) <= 1e-2 and rel_err(gw, gw64) <= 1e-2
    _, gh64, _, _ = reference64(hidden, weight, targets, rh, rw,
                                ("sigmoid", "bco_pair", "sft"), (0.8, 0.2, 1.0), delta="paper")
    _, gh, _, _ = run(mpo_fast.MPOLoss(backend="torch", frozen_head=True), hidden, weight,
                      targets, rh, rw, train_head=False)
    assert rel_err(gh, gh64) <= 1e-2


@pytest.mark.skipif(HAS_CUDA, reason="a CPU guard (~15 s); on a GPU, gpu_suite.sh runs it for real")
def test_gpu_modes_driver_dry_run(tmp_path):
    """bench/modes.py (gpu_suite.sh's "modes" part) at its CPU dry-run shapes, so the
    prepared GPU measurement cannot rot: every mode row has a time and float64 errors."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, "-m", "bench.modes", "--dry-run", "--no-liger",
                           "--repeats", "1", "--out", str(tmp_path)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "modes.json").read_text())
    rows = {r["impl"]: r for r in result["rows"]}
    assert set(rows) == {"two-pass (paper delta)", "single pass (lagged delta)",
                         "single pass, dW summed in bf16", "frozen head (paper delta)"}
    for impl, row in rows.items():
        assert "error" not in row, (impl, row.get("error"))
        assert row["ms"] > 0 and row["err_loss"] < 1e-5 and row["err_dh"] < 1e-2, impl
    assert result["first_step"] and "first_step_s" in result["first_step"][0]
    assert "| frozen head (paper delta) | 6 |" in (tmp_path / "modes.md").read_text()


# ------------------------------------------------------- the pair-terms kernel's variants


@pytest.mark.parametrize("sft_normalize", ["token", "sequence"])
@requires_triton
def test_pair_terms_kernel_one_variant_for_every_pair_count(sft_normalize, monkeypatch):
    """The fused pair terms loop over a fixed block of pairs: the same constexprs for every
    B (so one compiled kernel on the GPU), and exact across block boundaries."""
    from mpo_fast.epilogue import _fused_pair_terms, _torch_pair_terms
    from mpo_fast.kernels import loss_epilogue as k

    real = k._pair_terms_kernel
    launches = []

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **meta):
                launches.append(tuple(sorted(meta.items())))
                return real[grid](*args, **meta)
            return launch

    monkeypatch.setattr(k, "_pair_terms_kernel", Recorder())
    cfg = LossConfig(("sigmoid", "bco_pair", "ipo", "sft"), (0.8, 0.2, 0.1, 1.0),
                     bco_delta="lagged", sft_normalize=sft_normalize)
    for B in (1, 3, 16, 17, k.PAIR_BLOCK, k.PAIR_BLOCK + 1, 2 * k.PAIR_BLOCK + 37):
        seq = -5 * torch.rand(2 * B, device=DEVICE) - 1
        ref = seq + 0.3 * torch.randn(2 * B, device=DEVICE)
        count = torch.randint(0, 9, (2 * B,), device=DEVICE).float()
        state = mpo_fast.losses.new_bco_state(DEVICE)
        t_state = mpo_fast.losses.new_bco_state(DEVICE)
        loss, vec, coef = _fused_pair_terms(seq, ref, count, cfg, state)
        t_loss, t_vec, t_coef = _torch_pair_terms(seq, ref, count, cfg, t_state)
        assert abs(loss.item() - t_loss.item()) <= 1e-5 * max(1.0, abs(t_loss.item())), B
        assert torch.allclose(vec, t_vec.float(), rtol=1e-5, atol=1e-6), B
        assert rel_err(coef, t_coef) <= 1e-5, B
    assert len(set(launches)) == 1, set(launches)  # B is a runtime argument only


def test_epilogue_kernels_do_not_specialize_on_counts():
    """On the GPU the JIT would specialize integer arguments (== 1, divisible by 16); the
    pair count B and token count N opt out, so no batch shape compiles a new variant."""
    import os
    import subprocess
    import sys

    code = ("from mpo_fast.kernels import loss_epilogue as k\n"
            "for f, n in ((k._pair_terms_kernel, 'B'), (k._segment_sums_kernel, 'N'),"
            " (k._broadcast_kernel, 'N')):\n"
            "    assert [p.do_not_specialize for p in f.params if p.name == n] == [True], n\n")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-1500:]


def test_split_add_keeps_about_sixteen_bits():
    """hi + lo (both bf16) sum 200 fp32 addends to ~3e-5 (a bf16 sum: ~2e-3 and drifting)."""
    xs = torch.randn(200, 64, 32, dtype=torch.float64)
    hi = torch.zeros(64, 32, dtype=torch.bfloat16)
    lo, plain = torch.zeros_like(hi), torch.zeros_like(hi)
    for x in xs:
        torch_backend.split_add(hi, lo, x.float())
        plain += x.to(torch.bfloat16)
    exact = xs.sum(0)
    assert rel_err(hi.double() + lo.double(), exact) <= 1e-4
    assert rel_err(hi, exact) <= 4e-3 < rel_err(plain, exact)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("dw_accum", ["split", "weight"])
@requires_triton
def test_single_pass_triton_kernels_match_float64(dtype, dw_accum, monkeypatch):
    """kernels/single_pass.py (cuBLAS products + the Triton row kernels; the interpreter on
    the CPU): several groups and a pair alone in two passes, packed, bias, softcap,
    temperature; against the torch twin and float64."""
    monkeypatch.setenv("MPO_FAST_WORKSPACE_MB", "0.0197")  # groups of 15-20 tokens
    from mpo_fast.kernels import single_pass as kernels

    B, T, H, V = 3, 14, 16, 97
    lengths = [14, 5, 6, 12, 5, 7]  # pairs of 22, 6 and 9 scored tokens
    hidden, weight, targets, rh, rw, _ = make_batch(B, T, H, V, dtype, lengths=lengths)
    bias = (0.5 * torch.randn(V)).to(dtype)
    head = {"softcap": 5.0, "temperature": 0.8}
    ph, prh, pt, cu = packed(lengths, hidden, rh, targets)
    calls = []
    real = kernels.single_pass_group
    monkeypatch.setattr(kernels, "single_pass_group", lambda *a: calls.append(1) or real(*a))
    long_pairs = []
    two_pass_pair = single_pass.SinglePassJob._two_pass_pair
    monkeypatch.setattr(single_pass.SinglePassJob, "_two_pass_pair",
                        lambda self, *a: long_pairs.append(1) or two_pass_pair(self, *a))
    assert 15 <= kernels.group_tokens(V, H, dtype, True) <= 21
    kw = {**MPO_LAGGED, **head, "dw_accum": dw_accum}
    dev = [t.to(DEVICE) for t in (ph, weight, pt, prh, rw, bias, cu)]
    o, gh, gw, gb = run(mpo_fast.MPOLoss(backend="triton", single_pass=True, **kw), *dev[:5],
                        scale=0.25, bias=dev[5], cu_seqlens=dev[6])
    assert len(calls) == 1 and len(long_pairs) == 1  # pairs 1-2 in one pass, pair 0 alone
    loss64, gh64, gw64, gb64 = reference64(hidden, weight, targets, rh, rw,
                                           ("sigmoid", "bco_pair", "sft"), (0.8, 0.2, 1.0),
                                           scale=0.25, bias=bias, **head)
    gh64 = torch.cat([gh64[s, :n] for s, n in enumerate(lengths)])
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_err(o.loss, loss64) <= max(tol, 1e-5)
    assert rel_err(gh, gh64) <= tol and rel_err(gw, gw64) <= tol and rel_err(gb, gb64) <= tol


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=requires_triton)])
def test_single_pass_with_an_empty_pair(backend, monkeypatch):
    """A pair whose answers have no completion token (log-prob 0, still in the batch means)
    forms an empty group (pair 0; pair 1, 18 tokens, goes alone in two passes): skipped,
    and everything matches the two-pass path."""
    monkeypatch.setenv("MPO_FAST_WORKSPACE_MB", "0.02")
    batch = make_batch(lengths=[2, 11, 6, 2, 11, 7])[:5]
    if backend == "triton":
        batch = [t.to(DEVICE) for t in batch]
    outs = [run(mpo_fast.MPOLoss(backend=backend, single_pass=sp, **MPO_LAGGED), *batch)
            for sp in (True, False)]
    (o, gh, gw, _), (o2, gh2, gw2, _) = outs
    assert rel_err(o.loss, o2.loss) <= 1e-6 and o.chosen_logps[0] == 0
    assert rel_err(gh, gh2) <= 1e-5 and rel_err(gw, gw2) <= 1e-5


def test_warmup_calls_bind_every_kernel_argument(monkeypatch):
    """`mpo_fast.warmup` compiles on CUDA only; here its calls are checked against each
    kernel's signature (every argument exactly once), pretending to be an sm_90 device."""
    import contextlib
    import inspect

    from mpo_fast.kernels import (
        configs,
        frozen_head,
        logprob_backward,
        logprob_forward,
        loss_epilogue,
    )
    from mpo_fast.kernels import single_pass as sp_kernels
    from mpo_fast.kernels import warmup as w

    monkeypatch.setattr(w, "interpreting", lambda: False)
    monkeypatch.setattr(configs, "interpreting", lambda: False)
    monkeypatch.setattr(configs, "_capability", lambda device: (9, 0))
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    bound = []
    kernels = [logprob_forward._logprob_fwd_kernel, logprob_backward._logit_grad_kernel,
               frozen_head._slab_softmax_kernel, sp_kernels._row_stats_kernel,
               sp_kernels._row_grad_kernel, loss_epilogue._segment_sums_kernel,
               loss_epilogue._broadcast_kernel, loss_epilogue._pair_terms_kernel]
    for kernel in kernels:
        def check(*args, _k=kernel, grid=None, num_warps=None, num_stages=None, **meta):
            inspect.signature(_k.fn).bind(*args, **meta)  # TypeError if one is off
            bound.append(_k.fn.__name__)
        monkeypatch.setattr(kernel, "warmup", check, raising=False)
    n = w.warmup(151646, 4096, torch.bfloat16, "cuda", bias=True, softcap=True, frozen=True,
                 single_pass=True)
    n += w.warmup_epilogue(0b1000000010001, False, "cuda")
    assert n == len(bound) and {k.fn.__name__ for k in kernels} == set(bound)
