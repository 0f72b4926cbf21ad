"""The policy as DDP/FSDP see it: one module whose forward runs the backbone, the LM-head
matmul and the fused MPO loss, so the wrappers see (and reduce) the head's gradients.

    MPOModel(model, loss_fn)(batch, ref_logps) -> MPOOutput
        hidden = backbone(batch)            `mpo_fast.hf_model`: the seam the drop-ins use too
                                            (backbone, LM head, logit scale / soft-cap, head
                                            precision, M-RoPE refusal, images once)
        loss_fn(hidden, lm_head.weight, batch.targets, cu_seqlens=batch.segments, ...)

Images: each pair's images are encoded once and the features reused for its chosen and its
rejected sequence (`mpo_fast.hf_model.image_features_once`).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .. import hf_model
from ..attention import attention_kwargs, register
from ..data.collate import Batch
from ..hf_model import backbone
from ..mpo import MPOLoss, MPOOutput

__all__ = ["MPOModel", "backbone", "check_packable", "count_calls", "enable_checkpointing",
           "head_logprobs", "hidden_states", "load", "logit_softcap", "set_attention"]

TRAINER_REMEDY = ("train it with packing off (--no-packing: padded batches, the model computes "
                  "its own positions)")


def load(name: str, seed: int = 0, *, trust_remote_code: bool = False, revision: str = "",
         torch_dtype: str = "float32", attn_implementation: str = "", chat_template: str = ""):
    """(model, tokenizer, processor) for ``name``: "tiny" builds the bundled model in code,
    "tiny-vl" the bundled tiny InternVL-style VLM (the pair miniature's: `mpo_fast.pairs.tiny`,
    a byte-level BPE tokenizer with a ChatML template, 32 x 32 images as 16 tokens);
    otherwise a Hugging Face path or id — a config with a vision part loads as
    AutoModelForImageTextToText with its AutoProcessor, else AutoModelForCausalLM (processor
    None). Weights load in fp32 (the master copy; autocast runs the bf16 compute) unless
    ``torch_dtype`` says otherwise. ``trust_remote_code``, ``revision`` and
    ``attn_implementation`` go to every ``from_pretrained``; ``chat_template``, a Jinja file,
    replaces the tokenizer's (and processor's) template."""
    if name in ("tiny", "tiny-vl"):
        model, tokenizer, processor = _bundled(name, seed)
        if torch_dtype not in ("float32", "auto"):
            model.to(getattr(torch, torch_dtype))
    else:
        from transformers import (
            AutoConfig,
            AutoModelForCausalLM,
            AutoModelForImageTextToText,
            AutoProcessor,
            AutoTokenizer,
        )

        hub = {"trust_remote_code": trust_remote_code, "revision": revision or None}
        config = AutoConfig.from_pretrained(name, **hub)
        vlm = getattr(config, "vision_config", None) is not None
        cls = AutoModelForImageTextToText if vlm else AutoModelForCausalLM
        dtype = torch_dtype if torch_dtype == "auto" else getattr(torch, torch_dtype)
        extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
        model = cls.from_pretrained(name, dtype=dtype, **hub, **extra)
        processor = AutoProcessor.from_pretrained(name, **hub) if vlm else None
        tokenizer = processor.tokenizer if vlm else AutoTokenizer.from_pretrained(name, **hub)
    if chat_template:
        with open(chat_template, encoding="utf-8") as f:
            template = f.read()
        tokenizer.chat_template = template
        if processor is not None:
            processor.chat_template = template
    return model, tokenizer, processor


def _bundled(name: str, seed: int):
    """The models built in code: "tiny" (a Llama and the word-level tokenizer of the demo's
    task) and "tiny-vl" (the pair miniature's InternVL and its processor)."""
    if name == "tiny":
        from ..data import tiny

        tokenizer = tiny.tiny_tokenizer()
        return tiny.tiny_lm(tokenizer, hidden=128, layers=2, seed=seed), tokenizer, None
    from ..pairs.tiny import build_tiny_vlm, build_tokenizer

    tokenizer = build_tokenizer()
    model, processor = build_tiny_vlm(tokenizer, seed=seed)
    return model.train(), tokenizer, processor


class MPOModel(nn.Module):
    """``model`` (a Hugging Face causal LM or VLM) and ``loss_fn`` (an `MPOLoss`) in one
    forward; ``amp_dtype`` is the dtype the head runs in (bf16 under the trainer's autocast on
    a GPU; None: `mpo_fast.hf_model.head_precision`'s rule)."""

    def __init__(self, model: nn.Module, loss_fn: MPOLoss, amp_dtype: torch.dtype | None = None):
        super().__init__()
        self.model, self.loss_fn, self.amp_dtype = model, loss_fn, amp_dtype
        hf_model.check_loss_head(loss_fn, model)

    def forward(self, batch: Batch, ref_logps: tuple[torch.Tensor, torch.Tensor] | None = None,
                sft_tokens: float | None = None) -> MPOOutput:
        hidden = hidden_states(self.model, batch)
        weight, bias = hf_model.lm_head(self.model)
        with hf_model.head_precision(weight.device, dtype=self.amp_dtype) as dtype:
            h, w, b = hf_model.prepare(hidden, weight, bias, dtype,
                                       hf_model.logit_shape(self.model).scale)
            return self.loss_fn(h, w, batch.targets, cu_seqlens=batch.segments, bias=b,
                                ref_logps=ref_logps, sft_tokens=sft_tokens)


def head_logprobs(model: nn.Module, batch: Batch, amp_dtype: torch.dtype | None = None,
                  backend: str = "auto") -> torch.Tensor:
    """Per-token log p(target) of the batch (the targets' shape, 0 where ignored) through the
    fused head (``backend`` as `fused_logprobs` takes it), with the model's logit scale and
    soft-cap: the reference's log-probs."""
    from ..logprobs import fused_logprobs

    hidden = hidden_states(model, batch)
    weight, bias = hf_model.lm_head(model)
    shape = hf_model.logit_shape(model)
    with hf_model.head_precision(weight.device, dtype=amp_dtype) as dtype:
        h, w, b = hf_model.prepare(hidden, weight, bias, dtype, shape.scale)
        return fused_logprobs(h.reshape(*batch.targets.shape, -1), w, batch.targets, bias=b,
                              softcap=shape.softcap, backend=backend)


def logit_softcap(model: nn.Module) -> float | None:
    """The model's final logit soft-cap, for `MPOLoss(softcap=...)` (`hf_model.logit_shape`)."""
    return hf_model.logit_shape(model).softcap


def check_packable(model: nn.Module) -> None:
    """Refuse packing where 1-D restarting positions would be wrong (`hf_model`'s rule)."""
    hf_model.check_packable(model, TRAINER_REMEDY)


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
        if not hf_model.uses_mrope(model):  # M-RoPE models compute their own 3-D positions
            kwargs["position_ids"] = batch.position_ids
        input_ids = batch.input_ids
    if batch.pixel_values is not None:
        kwargs.update(hf_model.image_features_once(base, batch.pixel_values,
                                                   **batch.image_kwargs))
        kwargs.update({k: hf_model.twice(v) for k, v in batch.image_kwargs.items()})
    return base(input_ids=input_ids, **kwargs).last_hidden_state


def set_attention(model: nn.Module, packed: bool, padded: str = "") -> None:
    """Packed batches: "mpo_fast_packed" attention in the language model (the vision tower
    keeps its own); padded batches: ``padded`` if given (``--attn-implementation``), else
    "sdpa" (or "eager") with the attention mask."""
    if packed:
        name = register()
    elif padded:
        name = padded
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
