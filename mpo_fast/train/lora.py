"""LoRA through PEFT (``--lora-r`` > 0): the policy's adapters train, nothing else.

    wrap(model, cfg) -> peft.PeftModel
        LoraConfig(r=lora_r, lora_alpha, lora_dropout, target_modules): by default every
        linear projection of the language model (`default_targets`: for a causal LM all
        nn.Linear layers under its backbone, e.g. q/k/v/o and gate/up/down; for a VLM those
        under its language model only: the vision tower, the projector and the LM head stay
        as they are)

With LoRA the reference defaults to the policy with its adapters disabled (``reference=
"adapter"``: no second model in memory). Checkpoints hold the whole policy (for an exact
resume) and the adapter (adapter_config.json + adapter_model.safetensors); ``final/`` holds
the adapter (``--lora-save adapter``, what ``PeftModel.from_pretrained(base, final)`` loads)
or the merged model (``merged``: a plain Hugging Face model folder).
"""

from __future__ import annotations

import re

from torch import nn

from ..hf_model import backbone

__all__ = ["default_targets", "wrap"]


def default_targets(model: nn.Module) -> str:
    """A regex (PEFT matches it against full module names) for every nn.Linear of the
    language model: ``<its prefix>.*.(<the linear layers' names>)``."""
    base = backbone(model)
    lm = getattr(base, "language_model", None) or base
    prefix = next(name for name, module in model.named_modules() if module is lm)
    names = sorted({n.rsplit(".", 1)[-1] for n, m in lm.named_modules()
                    if isinstance(m, nn.Linear)})
    if not names:
        raise ValueError(f"{type(model).__name__}: no linear layer in its language model to "
                         "put LoRA adapters on; name them with --lora-target-modules")
    return rf"{re.escape(prefix)}\..*\.({'|'.join(map(re.escape, names))})"


def wrap(model: nn.Module, cfg):
    """``model`` as a PEFT LoRA model (only the adapters trainable)."""
    try:
        import peft
    except ImportError as err:
        raise ValueError("--lora-r needs the peft package (pip install peft)") from err
    targets = list(cfg.lora_target_modules)
    if not targets:
        targets = default_targets(model)
    elif targets == ["all-linear"]:
        targets = "all-linear"
    vlm = getattr(model.config, "vision_config", None) is not None
    config = peft.LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                             lora_dropout=cfg.lora_dropout, target_modules=targets,
                             task_type=None if vlm else "CAUSAL_LM")
    return peft.get_peft_model(model, config)
