"""Triton kernels of mpo-fast, installed as `mpo_fast.kernels`.

The package itself is the "triton" backend of `mpo_fast.fused_logprobs`: it exposes the same
`logprob_forward` / `logprob_backward` launchers as `mpo_fast.torch_backend`.
"""

from .logprob_backward import logprob_backward
from .logprob_forward import logprob_forward

__all__ = ["logprob_backward", "logprob_forward"]
