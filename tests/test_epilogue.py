"""The Triton loss epilogue (kernels/loss_epilogue.py) against the torch epilogue.

Runs the kernels under TRITON_INTERPRET=1 on a CPU machine, on CUDA where there is one. The
kernel file knows no loss names: `mpo_fast.epilogue.kernel_bits` / `kernel_metric_slots` map
the loss table onto its constants, and these tests hold that map to the table.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import HAS_CUDA, HAS_TRITON
from reference import rel_err

from mpo_fast import epilogue
from mpo_fast.epilogue import _fused_pair_terms, _torch_pair_terms
from mpo_fast.layout import Segments
from mpo_fast.losses import LOSS_TYPES, METRIC_NAMES, LossConfig

pytestmark = pytest.mark.skipif(
    not HAS_TRITON or not (HAS_CUDA or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="needs triton with CUDA or the interpreter")
DEVICE = "cuda" if HAS_CUDA else "cpu"
SORTING = ("aot", "aot_pair")  # a batch sort: no kernel term, the torch pair terms do them
CLOSED_FORM = [t for t in LOSS_TYPES if t not in SORTING]


def random_cu(S, max_len):
    lengths = torch.randint(0, max_len + 1, (S,))
    lengths[torch.randint(0, S, (1,))] = 0  # an empty sequence
    return torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(torch.int32)


# --------------------------------------------------------------------------- the bit map


def test_bits_match_the_loss_table():
    from mpo_fast.kernels import loss_epilogue as k

    bits = epilogue.kernel_bits()
    assert set(bits) == set(CLOSED_FORM)  # every closed-form loss has a kernel term
    assert sorted(bits.values()) == list(range(k.NUM_TERMS))  # one bit each, none unused
    assert k.ALL_TERMS == sum(1 << b for b in bits.values())
    slots = epilogue.kernel_metric_slots()
    assert tuple(slots) == METRIC_NAMES
    assert sorted(slots.values()) == list(range(k.NUM_METRICS))
    assert epilogue.fused_epilogue_supported(LossConfig(CLOSED_FORM, label_smoothing=0.1), 9)
    for t in SORTING:
        assert not epilogue.fused_epilogue_supported(LossConfig((t,)), 9)


def test_kernel_imports_nothing_from_the_package():
    from mpo_fast.kernels import loss_epilogue as k

    source = open(k.__file__).read()
    assert "mpo_fast" not in source and "from .." not in source


@pytest.mark.parametrize("loss_type", CLOSED_FORM)
def test_each_bit_computes_its_own_loss(loss_type):
    """One term on, every other off: the kernel's term mean (read through the map) and its
    total are the torch table's loss of that name, and the other terms report NaN."""
    from mpo_fast.kernels import loss_epilogue as k

    e = {"exo_pair": 0.2, "robust": 0.1, "sigmoid": 0.15}.get(loss_type, 0.0)
    cfg = LossConfig((loss_type,), (1.0,), beta=0.3, label_smoothing=e, bco_delta="none")
    seq, ref, count = seq_inputs(6, 3.0)
    bit = epilogue.kernel_bits()[loss_type]
    weights = torch.zeros(k.NUM_TERMS, device=DEVICE)
    weights[bit] = 1.0
    loss, out, _ = k.pair_terms(seq, ref, count, torch.zeros(1, device=DEVICE), 1 << bit,
                                weights, cfg.beta, cfg.label_smoothing, cfg.discopop_tau, -1e-6)
    t_loss, t_vec, _ = _torch_pair_terms(seq, ref, count, cfg, None)
    assert rel_err(loss, t_loss) <= 1e-5
    assert rel_err(out[k.NUM_METRICS + bit], t_vec[-1]) <= 1e-5
    others = [i for i in range(k.NUM_TERMS) if i != bit]
    assert torch.isnan(out[k.NUM_METRICS:][others]).all()


# --------------------------------------------------------------------------- the kernels


@pytest.mark.parametrize("with_ref", [False, True])
def test_segment_sums_and_broadcast(with_ref):
    from mpo_fast.kernels import loss_epilogue as k

    cu = random_cu(6, 2500).to(DEVICE)  # longer than one TOKEN_BLOCK
    segs = Segments.from_cu_seqlens(cu)
    N = segs.num_tokens
    logp = -torch.rand(N, device=DEVICE) * 5
    ref = -torch.rand(N, device=DEVICE) * 5 if with_ref else None
    seq, ref_seq = k.segment_sums(logp, ref, cu, N)
    assert rel_err(seq, segs.sum(logp.double())) <= 1e-6
    if with_ref:
        assert rel_err(ref_seq, segs.sum(ref.double())) <= 1e-6
    g = torch.randn(6, device=DEVICE)
    assert torch.equal(k.broadcast(g, cu, N), segs.broadcast(g))


def test_offsets_past_the_tokens_stay_in_bounds():
    """Offsets the packer was told to trust but that overrun N are clamped to [0, N]."""
    from mpo_fast.kernels import loss_epilogue as k

    cu = torch.tensor([0, 3, 7, 12], dtype=torch.int32, device=DEVICE)  # N is only 8
    logp = -torch.rand(8, device=DEVICE)
    seq, _ = k.segment_sums(logp, None, cu, 8)
    expected = torch.stack([logp[:3].sum(), logp[3:7].sum(), logp[7:].sum()])
    assert rel_err(seq, expected) <= 1e-6
    out = k.broadcast(torch.tensor([1.0, 2.0, 3.0], device=DEVICE), cu, 8)
    assert out.tolist() == [1, 1, 1, 2, 2, 2, 2, 3]


def seq_inputs(B, spread):
    """Sequence sums whose reward margins span `spread` (both tails of every sigmoid)."""
    count = torch.randint(0, 40, (2 * B,), device=DEVICE).float()
    seq = -count * torch.rand(2 * B, device=DEVICE) * 2
    ref = seq + torch.randn(2 * B, device=DEVICE) * spread
    return seq, ref, count


@pytest.mark.parametrize("loss_type", CLOSED_FORM)
@pytest.mark.parametrize("spread", [0.5, 30.0], ids=["small-margins", "large-margins"])
@pytest.mark.parametrize("B", [1, 5, 37])
def test_pair_terms_match_autograd(loss_type, spread, B):
    e = {"exo_pair": 0.2, "robust": 0.1, "sigmoid": 0.15}.get(loss_type, 0.0)
    types = (loss_type, "sft") if loss_type != "sft" else ("sft", "sigmoid")
    cfg = LossConfig(types, (1.7, 0.4), beta=0.3, label_smoothing=e)
    seq, ref, count = seq_inputs(B, spread)
    delta = torch.randn((), dtype=torch.float64).item()
    # a huge count pins the running mean: both paths use delta
    state = torch.tensor([delta, 1e30], dtype=torch.float64, device=DEVICE)
    state = state if cfg.running_delta else None
    loss, metrics, coef = _fused_pair_terms(seq, ref, count, cfg, None if state is None
                                            else state.clone())
    t_loss, t_metrics, t_coef = _torch_pair_terms(seq, ref, count, cfg, state)
    # discopop's derivative cancels terms ~1/tau = 20x its size: fp32 agrees to ~1e-5 there
    tol = 1e-4 if loss_type == "discopop" else 1e-5
    assert rel_err(loss, t_loss) <= tol
    assert rel_err(coef, t_coef) <= tol
    assert metrics.shape == t_metrics.shape == (len(cfg.metric_names),)
    for i, name in enumerate(cfg.metric_names):
        assert abs(metrics[i] - t_metrics[i]) <= 1e-5 * (1 + abs(t_metrics[i])), name


def test_pair_terms_all_types_at_once():
    weights = torch.rand(len(CLOSED_FORM)).tolist()
    cfg = LossConfig(CLOSED_FORM, weights, beta=0.2, label_smoothing=0.1, bco_delta="none")
    seq, ref, count = seq_inputs(9, 5.0)
    loss, metrics, coef = _fused_pair_terms(seq, ref, count, cfg, None)
    t_loss, t_metrics, t_coef = _torch_pair_terms(seq, ref, count, cfg, None)
    assert rel_err(loss, t_loss) <= 1e-5 and rel_err(coef, t_coef) <= 1e-5
    assert rel_err(metrics, t_metrics) <= 1e-5


def test_pair_terms_refuse_unknown_bits_and_too_many_pairs():
    from mpo_fast.kernels import loss_epilogue as k

    seq, ref, count = seq_inputs(2, 1.0)
    w = torch.ones(k.NUM_TERMS, device=DEVICE)
    with pytest.raises(ValueError, match="bits outside ALL_TERMS"):
        k.pair_terms(seq, ref, count, torch.zeros(1, device=DEVICE), 1 << k.NUM_TERMS, w,
                     0.1, 0.0, 0.05, -1e-6)
    big = torch.zeros(2 * (k.MAX_PAIRS + 1), device=DEVICE)
    with pytest.raises(ValueError, match="at most"):
        k.pair_terms(big, big, big, torch.zeros(1, device=DEVICE), 1, w, 0.1, 0.0, 0.05, -1e-6)
