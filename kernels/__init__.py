"""Triton kernels of mpo-fast, installed as `mpo_fast.kernels`.

The package itself is the "triton" backend of `mpo_fast.fused_logprobs`: it exposes the same
`forward` / `backward` launchers as `mpo_fast.torch_backend`.
"""

from .logprob_backward import backward
from .logprob_forward import forward

__all__ = ["backward", "forward"]
