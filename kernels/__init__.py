"""Triton kernels of mpo-fast, installed as `mpo_fast.kernels`.

The package itself is the "triton" backend of `mpo_fast.fused_logprobs`: it exposes the same
`forward` / `backward` launchers as `mpo_fast.torch_backend`, plus `warmup`.

    logprob_forward.py   log-sum-exp and target logit per token, vocab split, no logits stored
    logprob_backward.py  per vocab slab: logits gradient (Triton) -> dH, dW (cuBLAS)
    loss_epilogue.py     token log-probs -> the combined preference loss and back
    configs.py           the launch configurations: fixed per architecture, tuned on request
    tl_utils.py          shared Triton helpers (the logits tile, tanh) and launch-time facts
"""

from .logprob_backward import backward
from .logprob_forward import forward
from .warmup import warmup

__all__ = ["backward", "forward", "warmup"]
