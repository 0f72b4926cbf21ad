"""A Hugging Face model as backbone + LM head: the one seam between transformers and the fused
loss, used by the trainer (`mpo_fast.train.model.MPOModel`) and the drop-ins
(`mpo_fast.integrations._head`, behind `FusedDPOTrainer`, `patch_model`, `MPOTrainer`).

    hidden  = backbone(model)(...).last_hidden_state     ``model.base_model``: for a VLM the
                                                         module that injects the image features
                                                         (``get_decoder()`` is the text stack only)
    weight, bias = lm_head(model)                        ``[V, H]``, ``[V]`` or None, whole
    with head_precision(weight.device) as dtype:         autocast off, the head's compute dtype
        h, w, b = prepare(hidden, weight, bias, dtype, logit_shape(model).scale)
        logp = fused_logprobs(h, w, targets, bias=b, softcap=logit_shape(model).softcap)

What a config does to the logits (`logit_shape`, one rule for every model family, as TRL 1.16
reads it): z = softcap * tanh(scale * (h W^T + b) / softcap), where

    scale    ``logit_scale`` (Cohere), else ``output_multiplier``, else ``lm_head_multiplier``
             (Falcon-H1), else 1 / ``logits_scaling`` (Granite, MiniCPM3; HyperCLOVA X
             multiplies by it), else 1
    softcap  ``final_logit_softcapping`` (Gemma 2 / 3), else none

The scale is folded into the hidden states and the bias (s (h W^T + b) = (s h) W^T + s b), so
the fused op needs no parameter for it.

Head precision: the head runs with autocast off, in fp32 when asked (TRL's
``cast_lm_head_to_fp32``), else in the autocast dtype when autocast is on (bf16 operands, as
TRL's head), else in the LM-head weight's dtype. Either way the logits tile is accumulated and
soft-maxed in fp32 by the fused op: no logit is ever rounded to bf16 (TRL's head rounds them
before its log-softmax; see docs/DESIGN.md §3.4, precision).

Positions: a packed row needs 1-D position ids restarting per sequence. Qwen2-VL-style M-RoPE
(3-D rotary positions) would silently attend with wrong positions: `check_packable` refuses.

Images: a pair's images are encoded once (`image_features_once`) and the features handed to
the backbone for its chosen and its rejected sequence (``mm_encoder_outputs``).

transformers is never imported here: the seam reads a model's modules and config attributes,
so it sits in the core (it imports nothing from data/, train/ or integrations/).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["IGNORE_INDEX", "LogitShape", "PackingRefused", "backbone", "check_loss_head",
           "check_packable", "head_precision", "image_features_once", "lm_head", "logit_shape",
           "prepare", "text_config", "token_statistics", "twice", "uses_mrope", "whole"]

IGNORE_INDEX = -100
STATISTICS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
_STATS_WORKSPACE_BYTES = 256 * 2**20  # bound of the statistics pass's fp32 logits tiles


# --------------------------------------------------------------------------- the head


def text_config(model: nn.Module):
    """The language model's config (a VLM's ``text_config``, else the model's config)."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        return config.get_text_config()
    return getattr(config, "text_config", None) or config


@dataclass(frozen=True)
class LogitShape:
    """How a config shapes the logits: z = softcap * tanh(scale * (h W^T + b) / softcap)."""

    scale: float = 1.0
    softcap: float | None = None


def logit_shape(model: nn.Module) -> LogitShape:
    """The model's logit scale and soft-cap (the rule of the module docstring)."""
    cfg = text_config(model)
    scale = getattr(cfg, "logit_scale", None)
    for name in ("output_multiplier", "lm_head_multiplier"):
        if scale is None:
            scale = getattr(cfg, name, None)
    if scale is None and getattr(cfg, "logits_scaling", None) is not None:
        s = cfg.logits_scaling
        scale = s if getattr(cfg, "model_type", None) == "hyperclovax" else 1 / s
    return LogitShape(1.0 if scale is None else float(scale),
                      getattr(cfg, "final_logit_softcapping", None))


def backbone(model: nn.Module) -> nn.Module:
    """The module that returns the final hidden states: ``model.base_model`` (for a PEFT model,
    of the model it wraps: the adapters live inside those layers)."""
    if hasattr(model, "get_base_model"):  # peft.PeftModel
        model = model.get_base_model()
    if not hasattr(model, "base_model"):
        raise ValueError(f"{type(model).__name__} has no `base_model` (the backbone to run)")
    return model.base_model


def lm_head(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The output embedding's weight ``[V, H]`` and bias ``[V]`` or None (tied embeddings
    included), whole: an FSDP2-sharded DTensor is gathered (the fused op takes the full head)."""
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embedding (an LM head): the "
                         "fused head needs a causal LM / image-text-to-text model")
    return whole(head.weight), whole(getattr(head, "bias", None))


def whole(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` whole: an FSDP2 DTensor gathered (``full_tensor``), anything else as it is."""
    return t.full_tensor() if type(t).__name__ == "DTensor" else t


@contextlib.contextmanager
def head_precision(device: torch.device, *, fp32: bool = False,
                   dtype: torch.dtype | None = None) -> Iterator[torch.dtype | None]:
    """Autocast off inside; yields the head's compute dtype: fp32 when ``fp32``, else
    ``dtype`` when given, else the autocast dtype when autocast is on, else None (the LM-head
    weight's own dtype, see `prepare`)."""
    device_type = torch.device(device).type
    autocast = torch.is_autocast_enabled(device_type)
    if fp32:
        dtype = torch.float32
    elif dtype is None and autocast:
        dtype = torch.get_autocast_dtype(device_type)
    with torch.autocast(device_type, enabled=False):
        yield dtype


def prepare(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            dtype: torch.dtype | None, scale: float = 1.0):
    """(hidden, weight, bias) on the weight's device in ``dtype`` (None: the weight's), with
    the logit scale folded into the hidden states and the bias. The casts are differentiable:
    an fp32 master weight gets its gradient through a bf16 head."""
    dtype = weight.dtype if dtype is None else dtype
    hidden = hidden.to(weight.device, dtype)
    weight = weight.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    if scale == 1.0:
        return hidden, weight, bias
    return hidden * scale, weight, None if bias is None else bias * scale


def check_loss_head(loss_fn, model: nn.Module, temperature: float = 1.0) -> None:
    """Refuse an `MPOLoss` whose soft-cap or temperature is not the model's head's."""
    cfg, softcap = loss_fn.head_config, logit_shape(model).softcap
    if cfg.softcap != softcap or cfg.temperature != temperature:
        raise ValueError(
            f"the loss's head (softcap={cfg.softcap}, temperature={cfg.temperature}) differs "
            f"from the model's (final_logit_softcapping={softcap}, temperature={temperature}); "
            f"build it as MPOLoss(..., softcap={softcap}, temperature={temperature})")


# --------------------------------------------------------------------------- positions


class PackingRefused(ValueError, NotImplementedError):
    """Packing would give this model wrong positions (M-RoPE); a ValueError for the trainer's
    users and a NotImplementedError for the drop-ins' (what each raised before)."""


def uses_mrope(model: nn.Module) -> bool:
    """Whether the model's positions are Qwen2-VL-style M-RoPE (3-D rotary positions): a
    ``get_rope_index`` on the backbone, or ``mrope_section`` / rope_type "mrope" in the rope
    parameters of the config or its text config."""
    base = getattr(model, "get_base_model", lambda: model)()
    base = getattr(base, "base_model", base)
    if hasattr(base, "get_rope_index"):
        return True
    config = getattr(model, "config", None)
    for cfg in (config, getattr(config, "text_config", None)):
        rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None)
        if isinstance(rope, dict) and ("mrope_section" in rope
                                       or rope.get("rope_type") == "mrope"):
            return True
    return False


def check_packable(model: nn.Module, remedy: str = "keep padding for this model") -> None:
    """Raise `PackingRefused` where 1-D restarting positions would be wrong (M-RoPE)."""
    if uses_mrope(model):
        raise PackingRefused(
            f"{type(model).__name__} uses M-RoPE (Qwen2-VL-style 3-D rotary positions): a "
            "packed row needs [4, 1, N] position ids whose rotary rows restart for every "
            f"sequence, which mpo-fast does not build; {remedy}")


# --------------------------------------------------------------------------- images


def image_features_once(base: nn.Module, pixel_values: torch.Tensor, **extras) -> dict:
    """The B pairs' images encoded once (``base.get_image_features``), as backbone keywords for
    the 2B sequences (chosen B, then rejected B): ``{"mm_encoder_outputs": {"image": f}}``
    with the features' ``pooler_output`` (what the image tokens take) repeated in that order."""
    get = getattr(base, "get_image_features", None)
    if get is None:
        raise ValueError(f"the batch has images but {type(base).__name__} has no "
                         "get_image_features (a text-only model?)")
    features = get(pixel_values=pixel_values, return_dict=True, **extras)
    features.pooler_output = twice(features.pooler_output)
    return {"mm_encoder_outputs": {"image": features}}


def twice(x):
    """Per-pair values (a tensor, or a list / tuple of per-image tensors) for the 2B
    sequences: the B pairs' values, then the same again."""
    if torch.is_tensor(x):
        return torch.cat([x, x])
    return type(x)([*x, *x])


# --------------------------------------------------------------------------- statistics


@torch.no_grad()
def token_statistics(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     targets: torch.Tensor, names: Sequence[str], *, temperature: float = 1.0,
                     softcap: float | None = None) -> dict[str, torch.Tensor]:
    """Per-token statistics of the next-token distribution, for logging (no gradient).

    Args:
        hidden: ``[..., H]``; weight ``[V, H]``; bias ``[V]`` or None (as `prepare` returns
            them); targets ``[...]`` (``hidden.shape[:-1]``), -100 = skipped.
        names: any of "entropy" (-sum p log p), "log_sum_sq_probs" (log sum p^2), "mean_logits"
            (mean of z over the vocabulary), "is_top1" (the target is the first argmax).

    Returns:
        name -> ``targets``-shaped tensor (fp32; bool for is_top1), 0 / False where skipped.
        z = softcap*tanh((h W^T + b)/softcap) / temperature, as `mpo_fast.fused_logprobs`.
        Scored rows go through in chunks whose two fp32 [rows, V] tiles stay under 256 MiB:
        one extra forward GEMM over the vocabulary (2 N H V FLOPs), no [N, V] tensor.
    """
    H, V = weight.shape[1], weight.shape[0]
    flat = targets.reshape(-1)
    rows = (flat != IGNORE_INDEX).nonzero().squeeze(1)
    h2 = hidden.reshape(-1, H)
    out = {n: torch.zeros(flat.shape[0], device=flat.device,
                          dtype=torch.bool if n == "is_top1" else torch.float32) for n in names}
    step = max(1, _STATS_WORKSPACE_BYTES // (2 * 4 * V))  # two fp32 [rows, V] tiles: z, p
    for start in range(0, rows.shape[0], step):
        r = rows[start:start + step]
        z = (h2.index_select(0, r) @ weight.T).float()
        if bias is not None:
            z += bias.float()
        if softcap is not None:
            z = torch.tanh_(z / softcap).mul_(softcap)
        z /= temperature
        t = flat.index_select(0, r)
        if "mean_logits" in names:
            out["mean_logits"][r] = z.mean(-1)
        if "is_top1" in names:
            out["is_top1"][r] = z.argmax(-1) == t
        if "entropy" in names or "log_sum_sq_probs" in names:
            peak = z.amax(-1)
            e = (z - peak[:, None]).exp_()  # p = e / s, one exp pass
            s = e.sum(-1)
            if "entropy" in names:  # -sum p log p = log s + peak - sum p z
                out["entropy"][r] = s.log() + peak - torch.linalg.vecdot(e, z) / s
            if "log_sum_sq_probs" in names:
                out["log_sum_sq_probs"][r] = torch.linalg.vecdot(e, e).log() - 2 * s.log()
    return {n: v.view(targets.shape) for n, v in out.items()}
