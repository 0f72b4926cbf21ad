"""mpo-fast: Mixed Preference Optimization with fused, memory-lean log-prob kernels."""

from .logprobs import fused_logprobs

__version__ = "0.1.0"
__all__ = ["fused_logprobs"]
