"""The fused LM head inside a Hugging Face model's forward (shared by `hf` and `trl`).

What a model's head is (backbone, LM head, logit scale and soft-cap, head precision, M-RoPE,
images once, token statistics) is `mpo_fast.hf_model`, the seam the trainer's `MPOModel`
uses too; this module is only the forward swap and its call conventions.

`install(model, ...)` replaces the model instance's ``forward`` (not its class) with one that,
when asked for a training forward, runs the backbone (``model.base_model``: for a VLM that
includes the image injection), and turns the final hidden states into what the caller needs
with mpo-fast's kernels, never building ``[N, V]`` logits:

    model(..., labels=labels)                  per-token log-probs + the token-mean NLL
    model(..., labels=labels, mpo_loss=fn,     the whole preference loss (`mpo_fast.MPOLoss`),
          ref_logps=(ref_chosen, ref_rejected))  its metrics and sequence log-probs; or the
          or ref_hidden=h0, ref_weight=w0)     reference's hidden states and head, scored in
                                               the same pass (same rows, same reductions)
    model(..., fused_lm_head=True)             the same call convention as TRL >= 1.15
    model(..., return_hidden_states=True)      the backbone's last_hidden_state only
    model(..., labels=labels,                  also [S] sequence sums, reduced exactly as
          return_sequence_logps=True)          MPOLoss reduces the policy's on this layout

Every other call (no labels, no ``mpo_loss``, no ``fused_lm_head``) goes to the original
forward, so ``generate`` and logits-based evaluation are unchanged. Because the head runs inside
``forward``, DDP / FSDP see the LM head's use and reduce its gradients like any other layer's.

Label conventions (as TRL's ``add_fused_lm_head`` and HF's losses):
    labels       [B, T] unshifted (HF): the hidden state at t scores labels[t + 1]; per-token
                 outputs are [B, T - 1]
    shift_labels [B, T] already shifted; per-token outputs are [B, T]
    cu_seqlens   packed rows: input_ids [1, N] (+ position_ids), shift_labels [1, N] shifted
                 inside each sequence (`mpo_fast.packing.shift_targets`); cu_seqlens the
                 packer's `mpo_fast.Segments` (trusted, not read back) or int32 offsets
                 [S + 1] (checked by `Segments.from_cu_seqlens`: one host read)

Options fixed at install time (`FusedHead`): which per-token statistics to return (entropy,
mean logit, top-1 hit, log sum p^2: one extra no-grad pass over the vocabulary, chunked),
whether to pack a padded batch into one row inside the forward (padding-free: position ids
restart per sequence and no attention mask is passed, so transformers' sdpa/eager/flex mask
keeps attention inside each sequence, and the flash-attention implementations or
`mpo_fast.attention` read the cu_seq_lens kwargs), whether to encode a pair's
images once when the collator repeated them for chosen and rejected, the temperature, the
fp32 head of TRL's ``cast_lm_head_to_fp32``, and the kernel backend.

Precision (`mpo_fast.hf_model.head_precision`): autocast off; the operands in the autocast
dtype under autocast (as TRL's head), else in the LM-head weight's dtype; the logits are
accumulated and soft-maxed in fp32, never rounded to bf16 (TRL's head rounds them).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import types
from dataclasses import dataclass, replace

import torch
from transformers.utils import ModelOutput

from .. import attention, hf_model, packing
from ..hf_model import IGNORE_INDEX, STATISTICS
from ..layout import Segments
from ..logprobs import fused_logprobs
from ..mpo import MPOLoss, load_loss_state, save_loss_state

__all__ = ["STATISTICS", "FusedHead", "FusedOutput", "frozen_loss_state", "install",
           "installed", "load_checkpoint_loss_state", "save_checkpoint_loss_state",
           "uninstall"]

OUTPUTS = ("log_probs", "hidden_states", *STATISTICS)
# attention implementations that already honour packed rows (cu_seq_lens_q / position_ids)
_PACKED_CAPABLE = ("flash_attention_2", "flash_attention_3", attention.ATTENTION_NAME)


@dataclass
class FusedOutput(ModelOutput):
    """What a fused call returns. Per-token fields have the targets' layout (see the module
    docstring), are fp32 (``is_top1``, ``label_mask``: bool) and 0 / False where the label is
    -100; fields that were not asked for are None.

    Args:
        loss: the token-mean NLL (sum over labelled tokens / their count, or / num_items_in_batch),
            or the preference loss when called with ``mpo_loss``; plus the router loss of a MoE
            model weighted by its config's ``router_aux_loss_coef`` (not with ``mpo_loss``).
        log_probs: log p(label) per token (not computed with ``mpo_loss``).
        entropy, log_sum_sq_probs, mean_logits, is_top1: per-token statistics, no gradient.
        label_mask: labels != -100.
        aux_loss: MoE load-balancing loss, when router logits were requested.
        chosen_logps, rejected_logps: ``[B]`` summed completion log-probs (``mpo_loss`` only).
        metrics: `mpo_fast.MPOLoss` metrics, TRL names (``mpo_loss`` only).
        sequence_logps: ``[S]`` summed log-probs per sequence (``return_sequence_logps=True``).
        last_hidden_state: the backbone's final hidden states (``output="hidden_states"`` or
            ``return_hidden_states=True``).
    """

    loss: torch.Tensor | None = None
    log_probs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    log_sum_sq_probs: torch.Tensor | None = None
    mean_logits: torch.Tensor | None = None
    is_top1: torch.Tensor | None = None
    label_mask: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    chosen_logps: torch.Tensor | None = None
    rejected_logps: torch.Tensor | None = None
    metrics: dict | None = None
    sequence_logps: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None


@dataclass(frozen=True)
class FusedHead:
    """The options `install` binds to a model (see the module docstring)."""

    outputs: tuple[str, ...] = ("log_probs",)
    temperature: float = 1.0
    fp32: bool = False  # TRL's cast_lm_head_to_fp32
    pack: bool = False
    encode_images_once: bool = False
    backend: str = "auto"

    def __post_init__(self):
        outputs = (self.outputs,) if isinstance(self.outputs, str) else tuple(self.outputs)
        unknown = [o for o in outputs if o not in OUTPUTS]
        if unknown:
            raise ValueError(f"unknown outputs {unknown}; choose from {list(OUTPUTS)}")
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            raise ValueError(f"temperature must be a number > 0, got {self.temperature!r}")
        object.__setattr__(self, "outputs", outputs)

    @property
    def statistics(self) -> tuple[str, ...]:
        return tuple(o for o in self.outputs if o in STATISTICS)


# --------------------------------------------------------------------------- install / undo


def install(model: torch.nn.Module, head: FusedHead | None = None, **options) -> FusedHead:
    """Give ``model`` (a Hugging Face ``PreTrainedModel`` with an output embedding) the fused
    forward; ``options`` are `FusedHead` fields. Installing again replaces the options (the
    original forward is kept). Returns the options in force."""
    head = replace(head or FusedHead(), **options) if options else (head or FusedHead())
    hf_model.lm_head(model)  # raise now, naming the model, if it has no LM head
    hf_model.backbone(model)  # or no backbone
    state = model.__dict__.get("_mpo_fast_head")
    if state is None:
        previous = model.__dict__.get("forward")  # an instance-level forward someone set before
        model._mpo_fast_head = types.SimpleNamespace(head=head, previous=previous)
        model.forward = types.MethodType(_fused_forward_of(type(model)), model)
    else:
        state.head = head
    return head


def uninstall(model: torch.nn.Module) -> bool:
    """Undo `install`: the model's forward is what it was before. False if not installed."""
    state = model.__dict__.pop("_mpo_fast_head", None)
    if state is None:
        return False
    if state.previous is None:
        model.__dict__.pop("forward", None)
    else:
        model.forward = state.previous
    return True


def installed(model: torch.nn.Module) -> FusedHead | None:
    """The options of the fused head installed on ``model``, or None."""
    state = model.__dict__.get("_mpo_fast_head")
    return None if state is None else state.head


@dataclass
class _Call:
    """The fused-call keywords of one forward (see the module docstring)."""

    labels: torch.Tensor | None = None
    shift_labels: torch.Tensor | None = None
    num_items_in_batch: torch.Tensor | int | None = None
    mpo_loss: MPOLoss | None = None
    ref_logps: tuple[torch.Tensor, torch.Tensor] | None = None
    ref_hidden: torch.Tensor | None = None  # the reference's hidden states, same layout
    ref_weight: torch.Tensor | None = None  # the reference's LM head
    ref_bias: torch.Tensor | None = None
    cu_seqlens: Segments | torch.Tensor | None = None  # the caller's packing
    max_seqlen: int | None = None  # accepted; the Segments know it (or it is read and checked)
    return_hidden_states: bool = False  # this call: the backbone's output only
    return_sequence_logps: bool = False  # also [S] sums, reduced as MPOLoss reduces them


_CALL_KEYS = frozenset(_Call.__dataclass_fields__)


def _fused_forward_of(cls):
    # keep the class forward's signature: `generate` and HF Trainer inspect it
    @functools.wraps(cls.forward)
    def forward(self, *args, fused_lm_head: bool = False, **kwargs):
        state = self.__dict__["_mpo_fast_head"]
        call = _Call(**{k: kwargs.pop(k) for k in _CALL_KEYS & kwargs.keys()})
        fused = fused_lm_head or any(v is not None for v in (
            call.labels, call.shift_labels, call.mpo_loss, call.cu_seqlens))
        if not fused and not call.return_hidden_states:
            original = state.previous or types.MethodType(cls.forward, self)
            if call.num_items_in_batch is not None:
                kwargs["num_items_in_batch"] = call.num_items_in_batch
            return original(*args, **kwargs)
        return _run(self, state.head, args, kwargs, call)

    return forward


# --------------------------------------------------------------------------- the fused call


@dataclass
class _Layout:
    """Where the tokens are: padded [S, T] (maybe packed for the call) or caller-packed."""

    targets: torch.Tensor  # scored positions of the hidden states, -100 elsewhere
    shape: tuple[int, ...]  # per-token outputs' shape before `drop_last`
    segments: Segments | None = None  # packed rows (the caller's, or ours)
    packed: packing.Packed | None = None  # set when this forward packed a padded batch
    drop_last: bool = False  # `labels` convention: outputs are [S, T - 1]

    def per_token(self, values: torch.Tensor | None) -> torch.Tensor | None:
        """Per-token values (any shape with the targets' numel) in the caller's layout."""
        if values is None:
            return None
        values = values.reshape(-1)
        values = self.packed.unpack(values) if self.packed is not None else values.view(self.shape)
        return values[:, :-1] if self.drop_last else values

    def sequence_sums(self, values: torch.Tensor) -> torch.Tensor:
        """[S] per-sequence sums of per-token values, reduced as `MPOLoss`'s torch epilogue
        reduces the policy's (`Segments.sum` of the same layout): a reference computed here
        and a policy equal to it give bitwise-equal sums, so rewards tie exactly at 0."""
        segs = self.segments
        if segs is None:
            S = self.shape[0] if len(self.shape) > 1 else 1
            segs = Segments.padded(S, values.numel() // S, values.device)
        return segs.sum(values.reshape(-1))


def _run(model, head: FusedHead, args, kwargs, call: _Call) -> FusedOutput:
    text_config = model.config.get_text_config()
    kwargs["use_cache"] = False
    if getattr(text_config, "output_router_logits", False) and call.mpo_loss is None:
        kwargs.setdefault("output_router_logits", True)
    if args:  # HF forwards take input_ids first
        kwargs["input_ids"], args = args[0], args[1:]
        if args:
            raise TypeError("the fused forward takes input_ids positionally, the rest by name")
    layout = _layout(model, head, kwargs, call)
    base = hf_model.backbone(model)
    if head.encode_images_once:
        _encode_images_once(base, kwargs)
    backbone = base(**kwargs)
    hidden = backbone.last_hidden_state
    if call.mpo_loss is None and (call.return_hidden_states or "hidden_states" in head.outputs):
        return FusedOutput(last_hidden_state=hidden,
                           label_mask=layout.per_token(layout.targets != IGNORE_INDEX))

    logits = hf_model.logit_shape(model)
    weight, bias = hf_model.lm_head(model)
    targets = layout.targets.to(weight.device)
    with hf_model.head_precision(weight.device, fp32=head.fp32) as dtype:
        h, w, b = hf_model.prepare(hidden, weight, bias, dtype, logits.scale)
        out = FusedOutput()
        if call.mpo_loss is not None:
            hf_model.check_loss_head(call.mpo_loss, model, head.temperature)
            ref = {"ref_logps": call.ref_logps}
            if call.ref_hidden is not None:
                rh, rw, rb = hf_model.prepare(call.ref_hidden, hf_model.whole(call.ref_weight),
                                              hf_model.whole(call.ref_bias), dtype, logits.scale)
                ref = {"ref_hidden": rh, "ref_weight": rw, "ref_bias": rb}
            res = call.mpo_loss(h, w, targets, cu_seqlens=layout.segments, bias=b, **ref)
            out.loss, out.metrics = res.loss, res.metrics
            out.chosen_logps, out.rejected_logps = res.chosen_logps, res.rejected_logps
        else:
            logp = fused_logprobs(h, w, targets.view(h.shape[:-1]), bias=b,
                                  temperature=head.temperature, softcap=logits.softcap,
                                  backend=head.backend)
            if call.num_items_in_batch is None:
                out.loss = -logp.sum() / (targets != IGNORE_INDEX).sum().clamp(min=1)
            else:
                out.loss = -logp.sum() / call.num_items_in_batch
            out.log_probs = layout.per_token(logp)
            if call.return_sequence_logps:
                out.sequence_logps = layout.sequence_sums(logp)
        if head.statistics:
            stats = hf_model.token_statistics(h, w, b, targets.view(h.shape[:-1]), head.statistics,
                                     temperature=head.temperature, softcap=logits.softcap)
            for name, value in stats.items():
                setattr(out, name, layout.per_token(value))
    out.label_mask = layout.per_token(targets != IGNORE_INDEX)
    if kwargs.get("output_router_logits") and getattr(backbone, "router_logits", None) is not None:
        out.aux_loss = _router_loss(text_config, backbone, kwargs)
        if call.mpo_loss is None:
            coef = getattr(text_config, "router_aux_loss_coef", 0.0)
            out.loss = out.loss + coef * out.aux_loss
    return out


def _layout(model, head, kwargs, call: _Call) -> _Layout:
    """Work out the targets and the packing of this call; edits ``kwargs`` for the backbone."""
    labels, shift_labels, cu_seqlens = call.labels, call.shift_labels, call.cu_seqlens
    if labels is not None and shift_labels is not None:
        raise ValueError("pass labels (unshifted) or shift_labels (shifted), not both")
    if cu_seqlens is not None:  # the caller packed the batch
        if shift_labels is None:
            raise ValueError("a packed call (cu_seqlens) needs shift_labels [1, N], shifted "
                             "inside each sequence (mpo_fast.packing.shift_targets)")
        if kwargs.get("attention_mask") is not None:
            raise ValueError("a packed call (cu_seqlens) takes no attention_mask")
        hf_model.check_packable(model)
        _check_packed_attention(model)
        segs = _caller_segments(cu_seqlens, shift_labels)
        kwargs.update(attention.attention_kwargs(segs))
        return _Layout(shift_labels.reshape(-1), tuple(shift_labels.shape), segs)
    if labels is None and shift_labels is None:
        if "hidden_states" not in head.outputs and not call.return_hidden_states:
            raise ValueError("a fused call needs labels (or shift_labels, or mpo_loss with "
                             "labels): the fused head scores the next-token labels")
        ids = kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        labels = torch.full(ids.shape[:2], IGNORE_INDEX, dtype=torch.long, device=ids.device)
        shift_labels = labels
    if shift_labels is not None:
        targets, drop_last = shift_labels, False
    else:
        targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        drop_last = True
    mask = kwargs.get("attention_mask")
    if not head.pack or mask is None or mask.dim() != 2:
        return _Layout(targets, tuple(targets.shape), drop_last=drop_last)
    return _pack_call(model, kwargs, targets, mask, drop_last)


def _caller_segments(cu_seqlens, shift_labels: torch.Tensor) -> Segments:
    """The caller's packing as `Segments`: a `Segments` (the packer's, e.g. from
    `hf.PreferenceCollator`) is trusted and only moved to the tokens' device; bare int32
    offsets go through `Segments.from_cu_seqlens`, the one checked constructor (one host read)."""
    N, device = shift_labels.numel(), shift_labels.device
    if isinstance(cu_seqlens, Segments):
        segs = cu_seqlens
        if segs.device != device:
            segs = Segments(segs.cu_seqlens.to(device), segs.num_tokens, segs.max_seqlen)
    else:
        segs = Segments.from_cu_seqlens(cu_seqlens, N, owner="shift_labels")
    segs.check_tokens(N, device, owner="shift_labels")
    return segs


def _pack_call(model, kwargs, targets, mask, drop_last) -> _Layout:
    """Padding-free: the right-padded [S, T] batch becomes one row of N real tokens."""
    hf_model.check_packable(model)
    _check_packed_attention(model)
    lengths = mask.sum(1)
    real = torch.arange(mask.shape[1], device=mask.device) < lengths[:, None]
    if not torch.equal(real, mask.bool()):
        raise ValueError("padding-free packing needs right-padded rows (attention_mask 1...1 "
                         "0...0); got left padding or holes")
    key = "input_ids" if kwargs.get("input_ids") is not None else "inputs_embeds"
    p = packing.pack(kwargs[key], lengths)
    S, T = mask.shape
    for name, value in list(kwargs.items()):  # token-aligned extras: token_type_ids, ...
        if name != key and torch.is_tensor(value) and tuple(value.shape[:2]) == (S, T):
            kwargs[name] = p.pack_like(value).unsqueeze(0)
    kwargs.pop("attention_mask")
    kwargs[key] = p.tokens.unsqueeze(0)
    kwargs["position_ids"] = p.position_ids.unsqueeze(0)
    kwargs.update(attention.attention_kwargs(p.segments))
    return _Layout(p.pack_like(targets), (S, T), p.segments, p, drop_last)


def _check_packed_attention(model):
    """A packed row needs attention that stays inside each sequence. transformers >= 5 builds
    that mask itself from position ids restarting at 0 (sdpa, eager, flex); the flash-attention
    implementations and mpo_fast's read cu_seq_lens. Older transformers would attend across
    sequences without a word: refuse."""
    impl = model.config.get_text_config()._attn_implementation
    if impl in _PACKED_CAPABLE:
        return
    from transformers import masking_utils

    if not hasattr(masking_utils, "find_packed_sequence_indices"):
        raise NotImplementedError(
            f"padding-free packing with attn_implementation={impl!r} needs transformers >= 5 "
            "(which masks packed rows by their position ids); load the model with "
            "attn_implementation='flash_attention_2' or mpo_fast.attention.register()")


def _router_loss(text_config, backbone, kwargs):
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    num_experts = getattr(text_config, "num_experts", None) or getattr(
        text_config, "num_local_experts", None)
    return load_balancing_loss_func(backbone.router_logits, num_experts,
                                    text_config.num_experts_per_tok, kwargs.get("attention_mask"))


@contextlib.contextmanager
def frozen_loss_state(loss_fn: MPOLoss | None, frozen: bool):
    """Evaluation must not move training state: restore the BCO running mean afterwards."""
    if not frozen or loss_fn is None:
        yield
        return
    saved = loss_fn.bco_state.clone()
    try:
        yield
    finally:
        loss_fn.bco_state.copy_(saved.to(loss_fn.bco_state.device))


def save_checkpoint_loss_state(trainer, loss_fn: MPOLoss, trial) -> None:
    """Write ``loss_fn``'s state (`mpo_fast.mpo.save_loss_state`: loss.safetensors) into the
    checkpoint folder the Hugging Face ``trainer`` has just saved (call after its
    ``_save_checkpoint``)."""
    import os

    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    folder = os.path.join(trainer._get_output_dir(trial=trial),
                          f"{PREFIX_CHECKPOINT_DIR}-{trainer.state.global_step}")
    save_loss_state(loss_fn, folder)


def load_checkpoint_loss_state(loss_fn: MPOLoss, checkpoint: str) -> None:
    """Restore ``loss_fn``'s state from a Trainer checkpoint folder, if it holds one
    (`mpo_fast.mpo.load_loss_state`: loss.safetensors, or an older mpo_loss.pt)."""
    load_loss_state(loss_fn, checkpoint)


# --------------------------------------------------------------------------- images once


def _encode_images_once(backbone, kwargs) -> bool:
    """When the collator repeated each pair's images for chosen and rejected (TRL's does), run
    the vision tower on the first half only and hand the backbone the features twice, through
    transformers' ``mm_encoder_outputs``. Returns False (nothing changed) when the halves differ
    or the model cannot take precomputed features."""
    pixels = kwargs.get("pixel_values")
    if not torch.is_tensor(pixels) or pixels.shape[0] < 2 or pixels.shape[0] % 2:
        return False
    get = getattr(backbone, "get_image_features", None)
    if get is None or "mm_encoder_outputs" not in inspect.signature(backbone.forward).parameters:
        return False
    half = pixels.shape[0] // 2
    extra = {}
    for name in inspect.signature(get).parameters:
        value = kwargs.get(name)
        if name in ("pixel_values", "return_dict") or value is None:
            continue
        if torch.is_tensor(value):
            if value.shape[0] % 2 or not torch.equal(value[: value.shape[0] // 2],
                                                     value[value.shape[0] // 2:]):
                return False
            value = value[: value.shape[0] // 2]
        extra[name] = value
    if not torch.equal(pixels[:half], pixels[half:]):
        return False
    kwargs.pop("pixel_values")
    kwargs.update(hf_model.image_features_once(backbone, pixels[:half], **extra))
    return True
