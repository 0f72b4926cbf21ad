"""The policy as DDP/FSDP see it: one module whose forward runs the backbone, the LM-head
matmul and the fused MPO loss, so the wrappers see (and reduce) the head's gradients.

    MPOModel(model, loss_fn)(batch, ref_logps) -> MPOOutput
        hidden = backbone(batch)            model.base_model: for a VLM the backbone that
                                            injects the image features (not get_decoder(),
                                            the text stack only); no logits are made
        loss_fn(hidden, lm_head.weight, batch.targets, cu_seqlens=batch.segments, ...)

Images: each pair's images are encoded once (``base.get_image_features``) and the features
reused for its chosen and its rejected sequence, through transformers' ``mm_encoder_outputs``
(the sequences hold the chosen B then the rejected B, so the features appear twice, in order).

Packing needs 1-D positions restarting per sequence; Qwen2-VL-style M-RoPE (3-D rotary
positions computed by ``get_rope_index``) is refused when packing (`check_packable`).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..attention import attention_kwargs, register
from ..data.collate import Batch
from ..mpo import MPOLoss, MPOOutput

__all__ = ["MPOModel", "backbone", "check_packable", "count_calls", "enable_checkpointing",
           "hidden_states", "image_features", "lm_head", "load", "logit_softcap",
           "set_attention", "uses_mrope"]


def load(name: str, seed: int = 0):
    """(model, tokenizer, processor) for ``name``: "tiny" builds the bundled model in code;
    otherwise a Hugging Face path or id — a config with a vision part loads as
    AutoModelForImageTextToText with its AutoProcessor, else AutoModelForCausalLM (processor
    None). Weights load in fp32 (the master copy; autocast runs the bf16 compute)."""
    if name == "tiny":
        from ..data import tiny

        tokenizer = tiny.tiny_tokenizer()
        return tiny.tiny_lm(tokenizer, hidden=128, layers=2, seed=seed), tokenizer, None
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoProcessor,
        AutoTokenizer,
    )

    config = AutoConfig.from_pretrained(name)
    vlm = getattr(config, "vision_config", None) is not None
    cls = AutoModelForImageTextToText if vlm else AutoModelForCausalLM
    model = cls.from_pretrained(name, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(name) if vlm else None
    tokenizer = processor.tokenizer if vlm else AutoTokenizer.from_pretrained(name)
    return model, tokenizer, processor


class MPOModel(nn.Module):
    """``model`` (a Hugging Face causal LM or VLM) and ``loss_fn`` (an `MPOLoss`) in one
    forward; ``amp_dtype`` is the dtype the head runs in under autocast (bf16 on GPU)."""

    def __init__(self, model: nn.Module, loss_fn: MPOLoss, amp_dtype: torch.dtype | None = None):
        super().__init__()
        self.model, self.loss_fn, self.amp_dtype = model, loss_fn, amp_dtype

    def forward(self, batch: Batch, ref_logps: tuple[torch.Tensor, torch.Tensor] | None = None,
                sft_tokens: float | None = None) -> MPOOutput:
        hidden = hidden_states(self.model, batch)
        weight, bias = lm_head(self.model, hidden.dtype if self.amp_dtype is None
                               else self.amp_dtype)
        hidden = hidden.to(weight.dtype) * logit_scale(self.model)
        return self.loss_fn(hidden, weight, batch.targets, cu_seqlens=batch.segments, bias=bias,
                            ref_logps=ref_logps, sft_tokens=sft_tokens)


def lm_head(model: nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The output embedding's weight ``[V, H]`` and bias (tied embeddings included), in
    ``dtype``; the cast is differentiable, so the fp32 master weight gets the gradient."""
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (an LM head)")
    bias = getattr(head, "bias", None)
    return head.weight.to(dtype), None if bias is None else bias.to(dtype)


def backbone(model: nn.Module) -> nn.Module:
    """The module that returns hidden states: ``model.base_model`` of the Hugging Face model
    (for a PEFT model, of the model it wraps: the adapters live inside those layers)."""
    if hasattr(model, "get_base_model"):  # peft.PeftModel
        model = model.get_base_model()
    return model.base_model


def _text_config(model: nn.Module):
    config = getattr(model, "config", None)
    return getattr(config, "text_config", None) or config


def logit_scale(model: nn.Module) -> float:
    """A constant the model multiplies its logits by (Cohere's ``logit_scale``), else 1:
    applied to the hidden states, which is the same."""
    return float(getattr(_text_config(model), "logit_scale", None) or 1.0)


def logit_softcap(model: nn.Module) -> float | None:
    """The model's final logit soft-cap (Gemma 2's ``final_logit_softcapping``), for
    `MPOLoss(softcap=...)` / `fused_logprobs`."""
    return getattr(_text_config(model), "final_logit_softcapping", None)


def hidden_states(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Final hidden states of the batch's tokens: ``[1, N, H]`` packed, ``[2B, T, H]`` padded."""
    base = backbone(model)
    kwargs = {"use_cache": False}
    if batch.packed:
        check_packable(model)
        kwargs.update(position_ids=batch.position_ids.unsqueeze(0),
                      **attention_kwargs(batch.segments))
        input_ids = batch.input_ids.unsqueeze(0)
    else:
        kwargs["attention_mask"] = batch.attention_mask.long()
        if not uses_mrope(model):  # M-RoPE models compute their own 3-D positions
            kwargs["position_ids"] = batch.position_ids
        input_ids = batch.input_ids
    if batch.pixel_values is not None:
        features = image_features(model, batch)
        features.pooler_output = _twice(features.pooler_output)
        kwargs["mm_encoder_outputs"] = {"image": features}
        kwargs.update({k: _twice(v) for k, v in batch.image_kwargs.items()})
    return base(input_ids=input_ids, **kwargs).last_hidden_state


def image_features(model: nn.Module, batch: Batch):
    """The batch's images encoded once (pair order): the backbone's ``get_image_features``
    output, whose ``pooler_output`` holds the features the image tokens take."""
    base = backbone(model)
    if not hasattr(base, "get_image_features"):
        raise ValueError(f"the batch has images but {type(base).__name__} has no "
                         "get_image_features (a text-only model?)")
    return base.get_image_features(pixel_values=batch.pixel_values, return_dict=True,
                                   **batch.image_kwargs)


def _twice(x):
    """The features (or per-image extras) of the B pairs for the 2B sequences."""
    if isinstance(x, torch.Tensor):
        return torch.cat([x, x])
    return type(x)([*x, *x])


def uses_mrope(model: nn.Module) -> bool:
    """Whether the model's positions are Qwen2-VL-style M-RoPE (3-D rotary positions)."""
    base = backbone(model) if hasattr(model, "base_model") else model
    if hasattr(base, "get_rope_index"):
        return True
    config = getattr(model, "config", None)
    for cfg in (config, getattr(config, "text_config", None)):
        rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None)
        if isinstance(rope, dict) and ("mrope_section" in rope or rope.get("rope_type") ==
                                       "mrope"):
            return True
    return False


def check_packable(model: nn.Module) -> None:
    """Refuse packing where 1-D restarting positions would be wrong."""
    if uses_mrope(model):
        raise ValueError(
            f"{type(model).__name__} uses M-RoPE (Qwen2-VL-style 3-D rotary positions): a "
            "packed row needs [4, 1, N] position ids whose rotary rows restart for every "
            "sequence, which this trainer does not build; train it with packing off "
            "(--no-packing: padded batches, the model computes its own positions)")


def set_attention(model: nn.Module, packed: bool) -> None:
    """Packed batches: "mpo_fast_packed" attention in the language model (the vision tower
    keeps its own); padded batches: "sdpa" (or "eager") with the attention mask."""
    if packed:
        name = register()
    else:  # sdpa where the model supports it (Gemma 2 does not), else eager
        name = "sdpa" if getattr(model, "_supports_sdpa", False) else "eager"
    if "text_config" in getattr(model.config, "sub_configs", {}):
        model.set_attn_implementation({"text_config": name})
    else:
        model.set_attn_implementation(name)


def enable_checkpointing(model: nn.Module) -> None:
    """Recompute each layer's activations in the backward (non-reentrant checkpoints)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


@contextlib.contextmanager
def count_calls(module: nn.Module):
    """Count forward calls of ``module`` (e.g. a vision tower): yields a list whose length
    is the count."""
    calls: list[int] = []
    handle = module.register_forward_hook(lambda *_: calls.append(1))
    try:
        yield calls
    finally:
        handle.remove()
