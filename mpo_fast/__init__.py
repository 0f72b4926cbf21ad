"""mpo-fast: Mixed Preference Optimization with fused, memory-lean log-prob kernels.

    fused_logprobs   per-token log p(target) from hidden states and the LM head, no logits
    warmup           compile the Triton kernels for an LM head ahead of the first step
    MPOLoss          DPO + BCO + SFT (and every other preference loss) from hidden states
    preference_loss  the same losses on sequence log-probs (functional core)
    packing          padding-free batches of pairs (C++/CUDA extension, torch fallback)
    attention        attention over packed sequences for Hugging Face models
"""

from . import attention, packing
from .logprobs import fused_logprobs, warmup
from .losses import LOSS_TYPES, preference_loss
from .mpo import MPOLoss, MPOOutput

__version__ = "0.1.0"
__all__ = ["LOSS_TYPES", "MPOLoss", "MPOOutput", "attention", "fused_logprobs", "packing",
           "preference_loss", "warmup"]
