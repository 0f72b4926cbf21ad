"""The Triton loss epilogue (kernels/loss_epilogue.py) against the torch epilogue.

Runs the kernels under TRITON_INTERPRET=1 on a CPU machine, on CUDA where there is one.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import HAS_CUDA, HAS_TRITON
from reference import rel_err

from mpo_fast.epilogue import LossConfig, _torch_pair_terms
from mpo_fast.layout import Segments
from mpo_fast.losses import LOSS_TYPES

pytestmark = pytest.mark.skipif(
    not HAS_TRITON or not (HAS_CUDA or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="needs triton with CUDA or the interpreter")
DEVICE = "cuda" if HAS_CUDA else "cpu"
CLOSED_FORM = [t for t in LOSS_TYPES if t not in ("aot", "aot_pair")]


def random_cu(S, max_len):
    lengths = torch.randint(0, max_len + 1, (S,))
    lengths[torch.randint(0, S, (1,))] = 0  # an empty sequence
    return torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(torch.int32)


@pytest.mark.parametrize("with_ref", [False, True])
def test_segment_sums_and_broadcast(with_ref):
    from mpo_fast.kernels import loss_epilogue as k

    cu = random_cu(6, 2500).to(DEVICE)  # longer than one TOKEN_BLOCK
    N = int(cu[-1])
    logp = -torch.rand(N, device=DEVICE) * 5
    ref = -torch.rand(N, device=DEVICE) * 5 if with_ref else None
    targets = torch.randint(0, 100, (N,), device=DEVICE)
    targets[torch.rand(N, device=DEVICE) < 0.3] = -100
    segs = Segments.from_cu_seqlens(cu)
    seq, ref_seq, count = k.segment_sums(logp, ref, targets, cu, -100)
    assert rel_err(seq, segs.sum(logp.double())) <= 1e-6
    assert torch.equal(count, segs.sum((targets != -100).float()))
    if with_ref:
        assert rel_err(ref_seq, segs.sum(ref.double())) <= 1e-6
    g = torch.randn(6, device=DEVICE)
    assert torch.equal(k.broadcast(g, cu, N), segs.broadcast(g))


def config(types, weights, beta=0.3, e=0.0):
    return LossConfig(tuple(types), tuple(weights), beta, e, 0.05, -100, running_delta=False)


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
    from mpo_fast.kernels import loss_epilogue as k

    e = {"exo_pair": 0.2, "robust": 0.1, "sigmoid": 0.15}.get(loss_type, 0.0)
    types = (loss_type, "sft") if loss_type != "sft" else ("sft", "sigmoid")
    cfg = config(types, (1.7, 0.4), beta=0.3, e=e)
    seq, ref, count = seq_inputs(B, spread)
    delta = torch.randn((), device=DEVICE)
    types, weights = cfg.kernel_types(seq.device)
    loss, metrics, coef = k.pair_terms(seq, ref, count, delta.reshape(1), types, weights,
                                       cfg.beta, cfg.label_smoothing, cfg.discopop_tau)
    state = torch.tensor([delta.item(), 1e30], dtype=torch.float64, device=DEVICE)
    t_loss, t_metrics, t_coef = _torch_pair_terms(seq, ref, count, cfg, state)  # delta fixed
    # discopop's derivative cancels terms ~1/tau = 20x its size: fp32 agrees to ~1e-5 there
    tol = 1e-4 if loss_type == "discopop" else 1e-5
    assert rel_err(loss, t_loss) <= tol
    assert rel_err(coef, t_coef) <= tol
    names = cfg.metric_names()
    for i, name in enumerate(names):
        if not name.startswith("loss/") or name[5:] in cfg.loss_types:
            assert abs(metrics[i] - t_metrics[i]) <= 1e-5 * (1 + abs(t_metrics[i])), name


def test_pair_terms_all_types_at_once():
    from mpo_fast.kernels import loss_epilogue as k

    weights_by_type = torch.rand(len(CLOSED_FORM)).tolist()
    cfg = config(CLOSED_FORM, weights_by_type, beta=0.2, e=0.1)
    seq, ref, count = seq_inputs(9, 5.0)
    types, weights = cfg.kernel_types(seq.device)
    loss, _, coef = k.pair_terms(seq, ref, count, torch.zeros(1, device=DEVICE), types,
                                 weights, cfg.beta, cfg.label_smoothing, cfg.discopop_tau)
    t_loss, _, t_coef = _torch_pair_terms(seq, ref, count, cfg, None)
    assert rel_err(loss, t_loss) <= 1e-5 and rel_err(coef, t_coef) <= 1e-5


def test_sorting_losses_are_refused():
    from mpo_fast.kernels import loss_epilogue as k

    with pytest.raises(ValueError, match="aot"):
        k.encode_types(("aot",), (1.0,))
