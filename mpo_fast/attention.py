"""Attention over packed sequences, for Hugging Face models (docs/DESIGN.md §4).

A packed row holds many sequences back to back (`mpo_fast.packing.pack`); attention must stay
inside each one. `varlen_attention` does that on ``[N, H, D]`` tensors, with the first of these
that can serve the call:

    "flash_attn"  flash-attn's ``flash_attn_varlen_func`` (CUDA, fp16/bf16, when installed)
    "varlen"      torch's ``torch.nn.attention.varlen.varlen_attn`` (CUDA, fp16/bf16, torch
                  versions that have it; no dropout or softcap)
    "sdpa"        ``scaled_dot_product_attention``, any device and dtype. On a CPU (where
                  reading the offsets costs nothing) one call per sequence, O(sum L^2) work;
                  on a GPU one call with a block-diagonal (causal) boolean mask built from
                  the sequence ids, O(N^2) bits of mask and no host sync: the fallback there

For Hugging Face models, `register()` adds ``packed_attention_forward`` to
``transformers.AttentionInterface`` under the name ``"mpo_fast_packed"``:

    from mpo_fast import MPOLoss, attention, packing
    attention.register()
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="mpo_fast_packed")
    p = packing.pack(input_ids, lengths)                 # [S, T] -> one row of N tokens
    out = model.model(**attention.model_inputs(p))       # last_hidden_state [1, N, H]
    targets = p.shift_targets(completion_mask)           # [N]
    loss = MPOLoss()(out.last_hidden_state, model.lm_head.weight, targets,
                     cu_seqlens=p.segments, ref_logps=(ref_chosen, ref_rejected)).loss

`MPOLoss` takes the model's ``[1, N, H]`` as it comes (the batch dimension of one is the
packed row), and ``p.segments`` without reading it back from the GPU.

`model_inputs` passes ``position_ids`` (restarting at 0 per sequence, for the rotary
embeddings) and the packer's ``cu_seq_lens_q/k`` and ``max_length_q/k`` (transformers'
FlashAttentionKwargs names, so the same call also drives transformers' own flash-attention
implementations). The model hands these keyword arguments down to every attention layer
unchanged: no layer recomputes the boundaries or reads anything back from the GPU. Without
them the layer falls back to the boundaries implied by ``position_ids`` (a new sequence wherever
the position does not grow by one), which costs a host sync per layer on the varlen paths.

Scope: training-time self-attention over packed or unpadded rows. transformers builds no mask
for this implementation (none is registered), so a 2-D padding ``attention_mask`` is ignored:
pack the batch instead of padding it. A KV cache (query shorter than keys) is refused; use
"sdpa" for generation.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import itertools
import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .backend import CHOICES, requested
from .layout import Segments, check_cu_seqlens

if TYPE_CHECKING:
    from .packing import Packed

__all__ = [
    "ATTENTION_NAME",
    "attention_kwargs",
    "model_inputs",
    "packed_attention_forward",
    "register",
    "varlen_attention",
]

ATTENTION_NAME = "mpo_fast_packed"
BACKENDS = CHOICES["attention"]
_HALF = (torch.float16, torch.bfloat16)


def register(name: str = ATTENTION_NAME) -> str:
    """Register `packed_attention_forward` in ``transformers.AttentionInterface`` (idempotent);
    returns the name to pass as ``attn_implementation``."""
    from transformers import AttentionInterface

    AttentionInterface.register(name, packed_attention_forward)
    return name


def attention_kwargs(segments: Segments | Packed) -> dict:
    """The keyword arguments that carry a batch's boundaries (a `Segments`, or the `Packed`
    batch that carries one) to every layer: flash-attention's ``cu_seqlens`` + ``max_seqlen``
    under transformers' FlashAttentionKwargs names."""
    segs = _segments_of(segments)
    return {
        "cu_seq_lens_q": segs.cu_seqlens,
        "cu_seq_lens_k": segs.cu_seqlens,
        "max_length_q": segs.max_seqlen,
        "max_length_k": segs.max_seqlen,
    }


def model_inputs(packed: Packed) -> dict:
    """Model inputs for a `Packed` batch as one row: ``input_ids`` ``[1, N]`` (or
    ``inputs_embeds`` ``[1, N, H]`` when the packed tokens are embeddings), ``position_ids``
    ``[1, N]`` and `attention_kwargs`."""
    key = "input_ids" if packed.tokens.dim() == 1 else "inputs_embeds"
    return {key: packed.tokens.unsqueeze(0), "position_ids": packed.position_ids.unsqueeze(0),
            **attention_kwargs(packed.segments)}


def varlen_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens: torch.Tensor | Segments,
    max_seqlen: int | None = None,
    *,
    scale: float | None = None,
    causal: bool = True,
    sliding_window: int | None = None,
    softcap: float | None = None,
    dropout: float = 0.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention inside each packed sequence; zero attention across boundaries.

    Args:
        query: ``[N, Hq, D]``; key: ``[N, Hkv, D]``; value: ``[N, Hkv, Dv]`` with Hq a
            multiple of Hkv (grouped-query attention).
        cu_seqlens: a `Segments` (from `mpo_fast.packing.pack(...).segments`: its offsets,
            max_seqlen and cached sequence ids are used as they are), or int32 ``[S + 1]``
            offsets: sequence s is rows ``cu_seqlens[s] .. cu_seqlens[s+1]``; rows past
            ``cu_seqlens[-1]`` (if any) form one more sequence.
        max_seqlen: longest sequence (an upper bound is fine) when ``cu_seqlens`` is a tensor;
            only the varlen kernels need it, and computing it when it is None costs a host
            sync.
        scale: score scale, default ``1 / sqrt(D)``.
        causal: token i sees tokens j <= i of its own sequence (else the whole sequence).
        sliding_window: if set, token i sees only j with ``i - j < sliding_window``
            (transformers' convention).
        softcap: if set, scores become ``softcap * tanh(scores / softcap)`` before the softmax.
        dropout: attention dropout probability (training).
        backend: ``"auto"``, ``"flash_attn"``, ``"varlen"`` or ``"sdpa"`` (see the module
            doc).

    Returns:
        ``[N, Hq, Dv]`` in the dtype of ``query``.
    """
    segs = cu_seqlens if isinstance(cu_seqlens, Segments) else None
    if segs is not None:
        cu_seqlens, max_seqlen = segs.cu_seqlens, segs.max_seqlen
    _check_qkv(query, key, value, cu_seqlens, trusted=segs is not None)
    backend = requested("attention", backend)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    if sliding_window is not None and sliding_window <= 0:
        raise ValueError(f"sliding_window must be positive, got {sliding_window}")
    args = (query, key, value, cu_seqlens, max_seqlen, scale, causal, sliding_window, softcap,
            dropout)
    if backend == "auto":
        backend = _pick(*args)
    if backend == "flash_attn":
        return _flash_attn(*args)
    if backend == "varlen":
        if not _varlen_can_serve(*args):
            raise ValueError("backend='varlen' cannot serve this call (needs CUDA fp16/bf16, "
                             "no dropout or softcap, and a torch with varlen_attn)")
        return _torch_varlen(*args)
    if query.device.type == "cpu":
        return _per_sequence_attention(query, key, value, cu_seqlens, scale, causal,
                                       sliding_window, softcap, dropout)
    if segs is not None and segs.num_tokens == query.shape[0]:
        seq_ids = segs.seq_ids  # cached on the Segments: made once for every layer
    else:
        seq_ids = _seq_ids_from_cu(cu_seqlens, query.shape[0])
    return _masked_attention(query, key, value, seq_ids, scale, causal, sliding_window, softcap,
                             dropout)


def packed_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    s_aux: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: ``query [B, Hq, L, D]``, ``key/value [B, Hkv, L, D]``
    -> ``([B, L, Hq, D], None)``. The B rows are flattened into one stream of B*L tokens,
    split by ``cu_seq_lens_q`` when given, else by ``position_ids``, else one sequence per
    row."""
    if attention_mask is not None:
        raise ValueError(f"{ATTENTION_NAME} takes no attention_mask: pack the batch "
                         "(mpo_fast.packing.pack) and pass attention.model_inputs(p)")
    if s_aux is not None:
        raise NotImplementedError(f"{ATTENTION_NAME} does not support attention sinks (s_aux)")
    B, Hq, L, _ = query.shape
    if key.shape[2] != L:
        raise ValueError(f"{ATTENTION_NAME} is for training-time self-attention: query has {L} "
                         f"positions but key has {key.shape[2]} (a KV cache?); use 'sdpa'")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    q, k, v = (t.transpose(1, 2).reshape(B * L, t.shape[1], t.shape[3])
               for t in (query, key, value))
    cu = kwargs.get("cu_seq_lens_q")
    max_len = kwargs.get("max_length_q")
    if cu is None:
        cu, max_len = _boundaries(kwargs.get("position_ids"), B, L, query.device)
    out = varlen_attention(q, k, v, cu, max_len, scale=scaling, causal=bool(causal),
                           sliding_window=sliding_window, softcap=softcap, dropout=dropout)
    return out.reshape(B, L, Hq, value.shape[3]), None


# --------------------------------------------------------------------------- helpers


def _segments_of(layout) -> Segments:
    segs = getattr(layout, "segments", layout)
    if not isinstance(segs, Segments):
        raise TypeError(f"expected a mpo_fast.layout.Segments or a packing.Packed batch, got "
                        f"{type(layout).__name__}")
    return segs


def _check_qkv(q, k, v, cu, trusted: bool):
    for name, t in (("query", q), ("key", k), ("value", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"query/key/value must be [N, H, D], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.shape[0] == k.shape[0] == v.shape[0]) or k.shape[1] != v.shape[1]:
        raise ValueError(f"key and value must match query's N and each other's heads, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[1] % k.shape[1] or q.shape[2] != k.shape[2]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key heads "
                         f"({k.shape[1]}) and head dims must match ({q.shape[2]} vs {k.shape[2]})")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"query, key and value must share a device, got {q.device}, "
                         f"{k.device}, {v.device}")
    # values are read only on the CPU (no sync), and never for the packer's Segments
    check_cu_seqlens(cu, q.device, owner="query", read="never" if trusted else "cpu")


def _boundaries(position_ids, B: int, L: int, device) -> tuple[torch.Tensor, int | None]:
    """cu_seqlens when the caller passed none: from position_ids, else one sequence per row."""
    if position_ids is None:
        cu = torch.arange(0, (B + 1) * L, L, dtype=torch.int32, device=device)
        return cu, L
    if position_ids.dim() != 2:
        raise ValueError(f"{ATTENTION_NAME}: multi-axis position_ids (shape "
                         f"{tuple(position_ids.shape)}, e.g. M-RoPE) do not mark sequence "
                         "boundaries; pass cu_seq_lens_q (attention.model_inputs does)")
    pos = position_ids.expand(B, L).reshape(-1)
    start = torch.ones_like(pos, dtype=torch.bool)
    start[1:] = pos[1:] != pos[:-1] + 1
    start[::L] = True  # every row starts a sequence
    begins = start.nonzero().squeeze(1)  # host sync: pass cu_seq_lens_q to avoid it
    cu = torch.cat([begins, begins.new_tensor([B * L])]).to(torch.int32)
    return cu, None


def _seq_ids_from_cu(cu: torch.Tensor, N: int) -> torch.Tensor:
    """int64 [N]: the sequence of each row (rows past cu[-1] get S); no host sync."""
    rows = torch.arange(N, device=cu.device)
    return torch.searchsorted(cu[1:].to(torch.int64).contiguous(), rows, right=True)


def _max_seqlen(cu: torch.Tensor, max_seqlen: int | None) -> int:
    if max_seqlen is not None:
        return int(max_seqlen)
    return int((cu[1:] - cu[:-1]).max()) if cu.shape[0] > 1 else 0


def _window(causal: bool, sliding_window: int | None) -> tuple[int, int]:
    left = -1 if sliding_window is None else sliding_window - 1
    right = 0 if causal else left
    return left, right


@functools.cache
def _flash_attn_fn():
    if importlib.util.find_spec("flash_attn") is None:
        return None
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


@functools.cache
def _varlen_fn():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, frozenset()
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def _pick(q, k, v, cu, max_seqlen, scale, causal, window, softcap, dropout) -> str:
    if q.device.type == "cuda" and q.dtype in _HALF and q.shape[-1] == v.shape[-1]:
        if _flash_attn_fn() is not None and q.shape[-1] <= 256:
            return "flash_attn"
        if _varlen_can_serve(q, k, v, cu, max_seqlen, scale, causal, window, softcap, dropout):
            return "varlen"
    return "sdpa"


def _varlen_can_serve(q, k, v, cu, max_seqlen, scale, causal, window, softcap,
                      dropout) -> bool:
    fn, params = _varlen_fn()
    if fn is None or q.device.type != "cuda" or q.dtype not in _HALF:
        return False
    if dropout > 0.0 or softcap is not None or q.shape[-1] != v.shape[-1]:
        return False
    if "window_size" not in params and (window is not None or "is_causal" not in params):
        return False
    return "scale" in params or math.isclose(scale, 1.0 / math.sqrt(q.shape[-1]))


def _flash_attn(q, k, v, cu, max_seqlen, scale, causal, window, softcap, dropout):
    fn = _flash_attn_fn()
    if fn is None:
        raise ValueError("backend='flash_attn' but flash-attn is not installed")
    m = _max_seqlen(cu, max_seqlen)
    extra = {} if softcap is None else {"softcap": float(softcap)}
    return fn(q, k, v, cu, cu, m, m, dropout_p=dropout, softmax_scale=scale, causal=causal,
              window_size=_window(causal, window), **extra)


def _torch_varlen(q, k, v, cu, max_seqlen, scale, causal, window, softcap, dropout):
    fn, params = _varlen_fn()
    m = _max_seqlen(cu, max_seqlen)
    kw = {}
    if "window_size" in params:
        kw["window_size"] = _window(causal, window)
    else:
        kw["is_causal"] = causal
    if "scale" in params:
        kw["scale"] = scale
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return fn(q, k, v, cu, cu, m, m, **kw)


def _per_sequence_attention(q, k, v, cu, scale, causal, window, softcap, dropout):
    """One attention call per sequence (the CPU path: the offsets are on the host already)."""
    N = q.shape[0]
    bounds = cu.tolist()
    if bounds[-1] < N:  # rows past cu[-1] form one more sequence
        bounds.append(N)
    outs = [_masked_attention(q[a:b], k[a:b], v[a:b], None, scale, causal, window, softcap,
                              dropout) for a, b in itertools.pairwise(bounds) if b > a]
    if not outs:
        return q.new_empty(0, q.shape[1], v.shape[2])
    return torch.cat(outs) if len(outs) > 1 else outs[0]


def _masked_attention(q, k, v, seq_ids, scale, causal, window, softcap, dropout):
    """Attention of the rows in one call; ``seq_ids`` None means they are one sequence."""
    N = q.shape[0]
    pos = torch.arange(N, device=q.device)
    masks = []
    if seq_ids is not None:
        masks.append(seq_ids[:, None] == seq_ids[None, :])
    if window is not None:
        masks.append((pos[:, None] - pos[None, :]).abs() < window)
    if causal and (masks or softcap is not None):  # else sdpa's is_causal needs no mask
        masks.append(pos[None, :] <= pos[:, None])
    allowed = functools.reduce(torch.logical_and, masks) if masks else None
    qh, kh, vh = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # [1, H, N, D]
    if softcap is None:
        gqa = {"enable_gqa": True} if qh.shape[1] != kh.shape[1] else {}
        # one causal sequence: no mask at all, so sdpa can take its flash kernel
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=allowed, dropout_p=dropout,
                                             scale=scale, is_causal=causal and allowed is None,
                                             **gqa)
    else:
        rep = qh.shape[1] // kh.shape[1]
        kh, vh = kh.repeat_interleave(rep, dim=1), vh.repeat_interleave(rep, dim=1)
        acc = torch.promote_types(q.dtype, torch.float32)
        scores = (qh.to(acc) @ kh.to(acc).transpose(-1, -2)) * scale
        scores = softcap * torch.tanh(scores / softcap)
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        probs = scores.softmax(-1).to(q.dtype)
        probs = F.dropout(probs, p=dropout, training=dropout > 0.0)
        out = probs @ vh
    return out[0].transpose(0, 1)
