"""pytest-benchmark micro-benchmarks of mpo_fast.packing (CPU).

Not part of the default test run (pyproject's testpaths is tests/, and addopts has
--benchmark-skip). Run: `python -m pytest bench/micro --benchmark-only`.
"""

import math

import pytest
import torch

from mpo_fast import packing

IMPLS = ["torch"] + (["extension"] if packing._C is not None else [])
pytestmark = pytest.mark.benchmark

S, T, H = 16, 1024, 256


@pytest.fixture(scope="module")
def batch():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(S, T, H, generator=gen).to(torch.bfloat16)
    lengths = torch.randint(1, T + 1, (S,), generator=gen)
    p = packing.pack(x, lengths)
    mask = torch.rand(p.num_tokens, generator=gen) > 0.3
    return x, lengths, p, mask


def pair_tokens(n: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(3, n, generator=gen, dtype=torch.float64)
    prompt = torch.exp(math.log(512) + z[0]).round().clamp(64, 4096).long()
    completions = torch.exp(math.log(192) + 0.8 * z[1:]).round().clamp(16, 1024).long()
    return 2 * prompt + completions.sum(0)


@pytest.mark.parametrize("impl", IMPLS)
def test_pack(benchmark, batch, impl):
    x, lengths, _, _ = batch
    benchmark(packing.pack, x, lengths, impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_unpack(benchmark, batch, impl):
    _, _, p, _ = batch
    benchmark(packing.unpack, p.tokens, p.cu_seqlens, T, impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_unpack_into_buffer(benchmark, batch, impl):
    x, _, p, _ = batch
    out = torch.empty_like(x)
    benchmark(packing.unpack, p.tokens, p.cu_seqlens, T, out=out, impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_shift_targets(benchmark, batch, impl):
    _, _, p, mask = batch
    tokens = torch.randint(0, 50000, (p.num_tokens,))
    benchmark(packing.shift_targets, tokens, p.cu_seqlens, mask, impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n_pairs", [10_000, 100_000])
def test_plan(benchmark, impl, n_pairs):
    sizes = pair_tokens(n_pairs)
    benchmark.pedantic(packing.plan, args=(sizes, 16384), kwargs={"impl": impl}, rounds=3,
                       iterations=1)
