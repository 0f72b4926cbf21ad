"""`sft_normalize="sequence"`: the paper's generation loss (MPO, arXiv:2411.10442, Eq. 5),

    L_g = mean over pairs i of ( -log pi(y_c_i | x_i) / |y_c_i| ),

against a float64 reference written here from that formula (full log_softmax, no library
code): padded and packed layouts, micro-batches summed with the step's pair count (the
trainer's `objective`), 2-process DDP, the Triton epilogue (interpreter or CUDA), gradients,
and bad values. The token mean ("token", TRL's) is checked beside it where the two share a
path, so the tests also show the two normalizations really differ on these batches.
"""

from __future__ import annotations

import os
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
from conftest import HAS_CUDA, HAS_TRITON
from reference import leaf64, logprobs, pair_losses, rel_err

import mpo_fast
from mpo_fast import MPOLoss, preference_loss
from mpo_fast.epilogue import _fused_pair_terms, _torch_pair_terms
from mpo_fast.losses import LossConfig
from mpo_fast.train.config import TrainConfig
from mpo_fast.train.loop import objective, sft_tokens

IGNORE = -100
BETA = 0.1
MPO_TYPES, MPO_WEIGHTS = ("sigmoid", "bco_pair", "sft"), (0.8, 0.2, 1.0)
TRITON_OK = HAS_TRITON and (HAS_CUDA or os.environ.get("TRITON_INTERPRET") == "1")
requires_triton = pytest.mark.skipif(not TRITON_OK,
                                     reason="needs triton with CUDA or the interpreter")
F64_TOL = 1e-12  # float64 inputs through the torch path: only rounding differs
F32_TOL = 1e-5


# --------------------------------------------------------------------------- the reference


def eq5(c, Lc):
    """Eq. 5: the mean over pairs of each chosen answer's summed log-prob over its length
    (an answer with no completion token adds 0: its log-prob is 0)."""
    return (-c / Lc.clamp(min=1)).mean()


def token_mean(c, Lc):
    """TRL's SFT term: one token mean over all chosen completion tokens."""
    return -c.sum() / Lc.sum().clamp(min=1)


def reference_loss(hidden, weight, ref_hidden, targets, types, weights, mode, delta=0.0):
    """The combined loss in float64 from full log_softmax of padded [2B, T] rows."""
    tok = logprobs(hidden, weight, targets)
    ref_tok = logprobs(ref_hidden.double(), weight.detach().double(), targets)
    seq, ref = tok.sum(-1), ref_tok.sum(-1)
    count = (targets != IGNORE).sum(-1).double()
    B = seq.shape[0] // 2
    c, r, c0, r0, Lc, Lr = seq[:B], seq[B:], ref[:B], ref[B:], count[:B], count[B:]
    total = torch.zeros((), dtype=torch.float64)
    for t, w in zip(types, weights, strict=True):
        if t == "sft":
            term = eq5(c, Lc) if mode == "sequence" else token_mean(c, Lc)
        else:
            term = pair_losses(t, c, r, c0, r0, Lc, Lr, BETA, delta=delta).mean()
        total = total + w * term
    return total


def batch(B=4, T=12, H=8, V=40, dtype=torch.float64):
    """Padded [2B, T] rows whose completions range from 0 tokens to nearly T (short direct
    answers beside long ones, as in the paper's mix), prompts and right padding ignored."""
    hidden = torch.randn(2 * B, T, H, dtype=dtype)
    weight = (torch.randn(V, H, dtype=dtype) * 2 / H**0.5)
    ref_hidden = hidden + 0.3 * torch.randn_like(hidden)
    targets = torch.randint(0, V, (2 * B, T))
    for row in range(2 * B):
        prompt = int(torch.randint(0, 3, ()))
        length = int(torch.randint(1, T - prompt + 1, ()))
        targets[row, :prompt] = IGNORE
        targets[row, prompt + length:] = IGNORE
    targets[0, 3:] = IGNORE  # a short chosen answer ...
    targets[0, :2] = IGNORE
    targets[1, :1] = IGNORE  # ... beside a long one
    targets[B - 1] = IGNORE  # a chosen answer with no completion token: adds 0, still counts
    return hidden, weight, ref_hidden, targets


def pack(x, targets):
    """Drop each row's right padding: [N, ...], [N], int32 cu_seqlens (this test's packer)."""
    lengths = [int((row != IGNORE).nonzero().max()) + 1 if (row != IGNORE).any() else 0
               for row in targets]
    px = torch.cat([x[i, :n] for i, n in enumerate(lengths)])
    pt = torch.cat([targets[i, :n] for i, n in enumerate(lengths)])
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return px, pt, cu


def first_call_delta(hidden, weight, ref_hidden, targets):
    """The BCO running mean after one call from a fresh state: this batch's mean reward."""
    with torch.no_grad():
        tok = logprobs(hidden.double(), weight.double(), targets).sum(-1)
        ref = logprobs(ref_hidden.double(), weight.double(), targets).sum(-1)
    return (BETA * (tok - ref)).mean().item()


def run(fn, hidden, weight, ref_hidden, targets, layout):
    """MPOLoss on the padded rows, or on the same rows packed; returns (out, hidden grad as
    padded [2B, T, H], weight grad) after backward."""
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    if layout == "padded":
        out = fn(h, w, targets, ref_hidden=ref_hidden, ref_weight=weight)
    else:
        ph, pt, cu = pack(h, targets)
        pr, _, _ = pack(ref_hidden, targets)
        out = fn(ph, w, pt, cu_seqlens=cu, ref_hidden=pr, ref_weight=weight)
    out.loss.backward()
    return out, h.grad, w.grad


def reference_grads(hidden, weight, ref_hidden, targets, types, weights, mode, delta=0.0):
    h, w = leaf64(hidden), leaf64(weight)
    loss = reference_loss(h, w, ref_hidden, targets, types, weights, mode, delta)
    loss.backward()
    return loss, h.grad, w.grad


# --------------------------------------------------------------------------- one batch


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_mpo_with_sequence_sft_matches_eq5(layout, dtype):
    """The full MPO loss (0.8 sigmoid + 0.2 bco_pair with the running mean + 1.0 Eq. 5) and
    its gradients on hidden and weight, padded and packed."""
    hidden, weight, ref_hidden, targets = batch(dtype=dtype)
    fn = MPOLoss(sft_normalize="sequence", backend="torch")
    out, gh, gw = run(fn, hidden, weight, ref_hidden, targets, layout)
    delta = first_call_delta(hidden, weight, ref_hidden, targets)
    loss, rgh, rgw = reference_grads(hidden, weight, ref_hidden, targets, MPO_TYPES,
                                     MPO_WEIGHTS, "sequence", delta)
    tol = F64_TOL if dtype == torch.float64 else F32_TOL
    errors = {"loss": rel_err(out.loss, loss), "hidden": rel_err(gh, rgh),
              "weight": rel_err(gw, rgw)}
    assert all(e <= tol for e in errors.values()), errors
    c, Lc = out.chosen_logps.detach().double(), (targets[:4] != IGNORE).sum(-1).double()
    assert rel_err(out.metrics["loss/sft"], eq5(c, Lc)) <= tol
    assert out.metrics["nll_loss"].item() == out.metrics["loss/sft"].item()


def test_token_mode_is_still_trls_token_mean():
    hidden, weight, ref_hidden, targets = batch()
    out, gh, gw = run(MPOLoss(backend="torch"), hidden, weight, ref_hidden, targets, "padded")
    assert MPOLoss().loss_config.sft_normalize == "token"  # the default of the module
    delta = first_call_delta(hidden, weight, ref_hidden, targets)
    loss, rgh, rgw = reference_grads(hidden, weight, ref_hidden, targets, MPO_TYPES,
                                     MPO_WEIGHTS, "token", delta)
    assert max(rel_err(out.loss, loss), rel_err(gh, rgh), rel_err(gw, rgw)) <= F64_TOL


def test_gradcheck_sequence_mode():
    hidden, weight, ref_hidden, targets = batch(B=2, T=5, H=3, V=7)
    ref_weight = weight.clone()  # fixed: gradcheck's perturbations of w leave it alone
    hidden.requires_grad_()
    weight.requires_grad_()

    def f(h, w):
        fn = MPOLoss(loss_types=("sigmoid", "sft"), sft_normalize="sequence", backend="torch")
        return fn(h, w, targets, ref_hidden=ref_hidden, ref_weight=ref_weight).loss

    assert torch.autograd.gradcheck(f, (hidden, weight))


def test_preference_loss_sequence_mode():
    """The functional core on [B] log-probs: Eq. 5 and its gradient -1 / (B L_c_i)."""
    B = 6
    lengths = torch.randint(0, 30, (B,)).double()
    c = (-lengths * torch.rand(B, dtype=torch.float64)).requires_grad_()
    loss, metrics = preference_loss(c, c.detach() - 1, loss_types=("sft",), loss_weights=(1.0,),
                                    chosen_lengths=lengths, rejected_lengths=lengths,
                                    sft_normalize="sequence")
    loss.backward()
    assert rel_err(loss, eq5(c.detach(), lengths)) <= F64_TOL
    assert rel_err(c.grad, -1 / (B * lengths.clamp(min=1))) <= F64_TOL
    assert metrics["nll_loss"].item() == pytest.approx(loss.item(), rel=1e-15)


def test_the_two_normalizations_weight_answers_differently():
    """A 1-token direct answer at NLL 3 per token beside a 99-token CoT answer at NLL 1: Eq. 5
    weights the pairs equally (2.0), the token mean weights the tokens (1.02)."""
    lengths = torch.tensor([1.0, 99.0], dtype=torch.float64)
    c = -torch.tensor([3.0, 1.0], dtype=torch.float64) * lengths
    kw = dict(loss_types=("sft",), chosen_lengths=lengths, rejected_lengths=lengths)
    per_sequence, _ = preference_loss(c, c, sft_normalize="sequence", **kw)
    per_token, _ = preference_loss(c, c, sft_normalize="token", **kw)
    assert per_sequence.item() == pytest.approx(2.0, rel=1e-15)
    assert per_token.item() == pytest.approx(102.0 / 100.0, rel=1e-15)


# --------------------------------------------------------------------------- micro-batches


def micro_batch_sum(hidden, weight, ref_hidden, targets, sizes, mode, layout):
    """The trainer's gradient accumulation: each micro-batch of pairs through MPOLoss, its
    share J from `objective` with the step's pair count (the token mean's denominator given
    to the loss from outside: `sft_tokens` with the step's chosen tokens), J summed and
    backpropagated. Returns (sum of J, hidden grad, weight grad)."""
    B = hidden.shape[0] // 2
    types, weights = ("sigmoid", "bco_pair", "sft"), MPO_WEIGHTS
    # delta 0: the running mean is updated once per call, by design not a step-level sum
    fn = MPOLoss(loss_types=types, loss_weights=weights, bco_delta="none",
                 sft_normalize=mode, backend="torch")
    step_chosen = int((targets[:B] != IGNORE).sum())
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    total, start = 0.0, 0
    for size in sizes:
        pairs = torch.arange(start, start + size)
        rows = torch.cat([pairs, B + pairs])
        start += size
        t = targets[rows]
        mb = SimpleNamespace(num_pairs=size, chosen_tokens=int((t[:size] != IGNORE).sum()))
        denominator = sft_tokens(mb, B, step_chosen, fn)
        if layout == "padded":
            out = fn(h[rows], w, t, ref_hidden=ref_hidden[rows], ref_weight=weight,
                     sft_tokens=denominator)
        else:
            ph, pt, cu = pack(h[rows], t)
            pr, _, _ = pack(ref_hidden[rows], t)
            out = fn(ph, w, pt, cu_seqlens=cu, ref_hidden=pr, ref_weight=weight,
                     sft_tokens=denominator)
        J = objective(out, mb, B)
        J.backward()
        total = total + J.detach()
    return total, h.grad, w.grad


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("mode", ["sequence", "token"])
def test_micro_batches_sum_to_the_full_batch(mode, layout):
    """Micro-batches of 2, 1, 3 and 1 pairs, each scaled by the step's pair count: their sum
    and its gradients are the full batch's loss (float64)."""
    hidden, weight, ref_hidden, targets = batch(B=7)
    total, gh, gw = micro_batch_sum(hidden, weight, ref_hidden, targets, (2, 1, 3, 1), mode,
                                    layout)
    loss, rgh, rgw = reference_grads(hidden, weight, ref_hidden, targets, MPO_TYPES,
                                     MPO_WEIGHTS, mode)
    errors = {"loss": rel_err(total, loss), "hidden": rel_err(gh, rgh),
              "weight": rel_err(gw, rgw)}
    assert all(e <= F64_TOL for e in errors.values()), errors


def test_micro_batch_means_without_the_step_count_are_not_eq5():
    """Why the step's pair count matters: averaging the micro-batches' own Eq. 5 values
    (each a mean over its pairs) weights a 1-pair micro-batch like a 3-pair one."""
    B, sizes = 4, (1, 3)
    c = -torch.rand(B, dtype=torch.float64) * 10
    Lc = torch.tensor([1.0, 9.0, 12.0, 7.0], dtype=torch.float64)
    per_mb = [eq5(c[:1], Lc[:1]), eq5(c[1:], Lc[1:])]
    scaled = sum(n / B * v for n, v in zip(sizes, per_mb, strict=True))
    assert rel_err(scaled, eq5(c, Lc)) <= F64_TOL
    assert abs(sum(per_mb) / 2 - eq5(c, Lc)) > 1e-3


# --------------------------------------------------------------------------- the Triton epilogue


@requires_triton
@pytest.mark.parametrize("B", [1, 5, 37])
def test_fused_pair_terms_sequence_sft(B):
    """The kernel's per-sequence SFT term, its coefficients and nll metric against the torch
    pair terms, including empty answers (count 0)."""
    device = "cuda" if HAS_CUDA else "cpu"
    count = torch.randint(0, 40, (2 * B,), device=device).float()
    count[0] = 0.0
    seq = -count * torch.rand(2 * B, device=device) * 2
    ref = seq + torch.randn(2 * B, device=device)
    for types, weights in ((MPO_TYPES, (0.8, 0.2, 1.7)), (("sft",), (1.0,))):
        cfg = LossConfig(types, weights, beta=0.3, bco_delta="none", sft_normalize="sequence")
        loss, vec, coef = _fused_pair_terms(seq, ref, count, cfg, None)
        t_loss, t_vec, t_coef = _torch_pair_terms(seq, ref, count, cfg, None)
        assert rel_err(loss, t_loss) <= F32_TOL and rel_err(coef, t_coef) <= F32_TOL
        assert rel_err(vec, t_vec) <= F32_TOL
        c, Lc = seq[:B].double(), count[:B].double()
        nll = vec[cfg.metric_names.index("nll_loss")]
        assert rel_err(nll, eq5(c, Lc)) <= F32_TOL
        w = weights[types.index("sft")]
        expected = -w / (B * Lc.clamp(min=1))  # the SFT part of dL/dc_i
        if types == ("sft",):
            assert rel_err(coef[:B], expected) <= F32_TOL and (coef[B:] == 0).all()


@requires_triton
@pytest.mark.parametrize("B", [1, 6])
def test_fused_pair_terms_sft_tokens_from_outside(B):
    """``sft_tokens``: the kernel's token-mean SFT term over a denominator given from outside
    (not the batch's chosen tokens) against the torch pair terms and -sum(c) / sft_tokens."""
    device = "cuda" if HAS_CUDA else "cpu"
    count = torch.randint(1, 40, (2 * B,), device=device).float()
    seq = -count * torch.rand(2 * B, device=device) * 2
    ref = seq + torch.randn(2 * B, device=device)
    cfg = LossConfig(MPO_TYPES, (0.8, 0.2, 1.7), beta=0.3, bco_delta="none")
    tokens = 3.5 * float(count[:B].sum())  # e.g. this micro-batch's share of a larger step
    loss, vec, coef = _fused_pair_terms(seq, ref, count, cfg, None, tokens)
    t_loss, t_vec, t_coef = _torch_pair_terms(seq, ref, count, cfg, None, tokens)
    assert rel_err(loss, t_loss) <= F32_TOL and rel_err(coef, t_coef) <= F32_TOL
    assert rel_err(vec, t_vec) <= F32_TOL
    nll = vec[cfg.metric_names.index("nll_loss")]
    assert rel_err(nll, -seq[:B].double().sum() / tokens) <= F32_TOL


def test_sft_tokens_is_checked():
    hidden, weight, _, targets = batch(B=2, T=6, dtype=torch.float32)
    for bad in (0, -3.0, float("nan")):
        with pytest.raises(ValueError, match="sft_tokens"):
            MPOLoss(loss_types=("sft",))(hidden, weight, targets, sft_tokens=bad)
    with pytest.raises(ValueError, match=r"sft_tokens.*sequence"):
        MPOLoss(loss_types=("sft",), sft_normalize="sequence")(hidden, weight, targets,
                                                                sft_tokens=4)


@requires_triton
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_triton_end_to_end_matches_eq5(layout):
    hidden, weight, ref_hidden, targets = batch(B=3, T=8, dtype=torch.float32)
    device = "cuda" if HAS_CUDA else "cpu"
    to = lambda *ts: [t.to(device) for t in ts]
    h_dev, w_dev, r_dev, t_dev = to(hidden, weight, ref_hidden, targets)
    fn = MPOLoss(sft_normalize="sequence", backend="triton")
    out, gh, gw = run(fn, h_dev, w_dev, r_dev, t_dev, layout)
    delta = first_call_delta(hidden, weight, ref_hidden, targets)
    loss, rgh, rgw = reference_grads(hidden, weight, ref_hidden, targets, MPO_TYPES,
                                     MPO_WEIGHTS, "sequence", delta)
    errors = {"loss": rel_err(out.loss, loss), "hidden": rel_err(gh, rgh),
              "weight": rel_err(gw, rgw)}
    assert all(e <= F32_TOL for e in errors.values()), errors


# --------------------------------------------------------------------------- 2-process DDP


class _Head(torch.nn.Module):
    """An LM head with the loss inside the module DDP wraps (as the trainer's MPOModel)."""

    def __init__(self, weight, mode):
        super().__init__()
        self.weight = torch.nn.Parameter(weight.clone())
        self.loss_fn = MPOLoss(bco_delta="none", sft_normalize=mode, backend="torch")

    def forward(self, hidden, targets, ref_hidden, sft_tokens=None):
        return self.loss_fn(hidden, self.weight, targets, ref_hidden=ref_hidden,
                            ref_weight=self.weight.detach(), sft_tokens=sft_tokens)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, data, split, results):
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                                         rank=rank, world_size=world)
    try:
        hidden, weight, ref_hidden, targets = data
        B = hidden.shape[0] // 2
        pairs = torch.tensor(split[rank])
        rows = torch.cat([pairs, B + pairs])
        t = targets[rows]
        mb = SimpleNamespace(num_pairs=len(pairs), chosen_tokens=int((t[:len(pairs)] != IGNORE)
                                                                      .sum()))
        step_chosen = int((targets[:B] != IGNORE).sum())  # the trainer agrees on it
        for mode in ("sequence", "token"):
            head = _Head(weight, mode)
            ddp = torch.nn.parallel.DistributedDataParallel(head)
            h = hidden[rows].clone().requires_grad_()
            out = ddp(h, t, ref_hidden[rows], sft_tokens(mb, B, step_chosen, head.loss_fn))
            J = objective(out, mb, B)
            (J * world).backward()  # DDP averages: the sum of the ranks' J
            total = J.detach().clone()
            torch.distributed.all_reduce(total)
            results[(rank, mode)] = (total, head.weight.grad.clone(), h.grad / world)
    finally:
        torch.distributed.destroy_process_group()


def test_two_process_ddp_matches_eq5():
    """Rank 0 holds 3 pairs, rank 1 one pair: the summed loss and the DDP-averaged weight
    gradient are the full batch's Eq. 5 loss (the denominator is the step's 4 pairs, not a
    per-rank mean), and each rank's hidden gradient is its rows of the full gradient."""
    hidden, weight, ref_hidden, targets = batch(B=4)
    split = {0: [0, 1, 3], 1: [2]}
    results = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(2, _free_port(), (hidden, weight, ref_hidden, targets), split,
                                results), nprocs=2, join=True)
    for mode in ("sequence", "token"):
        loss, rgh, rgw = reference_grads(hidden, weight, ref_hidden, targets, MPO_TYPES,
                                         MPO_WEIGHTS, mode)
        for rank, pairs in split.items():
            total, gw, gh = results[(rank, mode)]
            assert rel_err(total, loss) <= F64_TOL, (mode, rank)
            assert rel_err(gw, rgw) <= F64_TOL, (mode, rank)
            rows = torch.cat([torch.tensor(pairs), 4 + torch.tensor(pairs)])
            assert rel_err(gh, rgh[rows]) <= F64_TOL, (mode, rank)


# --------------------------------------------------------------------------- defaults and refusals


def test_defaults():
    assert TrainConfig().sft_normalize == "sequence"  # the trainer: the paper's Eq. 5
    assert MPOLoss().loss_config.sft_normalize == "token"  # the module and drop-ins: TRL's
    assert LossConfig().sft_normalize == "token"


@pytest.mark.parametrize("bad", ["mean", "Sequence", "", None, "tokens"])
def test_bad_sft_normalize_is_refused(bad):
    with pytest.raises(ValueError, match=r"sft_normalize must be 'token'.*or 'sequence'"):
        MPOLoss(sft_normalize=bad)
    c = torch.randn(3)
    with pytest.raises(ValueError, match="sft_normalize"):
        preference_loss(c, c, loss_types=("sft",), chosen_lengths=torch.ones(3),
                        sft_normalize=bad)
    with pytest.raises(ValueError, match="sft_normalize must be"):  # one of ..., or a str
        TrainConfig(sft_normalize=bad)


def test_sequence_mode_needs_lengths():
    c = torch.randn(3)
    with pytest.raises(ValueError, match="sft needs sft_loss or chosen_lengths"):
        preference_loss(c, c, loss_types=("sft",), sft_normalize="sequence")


def test_segments_layout_too():
    """The packer's `Segments` (no host read) give the same sequence-mode loss as offsets."""
    hidden, weight, ref_hidden, targets = batch()
    ph, pt, cu = pack(hidden, targets)
    pr, _, _ = pack(ref_hidden, targets)
    segs = mpo_fast.Segments(cu, ph.shape[0], int(cu.diff().max()))
    fn = MPOLoss(sft_normalize="sequence", bco_delta="none", backend="torch")
    a = fn(ph, weight, pt, cu_seqlens=cu, ref_hidden=pr, ref_weight=weight).loss
    b = fn(ph, weight, pt, cu_seqlens=segs, ref_hidden=pr, ref_weight=weight).loss
    assert a.item() == b.item()
