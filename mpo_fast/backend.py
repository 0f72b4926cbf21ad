"""Choosing an implementation: one word, ``backend``, for every op, and the one reader of the
environment variables that override that choice.

    op           backend=                               environment override
    logprobs     "auto" | "triton" | "torch"            MPO_FAST_BACKEND
                 (fused_logprobs, MPOLoss and its loss epilogue)
    packing      "auto" | "extension" | "torch"         MPO_FAST_PACKING
    attention    "auto" | "flash_attn" | "varlen" | "sdpa"

``"auto"`` lets the op pick for the tensors it is given (and is where an environment override
applies); an explicit value always wins over the environment. The environment is read at
every call, so setting a variable in a running process takes effect at the next call.
`mpo_fast.packing.active_backend()` answers in these words.

Other environment variables are tuning knobs, not backend choices, and are read where they are
used: MPO_FAST_WORKSPACE_MB (torch_backend.py and kernels/logprob_backward.py),
MPO_FAST_AUTOTUNE and MPO_FAST_CACHE_DIR (kernels/configs.py), TRITON_INTERPRET (here, and in
kernels/tl_utils.py: kernels/ imports nothing from mpo_fast), MPO_FAST_DEBUG (console.py).
"""

from __future__ import annotations

import os

CHOICES = {
    "logprobs": ("auto", "triton", "torch"),
    "packing": ("auto", "extension", "torch"),
    "attention": ("auto", "flash_attn", "varlen", "sdpa"),
}
ENV_VARS = {"logprobs": "MPO_FAST_BACKEND", "packing": "MPO_FAST_PACKING"}


def requested(op: str, backend: str) -> str:
    """The backend asked for: ``backend`` itself, or the op's environment override when
    ``backend`` is ``"auto"`` and the variable is set. Still ``"auto"`` if neither names one.

    Raises ValueError naming the argument (or the variable) on a value not in ``CHOICES[op]``.
    """
    choices = CHOICES[op]
    if backend not in choices:
        raise ValueError(f"backend must be one of {choices}, got {backend!r}")
    var = ENV_VARS.get(op)
    if backend == "auto" and var is not None:
        backend = os.environ.get(var) or "auto"
        if backend not in choices:
            raise ValueError(f"{var} must be one of {choices}, got {backend!r}")
    return backend


def triton_available() -> bool:
    """Whether the ``triton`` package imports (the "triton" logprobs backend needs it)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpreting() -> bool:
    """Whether Triton kernels run on the CPU through its interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
