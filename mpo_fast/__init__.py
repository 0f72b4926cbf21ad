"""mpo-fast: Mixed Preference Optimization with fused, memory-lean log-prob kernels.

    fused_logprobs   per-token log p(target) from hidden states and the LM head, no logits
    warmup           compile the Triton kernels for an LM head ahead of the first step
    MPOLoss          DPO + BCO + SFT (and every other preference loss) from hidden states
    preference_loss  the same losses on sequence log-probs (functional core)
    Segments         which tokens belong to which sequence: cu_seqlens int32, num_tokens,
                     max_seqlen (the one currency of packing, attention and MPOLoss)
    packing          padding-free batches of pairs (C++/CUDA extension, torch fallback)
    attention        attention over packed sequences for Hugging Face models
    backend          how every op chooses its implementation (``backend=``, env overrides)
"""

from . import attention, backend, layout, packing
from .layout import Segments
from .logprobs import fused_logprobs, warmup
from .losses import LOSS_TYPES, preference_loss
from .mpo import MPOLoss, MPOOutput

__version__ = "0.1.0"
__all__ = ["LOSS_TYPES", "MPOLoss", "MPOOutput", "Segments", "attention", "backend",
           "fused_logprobs", "layout", "packing", "preference_loss", "warmup"]
