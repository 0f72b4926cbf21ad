"""MPOLoss against a float64 reference written from docs/DESIGN.md §3.3, on both layouts."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from conftest import HAS_TRITON
from reference import leaf64, logprobs, mpo_loss, rel_err

import mpo_fast
from mpo_fast import MPOLoss, preference_loss
from mpo_fast.losses import LOSS_TYPES

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
requires_interpreter = pytest.mark.skipif(not (HAS_TRITON and INTERPRETING),
                                          reason="Triton epilogue checked under the interpreter")
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
SMOOTHING = {"exo_pair": 0.2, "robust": 0.15, "sigmoid": 0.1, "aot": 0.05}


def batch(B=3, T=8, H=16, V=60, dtype=torch.float32, scale=1.0):
    """Padded [2B, T] batch: random prompt prefixes and right padding are ignore_index."""
    hidden = torch.randn(2 * B, T, H).to(dtype)
    weight = (torch.randn(V, H) * scale / H**0.5).to(dtype)
    bias = (torch.randn(V) * 0.1).to(dtype)
    ref_hidden = (hidden.float() + 0.3 * torch.randn(2 * B, T, H)).to(dtype)
    targets = torch.randint(0, V, (2 * B, T))
    for row in range(2 * B):
        prompt = int(torch.randint(0, T // 2, ()))
        end = int(torch.randint(prompt + 1, T + 1, ()))
        targets[row, :prompt] = -100
        targets[row, end:] = -100
    return hidden, weight, bias, ref_hidden, targets


def reference(hidden, weight, bias, ref_hidden, targets, types, weights, beta, e, delta=0.0):
    h, w, b = leaf64(hidden), leaf64(weight), leaf64(bias)
    tok = logprobs(h, w, targets, b)
    ref_tok = logprobs(ref_hidden.double(), w.detach(), targets, b.detach())
    loss = mpo_loss(tok, ref_tok, targets, types, weights, beta, e, delta)
    loss.backward()
    return loss, h.grad, w.grad, b.grad


def first_call_delta(hidden, weight, bias, ref_hidden, targets, beta):
    """The running mean after one call from a fresh state is this batch's mean reward."""
    hidden, weight, bias = (t.detach().double() for t in (hidden, weight, bias))
    tok = logprobs(hidden, weight, targets, bias)
    ref = logprobs(ref_hidden.double(), weight, targets, bias)
    return (beta * (tok.sum(-1) - ref.sum(-1))).mean().item()


def check_against_reference(backend, types, weights, dtype, beta=0.1, e=0.0, scale=1.0,
                            tol=None):
    hidden, weight, bias, ref_hidden, targets = batch(dtype=dtype, scale=scale)
    for t in (hidden, weight, bias):
        t.requires_grad_()
    fn = MPOLoss(beta=beta, loss_types=types, loss_weights=weights, label_smoothing=e,
                 backend=backend)
    out = fn(hidden, weight, targets, bias=bias, ref_hidden=ref_hidden, ref_weight=weight.detach(),
             ref_bias=bias.detach())
    out.loss.backward()
    delta = first_call_delta(hidden, weight, bias, ref_hidden, targets, beta) \
        if "bco_pair" in types else 0.0
    loss, gh, gw, gb = reference(hidden, weight, bias, ref_hidden, targets, types, weights,
                                 beta, e, delta)
    tol = tol or TOL[dtype]
    # losses can cancel to ~0 (robust, exo_pair): the loss is compared on a scale of at least 1
    loss_err = abs(out.loss.item() - loss.item()) / max(abs(loss.item()), 1.0)
    errors = {"loss": loss_err, "hidden": rel_err(hidden.grad, gh),
              "weight": rel_err(weight.grad, gw), "bias": rel_err(bias.grad, gb)}
    assert all(v <= tol for v in errors.values()), errors
    return out, errors


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_each_loss_type_torch(loss_type, dtype):
    # discopop's modulation s(u / 0.05) amplifies the fp32 rounding of the sequence sums
    # ~20x in its gradient: 1e-4 is the honest fp32 bound there
    tol = 1e-4 if loss_type == "discopop" and dtype == torch.float32 else None
    check_against_reference("torch", (loss_type,), (1.0,), dtype, beta=0.5,
                            e=SMOOTHING.get(loss_type, 0.0), scale=3.0, tol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_mpo_default_torch(dtype):
    out, _ = check_against_reference("torch", ("sigmoid", "bco_pair", "sft"), (0.8, 0.2, 1.0),
                                     dtype)
    expected = {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected", "nll_loss", "bco/delta", "loss/sigmoid",
                "loss/bco_pair", "loss/sft"}
    assert set(out.metrics) == expected
    assert all(torch.isfinite(v) for v in out.metrics.values())


@requires_interpreter
@pytest.mark.parametrize(
    ("types", "weights"),
    [(("sigmoid", "bco_pair", "sft"), (0.8, 0.2, 1.0)), (("ipo", "orpo", "hinge"), (1, 0.5, 2)),
     (("aot", "sft"), (1.0, 0.3))],
    ids=["mpo", "ipo-orpo-hinge", "aot-torch-pair-terms"],
)
def test_triton_end_to_end(types, weights):
    check_against_reference("triton", types, weights, torch.float32, beta=0.3, e=0.05, scale=2.0)


@requires_interpreter
def test_triton_end_to_end_bf16():
    check_against_reference("triton", ("sigmoid", "bco_pair", "sft"), (0.8, 0.2, 1.0),
                            torch.bfloat16)


def pack(hidden, targets):
    """Drop each row's right padding: packed [N, H], [N], cu_seqlens (the test's own packer)."""
    lengths = [int((row != -100).nonzero().max()) + 1 if (row != -100).any() else 0
               for row in targets]
    h = torch.cat([hidden[i, :n] for i, n in enumerate(lengths)])
    t = torch.cat([targets[i, :n] for i, n in enumerate(lengths)])
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return h, t, cu


@pytest.mark.parametrize("offsets", ["tensor", "segments"])
@pytest.mark.parametrize("backend", ["torch"] + (["triton"] if INTERPRETING and HAS_TRITON
                                                 else []))
def test_padded_and_packed_layouts_agree(backend, offsets):
    hidden, weight, _, ref_hidden, targets = batch(B=2, T=10)
    targets[1, 3:] = -100
    targets[1, :3] = torch.randint(0, 60, (3,))  # a short row: packing really drops padding
    results = []
    for layout in ("padded", "packed"):
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_()
        fn = MPOLoss(backend=backend)
        if layout == "padded":
            out = fn(h, w, targets, ref_hidden=ref_hidden, ref_weight=weight)
        else:
            ph, pt, cu = pack(h, targets)
            pr, _, _ = pack(ref_hidden, targets)
            assert ph.shape[0] < h.shape[0] * h.shape[1]
            if offsets == "segments":  # what packing.pack hands over: used with no host read
                cu = mpo_fast.Segments(cu, ph.shape[0], int(cu.diff().max()))
            out = fn(ph, w, pt, cu_seqlens=cu, ref_hidden=pr, ref_weight=weight)
        out.loss.backward()
        results.append((out.loss, h.grad, w.grad, out.chosen_logps, out.metrics))
    (l1, gh1, gw1, c1, m1), (l2, gh2, gw2, c2, m2) = results
    assert rel_err(l2, l1) <= 1e-6 and rel_err(c2, c1) <= 1e-6
    assert rel_err(gh2, gh1) <= 1e-6 and rel_err(gw2, gw1) <= 1e-6
    assert all(abs(m1[k] - m2[k]) <= 1e-5 * (1 + abs(m1[k])) for k in m1)


def test_precomputed_reference_equals_reference_hidden():
    hidden, weight, bias, ref_hidden, targets = batch()
    a = MPOLoss()(hidden, weight, targets, bias=bias, ref_hidden=ref_hidden, ref_weight=weight,
                  ref_bias=bias)
    with torch.no_grad():
        ref = mpo_fast.fused_logprobs(ref_hidden, weight, targets, bias=bias).sum(-1)
    B = ref.shape[0] // 2
    b = MPOLoss()(hidden, weight, targets, bias=bias, ref_logps=(ref[:B], ref[B:]))
    assert rel_err(b.loss, a.loss) <= 1e-6


def test_separate_reference_head():
    hidden, weight, _, ref_hidden, targets = batch()
    ref_weight = weight + 0.1 * torch.randn_like(weight)
    out = MPOLoss(loss_types=("sigmoid",))(hidden, weight, targets, ref_hidden=ref_hidden,
                                           ref_weight=ref_weight)
    tok = logprobs(hidden.double(), weight.double(), targets)
    ref = logprobs(ref_hidden.double(), ref_weight.double(), targets)
    expected = mpo_loss(tok, ref, targets, ("sigmoid",), (1.0,), 0.1)
    assert rel_err(out.loss, expected) <= 1e-5


def test_sequence_logps_are_differentiable():
    hidden, weight, _, ref_hidden, targets = batch()
    hidden.requires_grad_()
    out = MPOLoss()(hidden, weight, targets, ref_hidden=ref_hidden, ref_weight=weight)
    (out.loss + out.chosen_logps.sum() - 2 * out.rejected_logps.sum()).backward()
    h = leaf64(hidden)
    tok = logprobs(h, weight.double(), targets)
    ref = logprobs(ref_hidden.double(), weight.double(), targets)
    B = tok.shape[0] // 2
    delta = (0.1 * (tok.sum(-1) - ref.sum(-1))).mean().detach()
    total = mpo_loss(tok, ref, targets, ("sigmoid", "bco_pair", "sft"), (0.8, 0.2, 1.0), 0.1,
                     delta=delta) + tok[:B].sum() - 2 * tok[B:].sum()
    total.backward()
    assert rel_err(hidden.grad, h.grad) <= 1e-5


@pytest.mark.parametrize("types", [("sigmoid", "bco_pair", "sft"), ("ipo", "orpo", "aot_pair")])
def test_gradcheck_fp64(types):
    hidden, weight, bias, ref_hidden, targets = batch(B=2, T=5, H=4, V=12)
    hidden, weight, bias = (t.double().requires_grad_() for t in (hidden, weight, bias))
    ref_hidden = ref_hidden.double()
    ref_weight, ref_bias = weight.detach().clone(), bias.detach().clone()

    def f(h, w, b):
        fn = MPOLoss(loss_types=types, beta=0.7, bco_delta="none", backend="torch")
        return fn(h, w, targets, bias=b, ref_hidden=ref_hidden, ref_weight=ref_weight,
                  ref_bias=ref_bias).loss

    assert torch.autograd.gradcheck(f, (hidden, weight, bias))


# ---------------------------------------------------------------------------------------------
# the BCO reward shift


def rewards_mean(out, beta=0.1):
    return 0.5 * (out.metrics["rewards/chosen"] + out.metrics["rewards/rejected"]).item()


@pytest.mark.parametrize("backend", ["torch"] + (["triton"] if INTERPRETING and HAS_TRITON
                                                 else []))
def test_running_delta_is_the_cumulative_mean(backend):
    fn = MPOLoss(backend=backend)
    seen = []
    for _ in range(4):
        hidden, weight, bias, ref_hidden, targets = batch(B=2, T=6)
        out = fn(hidden, weight, targets, bias=bias, ref_hidden=ref_hidden, ref_weight=weight,
                 ref_bias=bias)
        seen.append(rewards_mean(out))
        expected = sum(seen) / len(seen)
        assert out.metrics["bco/delta"].item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert fn.bco_state[1].item() == pytest.approx(4.0)


def test_eval_mode_scores_with_the_running_mean_but_leaves_it():
    fn = MPOLoss()
    for _ in range(2):
        hidden, weight, _, ref_hidden, targets = batch()
        fn(hidden, weight, targets, ref_hidden=ref_hidden, ref_weight=weight)
    before = fn.bco_state.clone()
    hidden, weight, _, ref_hidden, targets = batch()
    fn.eval()
    evaluated = fn(hidden, weight, targets, ref_hidden=ref_hidden, ref_weight=weight)
    assert torch.equal(fn.bco_state, before)  # evaluation never moves the training state
    fn.train()
    trained = fn(hidden, weight, targets, ref_hidden=ref_hidden, ref_weight=weight)
    assert not torch.equal(fn.bco_state, before)
    # the same batch in either mode sees the same shift: this batch folded into the mean
    assert evaluated.metrics["bco/delta"].item() == trained.metrics["bco/delta"].item()
    assert evaluated.loss.item() == trained.loss.item()


def test_delta_none_is_zero():
    hidden, weight, _, ref_hidden, targets = batch()
    out = MPOLoss(bco_delta="none")(hidden, weight, targets, ref_hidden=ref_hidden,
                                    ref_weight=weight)
    assert out.metrics["bco/delta"].item() == 0.0


def test_delta_survives_state_dict():
    fn = MPOLoss()
    for _ in range(3):
        hidden, weight, _, ref_hidden, targets = batch()
        fn(hidden, weight, targets, ref_hidden=ref_hidden, ref_weight=weight)
    restored = MPOLoss()
    restored.load_state_dict(fn.state_dict())
    assert torch.equal(restored.bco_state, fn.bco_state)
    hidden, weight, _, ref_hidden, targets = batch()
    a = fn(hidden, weight, targets, ref_hidden=ref_hidden, ref_weight=weight)
    b = restored(hidden, weight, targets, ref_hidden=ref_hidden, ref_weight=weight)
    assert a.metrics["bco/delta"].item() == b.metrics["bco/delta"].item()
    assert a.loss.item() == b.loss.item()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_worker(rank, world, port, batches, results):
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                                         rank=rank, world_size=world)
    try:
        fn = MPOLoss()
        deltas = []
        for hidden, weight, ref_hidden, targets in batches:
            B = hidden.shape[0] // 2
            mine = torch.tensor([rank, B + rank])  # this rank's pair: (rank, B + rank)
            out = fn(hidden[mine], weight, targets[mine], ref_hidden=ref_hidden[mine],
                     ref_weight=weight)
            deltas.append(out.metrics["bco/delta"].item())
        results[rank] = deltas
    finally:
        torch.distributed.destroy_process_group()


def test_delta_all_reduced_across_two_processes():
    batches = []
    for _ in range(3):
        hidden, weight, _, ref_hidden, targets = batch(B=2, T=6)
        batches.append((hidden, weight, ref_hidden, targets))
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_rank_worker, args=(2, _free_port(), batches, results), nprocs=2, join=True)
    single = MPOLoss()
    expected = [single(h, w, t, ref_hidden=r, ref_weight=w).metrics["bco/delta"].item()
                for h, w, r, t in batches]
    assert results[0] == results[1]
    assert results[0] == pytest.approx(expected, rel=1e-5, abs=1e-7)


# ---------------------------------------------------------------------------------------------
# edges and bad inputs


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_pair_with_no_completion_tokens_is_finite(loss_type):
    hidden, weight, _, ref_hidden, targets = batch()
    targets[1] = -100  # chosen of pair 1: nothing to score
    targets[4] = -100  # rejected of pair 1 too
    hidden.requires_grad_()
    fn = MPOLoss(loss_types=(loss_type,), label_smoothing=SMOOTHING.get(loss_type, 0.0))
    out = fn(hidden, weight, targets, ref_hidden=ref_hidden, ref_weight=weight)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(hidden.grad).all()
    assert (hidden.grad[1] == 0).all()
    # the documented behaviour: an empty completion has log-prob 0 and its pair still counts
    assert out.chosen_logps[1] == 0 and out.rejected_logps[1] == 0


def test_a_models_packed_row_of_one():
    """A model run on one packed row returns [1, N, H]: taken as is, same as [N, H]."""
    hidden, weight, _, ref_hidden, targets = batch(B=2, T=7)
    ph, pt, cu = pack(hidden, targets)
    pr, _, _ = pack(ref_hidden, targets)
    results = []
    for row in (False, True):
        h = ph.clone().requires_grad_()
        args = (h[None], weight, pt[None]) if row else (h, weight, pt)
        ref = pr[None] if row else pr
        out = MPOLoss()(*args, cu_seqlens=cu, ref_hidden=ref, ref_weight=weight)
        out.loss.backward()
        results.append((out.loss, out.chosen_logps, h.grad))
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"needs hidden \[N, H\] \(or \[1, N, H\]\)"):
        MPOLoss()(ph[None].expand(2, -1, -1), weight, pt, cu_seqlens=cu, ref_hidden=pr,
                  ref_weight=weight)


def test_preference_loss_and_mpo_loss_agree_by_default():
    """The same sequence log-probs give the same loss and the same BCO shift, call after call,
    from MPOLoss and from preference_loss with a kept state (both default to the running
    mean)."""
    fn = MPOLoss()
    state = mpo_fast.losses.new_bco_state()
    for _ in range(3):
        hidden, weight, _, _, targets = batch()
        B = hidden.shape[0] // 2
        ref = (-torch.rand(B) * 20, -torch.rand(B) * 20)
        out = fn(hidden, weight, targets, ref_logps=ref)
        counts = (targets != -100).sum(-1)
        loss, metrics = preference_loss(out.chosen_logps.detach(), out.rejected_logps.detach(),
                                        *ref, chosen_lengths=counts[:B],
                                        rejected_lengths=counts[B:], bco_state=state)
        assert rel_err(out.loss, loss) <= 1e-6
        assert metrics["bco/delta"] == pytest.approx(out.metrics["bco/delta"].item(), rel=1e-6)
    assert torch.allclose(state, fn.bco_state)


def test_orpo_with_average_log_prob_zero_is_finite():
    c = torch.tensor([0.0, -3.0], requires_grad=True)
    r = torch.tensor([-2.0, 0.0], requires_grad=True)
    lengths = torch.tensor([4.0, 3.0])
    loss, _ = preference_loss(c, r, loss_types=("orpo", "sft"), loss_weights=(1.0, 1.0),
                              chosen_lengths=lengths, rejected_lengths=lengths)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(c.grad).all() and torch.isfinite(r.grad).all()


def test_orpo_when_the_model_is_certain():
    """Huge logit margins make every chosen token's log-prob exactly 0.0 in fp32."""
    hidden, weight, _, _, targets = batch(B=2, T=4, V=8)
    weight = torch.eye(8, 16) * 1e4
    hidden = torch.zeros(4, 4, 16)
    hidden[..., :8] = torch.nn.functional.one_hot(targets.clamp(min=0), 8).float()
    hidden.requires_grad_()
    out = MPOLoss(loss_types=("orpo", "sft"), loss_weights=(1.0, 1.0))(hidden, weight, targets)
    out.loss.backward()
    assert out.chosen_logps.eq(0).all()
    assert torch.isfinite(out.loss) and torch.isfinite(hidden.grad).all()


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [({"loss_types": ("dpo",)}, "unknown loss_types"),
     ({"loss_types": ("sigmoid", "sft"), "loss_weights": (1.0,)}, "loss_weights has 1"),
     ({"loss_types": ("sigmoid", "sigmoid")}, "duplicates"),
     ({"loss_types": ("exo_pair",)}, "exo_pair needs label_smoothing > 0"),
     ({"loss_types": ("robust",), "label_smoothing": 0.5}, "robust needs label_smoothing < 0.5"),
     ({"label_smoothing": 1.0}, r"label_smoothing must be in \[0, 1\)"),
     ({"beta": 0.0}, "beta must be > 0"),
     ({"bco_delta": "ema"}, "bco_delta"),
     ({"loss_types": ()}, "at least one")],
)
def test_bad_config(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        MPOLoss(**kwargs)


def test_bad_layouts_and_references():
    hidden, weight, _, ref_hidden, targets = batch(B=2, T=5)
    fn = MPOLoss()
    with pytest.raises(ValueError, match="need 2B sequences"):
        fn(hidden[:3], weight, targets[:3], ref_hidden=ref_hidden[:3], ref_weight=weight)
    with pytest.raises(ValueError, match="ref_weight has V=59 rows but weight has V=60"):
        fn(hidden, weight, targets, ref_hidden=ref_hidden, ref_weight=weight[:59])
    with pytest.raises(ValueError, match="segments cover 21 tokens but targets has 20"):
        fn(hidden.reshape(-1, 16), weight, targets.reshape(-1),
           cu_seqlens=mpo_fast.Segments.padded(3, 7))
    ph, pt = hidden.reshape(-1, 16), targets.reshape(-1)
    N = pt.shape[0]
    with pytest.raises(ValueError, match="need 2B sequences"):
        fn(ph, weight, pt, cu_seqlens=torch.tensor([0, 5, 10, N], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"cu_seqlens\[-1\] = 19 but targets has 20 tokens"):
        fn(ph, weight, pt, cu_seqlens=torch.tensor([0, 5, 10, 15, 19], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"non-decreasing .* cu_seqlens\[1\] = 12 > "):
        fn(ph, weight, pt, cu_seqlens=torch.tensor([0, 12, 10, 15, 20], dtype=torch.int32))
    with pytest.raises(TypeError, match="cu_seqlens must be int32"):
        fn(ph, weight, pt, cu_seqlens=torch.tensor([0.0, 5, 10, 15, 20]))
    with pytest.raises(TypeError, match="cu_seqlens must be int32"):
        fn(ph, weight, pt, cu_seqlens=torch.tensor([0, 5, 10, 15, 20]))  # int64
    with pytest.raises(ValueError, match="packed layout"):
        fn(hidden, weight, targets, cu_seqlens=torch.tensor([0, 5, 10, 15, 20]))
    with pytest.raises(ValueError, match="padded layout needs"):
        fn(ph, weight, pt, ref_hidden=ref_hidden)
    with pytest.raises(ValueError, match="need a reference"):
        fn(hidden, weight, targets)
    with pytest.raises(ValueError, match="either ref_logps or ref_hidden"):
        fn(hidden, weight, targets, ref_hidden=ref_hidden, ref_logps=(torch.zeros(2),) * 2)
    with pytest.raises(ValueError, match="ref_logps must be"):
        fn(hidden, weight, targets, ref_logps=(torch.zeros(3), torch.zeros(3)))
    with pytest.raises(ValueError, match="ref_hidden shape"):
        fn(hidden, weight, targets, ref_hidden=ref_hidden[:, :4], ref_weight=weight)
    with pytest.raises(ValueError, match="ref_hidden needs ref_weight"):
        fn(hidden, weight, targets, ref_hidden=ref_hidden)
    with pytest.raises(ValueError, match="targets must be in"):
        fn(hidden, weight, targets.clamp(min=0) + 100, ref_hidden=ref_hidden, ref_weight=weight)


def test_preference_loss_bad_inputs():
    c = torch.randn(3)
    with pytest.raises(ValueError, match="need ref_chosen_logps"):
        preference_loss(c, c, loss_types=("sigmoid",), loss_weights=(1.0,))
    with pytest.raises(ValueError, match="must both be"):
        preference_loss(c, c[:2], c, c)
    with pytest.raises(ValueError, match="ipo needs chosen_lengths"):
        preference_loss(c, c, c, c, loss_types=("ipo",), loss_weights=(1.0,))


# --------------------------------------------------------------------------- loss state


def test_loss_state_round_trips_as_safetensors_and_old_pt_files_load(tmp_path):
    """One format beside every checkpoint: loss.safetensors (tensors only); an older drop-in
    checkpoint's mpo_loss.pt still loads (read with weights_only=True), and the trainer's
    ``loss_fn.``-prefixed keys too."""
    from safetensors.torch import load_file, save_file

    from mpo_fast.mpo import LOSS_STATE_FILE, load_loss_state, save_loss_state

    fn = MPOLoss()
    fn.bco_state.copy_(torch.rand(2, dtype=torch.float64))
    path = save_loss_state(fn, str(tmp_path))
    assert path.endswith(LOSS_STATE_FILE) and torch.equal(load_file(path)["bco_state"],
                                                           fn.bco_state)
    back = MPOLoss()
    assert load_loss_state(back, str(tmp_path)) and torch.equal(back.bco_state, fn.bco_state)

    old = tmp_path / "old"
    old.mkdir()
    torch.save(fn.state_dict(), old / "mpo_loss.pt")
    back = MPOLoss()
    assert load_loss_state(back, str(old)) and torch.equal(back.bco_state, fn.bco_state)

    trainer = tmp_path / "trainer"
    trainer.mkdir()
    save_file({"loss_fn.bco_state": fn.bco_state}, str(trainer / LOSS_STATE_FILE))
    back = MPOLoss()
    assert load_loss_state(back, str(trainer)) and torch.equal(back.bco_state, fn.bco_state)
    assert not load_loss_state(MPOLoss(), str(tmp_path / "nothing-here"))
