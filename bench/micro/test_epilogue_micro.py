"""pytest-benchmark micro-benchmarks of the loss epilogue (CPU: the torch path).

Not part of the default test run. Run: `python -m pytest bench/micro --benchmark-only`.
On CUDA the same calls time the Triton epilogue kernels.
"""

import pytest
import torch

from mpo_fast.epilogue import Epilogue, LossConfig, Segments

pytestmark = pytest.mark.benchmark
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
B, T = 16, 2048


@pytest.fixture(scope="module")
def inputs():
    gen = torch.Generator().manual_seed(0)
    logp = (-torch.rand(2 * B * T, generator=gen) * 5).to(DEVICE)
    ref = (-torch.rand(2 * B * T, generator=gen) * 5).to(DEVICE)
    targets = torch.randint(0, 1000, (2 * B * T,), generator=gen).to(DEVICE)
    return logp, ref, targets


@pytest.mark.parametrize("types", [("sigmoid", "bco_pair", "sft"), ("aot", "sft")],
                         ids=["mpo", "aot-sorting"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_epilogue_forward_backward(benchmark, inputs, types, layout):
    logp, ref, targets = inputs
    segs = Segments.padded(2 * B, T, torch.device(DEVICE))
    if layout == "packed":
        segs = Segments(segs.cu_seqlens, segs.num_tokens)
    cfg = LossConfig(types, (1.0,) * len(types), 0.1, 0.0, 0.05, -100, running_delta=True)
    state = torch.tensor([0.0, 1e-24], dtype=torch.float64, device=DEVICE)
    use_triton = DEVICE == "cuda"

    def step():
        x = logp.clone().requires_grad_()
        loss, _, _ = Epilogue.apply(x, ref, None, targets, segs, cfg, state, use_triton)
        loss.backward()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark(step)
