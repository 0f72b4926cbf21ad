"""`FusedDPOTrainer`: TRL's `DPOTrainer` with mpo-fast's kernels inside the model's forward.

    from mpo_fast.integrations.trl import FusedDPOTrainer
    trainer = FusedDPOTrainer(model=model, ref_model=ref, args=DPOConfig(...,
                              loss_type=["sigmoid", "bco_pair", "sft"],
                              loss_weights=[0.8, 0.2, 1.0]),
                              train_dataset=ds, processing_class=tokenizer)

Same arguments, `DPOConfig`, datasets, collators, reference handling (a reference model, the
policy with its PEFT adapter disabled, or precomputed reference log-probs) and logged metrics
(``self._metrics[mode][key]``, TRL's names) as the installed `trl.DPOTrainer`.

How it plugs in (TRL >= 1.15): TRL gives the policy and reference models a fused LM head
(``trl.trainer.dpo_trainer.add_fused_lm_head``) and calls them with ``fused_lm_head=True``. While
this trainer is built, that function installs mpo-fast's head instead (`_head.install`), so every
log-prob TRL asks for — training, evaluation, precomputing the reference — comes from
`mpo_fast.fused_logprobs`. `_compute_loss` then runs the reference backbone first (no grad) and
hands its hidden states and LM head (or the precomputed reference log-probs) to the policy's
forward, which computes the whole loss with `mpo_fast.MPOLoss` (reference and policy scored on
the same rows, summed by the same fused epilogue) inside ``model.forward``: under DDP / FSDP the
LM head's gradients are reduced like every other parameter's (TRL 1.9-1.12's
``use_liger_kernel`` ran its loss outside the wrapper, and they never were). TRL's metrics
(entropy, mean logits, top-1 accuracy of the chosen tokens) come from one extra no-grad pass
over the vocabulary (`mpo_fast.hf_model.token_statistics`); ``head_metrics=False`` skips it.

Supported: ``trl>=1.15,<2`` (`SUPPORTED_TRL`; tested on 1.16.0, also run on 1.15.0), checked
when the trainer is built.

Semantics. By default the results are the installed TRL's: ``bco_pair`` has no reward shift
(``bco_delta="none"``; the trainer says so once, an `UnshiftedBCOWarning`), every loss type keeps
TRL's definition, and "sft" is TRL's token mean. ``bco_delta="running_mean"``
gives the paper's (TRL <= 0.28, InternVL) running-mean shift, kept in ``self.mpo_loss`` (saved
with each checkpoint as ``loss.safetensors``). Configurations `MPOLoss` does not express — loss types
"sigmoid_norm", f-divergences other than reverse KL, ``ld_alpha``, WPO weighting
(``use_weighting``), "sigmoid" with ``label_smoothing`` > 0 (TRL 1.16's sigmoid ignores it),
"robust" with ``label_smoothing`` >= 0.5, "ipo" on a batch with an empty prompt — run TRL's own
loss code on mpo-fast's log-probs instead (`fused_loss_blocker` says why).

What TRL cannot do, on request:
    padding-free pairs   ``DPOConfig(padding_free=True)`` (TRL 1.16 turns it off): each padded
                         batch is packed into one row inside the forward, position ids
                         restarting per sequence (attention stays inside each: transformers'
                         own mask, or cu_seq_lens for flash-attention); not for M-RoPE models
    images once per pair ``encode_images_once=True``: TRL's vision collator repeats each pair's
                         images for chosen and rejected; the vision tower then runs on one copy
                         and the features are reused (transformers' ``mm_encoder_outputs``)
    VLM reference cache  ``DPOConfig(precompute_ref_log_probs=True)`` with a vision dataset
                         (TRL refuses it): the reference log-probs are computed once, added to
                         the dataset, and carried through the vision collator

Not supported: DeepSpeed ZeRO-3 (the fused op keeps the head weight for its backward; a
partitioned weight would be empty there), an LM head wrapped by PEFT (TRL refuses it too).
"""

from __future__ import annotations

import contextlib
import inspect
import warnings

import torch
import trl
from packaging.version import Version
from torch.utils.data import DataLoader
from trl import DPOConfig, DPOTrainer
from trl.trainer.utils import get_config_model_id

from ..hf_model import logit_shape
from ..losses import LOSS_TYPES
from ..mpo import MPOLoss
from ._head import (
    FusedHead,
    frozen_loss_state,
    install,
    load_checkpoint_loss_state,
    save_checkpoint_loss_state,
)

__all__ = ["SUPPORTED_TRL", "FusedDPOTrainer", "UnshiftedBCOWarning", "check_trl_version",
           "fused_loss_blocker"]

SUPPORTED_TRL = ">=1.15,<2"
_MIN, _MAX = Version("1.15"), Version("2")
_REF_KEYS = ("ref_chosen_logps", "ref_rejected_logps")
_NON_MODEL_KEYS = {"completion_mask", *_REF_KEYS}
_TRL_TO_MPO = {"aot_unpaired": "aot_pair"}  # TRL's names where ours differ
# MPOLoss's per-pair metrics TRL logs (TRL's order), then the BCO shift
_PAIR_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                 "logps/chosen", "logps/rejected", "bco/delta")
BCO_DELTAS = ("none", "running_mean")


class UnshiftedBCOWarning(UserWarning):
    """``bco_pair`` runs with delta = 0 (TRL's semantics), not the MPO paper's reward shift."""


def warn_unshifted_bco(loss_types, bco_delta: str, blocker: str | None) -> None:
    """Warn (an `UnshiftedBCOWarning`) when TRL's ``bco_pair`` runs without the shift: the MPO
    paper subtracts the running mean of past rewards, and a user copying its recipe into a
    `DPOConfig` would silently train another loss. Called once per trainer, when it is built."""
    types = [loss_types] if isinstance(loss_types, str) else list(loss_types)
    if "bco_pair" not in types or bco_delta != "none":
        return
    how = ('pass FusedDPOTrainer(..., bco_delta="running_mean") to get it' if blocker is None
           else f'bco_delta="running_mean" gives it, but not with this config ({blocker})')
    warnings.warn(
        "FusedDPOTrainer: loss_type 'bco_pair' runs without the reward shift (delta = 0, the "
        "installed TRL's bco_pair); the MPO paper's BCO term subtracts the running mean of "
        f"past rewards: {how}", UnshiftedBCOWarning, stacklevel=3)


def check_trl_version(version: str | None = None) -> str:
    """Raise a RuntimeError unless ``version`` (default: the installed trl's) is in
    `SUPPORTED_TRL`; returns it."""
    version = trl.__version__ if version is None else version
    if not _MIN <= Version(Version(version).base_version) < _MAX:
        raise RuntimeError(
            f"mpo_fast.integrations.trl supports trl{SUPPORTED_TRL} (tested on 1.16.0), found "
            f"trl {version}: TRL 1.15 introduced the fused LM head this trainer replaces "
            "(`add_fused_lm_head`, models called with fused_lm_head=True). Install a supported "
            "trl (pip install 'trl>=1.15,<2'), or use mpo_fast.integrations.hf.MPOTrainer.")
    return version


def fused_loss_blocker(args, loss_types=None) -> str | None:
    """Why `MPOLoss` cannot compute this `DPOConfig`'s loss exactly as TRL does (then the
    trainer runs TRL's loss code on mpo-fast's log-probs), or None."""
    types = args.loss_type if loss_types is None else loss_types
    types = [types] if isinstance(types, str) else list(types)
    unknown = [t for t in types if _TRL_TO_MPO.get(t, t) not in LOSS_TYPES]
    e = args.label_smoothing
    if unknown:
        return f"loss_type {unknown} has no MPOLoss equivalent"
    if args.f_divergence_type != "reverse_kl" and not (
            args.f_divergence_type == "alpha_divergence"
            and abs(args.f_alpha_divergence_coef - 1.0) < 1e-6):
        return f"f_divergence_type={args.f_divergence_type!r}"
    if args.ld_alpha is not None:
        return "ld_alpha (LD-DPO) is set"
    if args.use_weighting:
        return "use_weighting (WPO) is set"
    if "sigmoid" in types and e != 0:
        return "TRL's 'sigmoid' ignores label_smoothing (MPOLoss's applies it, as cDPO)"
    if "robust" in types and not e < 0.5:
        return "'robust' with label_smoothing >= 0.5"
    return None


@contextlib.contextmanager
def _mpo_fast_head(options: dict, drop_statistics: bool):
    """While DPOTrainer.__init__ runs, its `add_fused_lm_head` installs mpo-fast's head."""
    module = trl.trainer.dpo_trainer
    original = module.add_fused_lm_head

    def add_fused_lm_head(model, temperature=1.0, cast_lm_head_to_fp32=False,
                          outputs=("log_probs",)):
        outputs = tuple(o for o in outputs if not drop_statistics or o == "log_probs")
        install(model, FusedHead(outputs, temperature, cast_lm_head_to_fp32, **options))

    module.add_fused_lm_head = add_fused_lm_head
    try:
        yield
    finally:
        module.add_fused_lm_head = original


# DPOTrainer.__init__'s positional parameters (TRL 1.15-1.16), for when a third-party patch hid
# its signature behind a bare (*args, **kwargs) wrapper without functools.wraps
_DPO_POSITIONAL = ("model", "ref_model", "args", "data_collator", "train_dataset",
                   "eval_dataset", "processing_class", "compute_metrics", "callbacks",
                   "optimizers", "quantization_config", "peft_config")


def _dpo_arguments(args: tuple, kwargs: dict) -> dict:
    """DPOTrainer.__init__'s arguments by name: from its signature where it can be read
    (inspect follows functools.wraps), else from TRL's positional order."""
    params = inspect.signature(DPOTrainer.__init__).parameters.values()
    names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names = names[1:] if "model" in names else list(_DPO_POSITIONAL)
    if len(args) > len(names):
        raise TypeError(f"DPOTrainer takes at most {len(names)} positional arguments, "
                        f"got {len(args)}")
    doubled = sorted(set(names[:len(args)]) & set(kwargs))
    if doubled:
        raise TypeError(f"DPOTrainer got multiple values for {doubled}")
    return {**dict(zip(names, args, strict=False)), **kwargs}


class FusedDPOTrainer(DPOTrainer):
    """A drop-in `trl.DPOTrainer` whose log-probs and loss come from mpo-fast's fused kernels,
    computed inside the model's forward (see the module docstring).

    Args:
        *args, **kwargs: exactly `trl.DPOTrainer`'s (model, ref_model, args=DPOConfig(...),
            data_collator, train_dataset, eval_dataset, processing_class, ...).
        bco_delta: "none" (default: the installed TRL's bco_pair, no reward shift; with
            "bco_pair" in the loss types the trainer warns once, an `UnshiftedBCOWarning`) or
            "running_mean" (the MPO paper's shift; needs a loss MPOLoss can express).
        head_metrics: log TRL's ``entropy``, ``logits/chosen``, ``logits/rejected`` and
            ``mean_token_accuracy`` (default). They need one extra no-grad pass over the
            vocabulary (a fifth of the head's GEMM FLOPs plus an exp pass; on a CPU about one
            policy head forward); False skips them and drops those four metrics.
        encode_images_once: run the vision tower once per pair (see the module docstring).
        backend: `mpo_fast.fused_logprobs` backend ("auto", "triton", "torch").
    """

    def __init__(self, *args, bco_delta: str = "none", head_metrics: bool = True,
                 encode_images_once: bool = False, backend: str = "auto", **kwargs):
        check_trl_version()
        _refuse_zero3()
        if bco_delta not in BCO_DELTAS:
            raise ValueError(f"bco_delta must be one of {BCO_DELTAS}, got {bco_delta!r}")
        given = _dpo_arguments(args, kwargs)  # passed on by name below
        config, dataset = given.get("args"), given.get("train_dataset")
        if config is None:  # TRL's default config, made here since we read it first
            model = given["model"]
            name = model if isinstance(model, str) else get_config_model_id(model.config)
            config = given["args"] = DPOConfig(f"{name.split('/')[-1]}-DPO")
        blocker = fused_loss_blocker(config)
        if bco_delta == "running_mean" and blocker is not None:
            raise ValueError(f"bco_delta='running_mean' needs MPOLoss to compute the loss, but "
                             f"{blocker}")
        self._fused_blocker = blocker
        self._bco_delta, self._head_metrics = bco_delta, head_metrics
        warn_unshifted_bco(config.loss_type, bco_delta, blocker)
        pack = bool(getattr(config, "padding_free", False))
        vision = dataset is not None and _is_vision(dataset)
        vision_precompute = vision and config.precompute_ref_log_probs
        options = {"pack": pack, "encode_images_once": encode_images_once, "backend": backend}
        # flags TRL would refuse or switch off, restored below: we do them ourselves
        saved = {"padding_free": pack, "precompute_ref_log_probs": config.precompute_ref_log_probs}
        config.padding_free = False
        if vision_precompute:
            config.precompute_ref_log_probs = False
        try:
            with _mpo_fast_head(options, drop_statistics=not head_metrics and blocker is None):
                super().__init__(**given)
        finally:
            for name, value in saved.items():
                setattr(config, name, value)
        types = [_TRL_TO_MPO.get(t, t) for t in self.loss_types]
        self.mpo_loss = None if blocker else MPOLoss(
            beta=self.beta, loss_types=types, loss_weights=self.loss_weights,
            label_smoothing=self.label_smoothing, bco_delta=bco_delta,
            softcap=logit_shape(self.model).softcap, discopop_tau=self.args.discopop_tau,
            backend=backend)
        if vision_precompute:
            self._precompute_vision_reference()

    # ------------------------------------------------------------------ loss

    def _compute_loss(self, model, inputs, return_outputs):
        if self.mpo_loss is None or self._needs_trl_loss(inputs):
            return super()._compute_loss(model, inputs, return_outputs)
        mode = "train" if self.model.training else "eval"
        model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        if self.aux_loss_enabled:
            model_kwargs["output_router_logits"] = True
        completion_mask = inputs["completion_mask"]
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        ref = self._reference(inputs, model_kwargs, labels)
        with frozen_loss_state(self.mpo_loss, frozen=mode == "eval"):
            outputs = model(**model_kwargs, labels=labels, fused_lm_head=True,
                            mpo_loss=self.mpo_loss, **ref)
        loss = outputs.loss
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss
        self._log_metrics(mode, inputs, outputs)
        if return_outputs:  # TRL's deprecated path: logits for compute_metrics, recomputed
            with torch.no_grad():
                outputs = model(**model_kwargs)
            return loss, outputs
        return loss

    def _needs_trl_loss(self, inputs) -> bool:
        # TRL's ipo divides by the unshifted completion length, ours by the scored tokens: they
        # differ only when a completion starts at position 0 (an empty prompt)
        return ("ipo" in self.loss_types and self._bco_delta == "none"
                and bool(inputs["completion_mask"][:, 0].any()))

    def _reference(self, inputs, model_kwargs, labels) -> dict:
        """The reference for the policy's forward: precomputed sequence log-probs, or the
        reference's hidden states and LM head from a no-grad backbone pass (the reference model,
        or the policy with its PEFT adapter disabled, as TRL's `_compute_loss` picks), which
        `MPOLoss` scores with the policy's rows and reductions."""
        if self.precompute_ref_logps:
            return {"ref_logps": (inputs["ref_chosen_logps"], inputs["ref_rejected_logps"])}
        kwargs = {k: v for k, v in model_kwargs.items() if k != "output_router_logits"}
        with self._reference_context():
            if self.ref_model is None:
                out = self.model(**kwargs, labels=labels, return_hidden_states=True)
                head = self.accelerator.unwrap_model(self.model).get_output_embeddings()
            else:
                out = self.ref_model(**kwargs, labels=labels, return_hidden_states=True)
                head = self.accelerator.unwrap_model(self.ref_model).get_output_embeddings()
        return {"ref_hidden": out.last_hidden_state, "ref_weight": head.weight,
                "ref_bias": head.bias}

    @contextlib.contextmanager
    def _reference_context(self):
        """No grad, no gradient checkpointing, and with PEFT and no reference model the
        adapter disabled (or the "ref" adapter), as in TRL."""
        from accelerate.utils import is_peft_model
        from trl.models.utils import disable_gradient_checkpointing
        from trl.trainer.utils import use_adapter

        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.no_grad())
            stack.enter_context(disable_gradient_checkpointing(
                self.model, self.args.gradient_checkpointing_kwargs))
            if self.ref_model is None and is_peft_model(self.model):
                unwrapped = self.accelerator.unwrap_model(self.model)
                name = "ref" if "ref" in unwrapped.peft_config else None
                stack.enter_context(use_adapter(unwrapped, adapter_name=name))
            yield

    def _precompute_ref_logps(self, dataset, name, batch_size):
        """TRL caches precomputed reference log-probs on disk, keyed by (dataset, model): salt
        the key, so a cache written by TRL's own head is never read as ours (the two differ in
        rounding, which breaks exact ties) and ours never as TRL's."""
        key = self._precompute_model_hash
        self._precompute_model_hash = f"{key}-mpo-fast"
        try:
            return super()._precompute_ref_logps(dataset, name, batch_size)
        finally:
            self._precompute_model_hash = key

    def compute_ref_log_probs(self, model, inputs):
        """Reference log-probs of one padded batch (TRL's precompute): summed as `MPOLoss`
        sums the policy's, so a policy still equal to its reference gets rewards of exactly 0,
        as with TRL."""
        if self._fused_blocker is not None:  # TRL's loss code: TRL's own sums (ld_alpha...)
            return super().compute_ref_log_probs(model, inputs)
        kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        kwargs["use_cache"] = False
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        with self._reference_context(), self.accelerator.autocast():
            out = model(**kwargs, labels=labels, return_sequence_logps=True)
        return out.sequence_logps.chunk(2, dim=0)

    def _log_metrics(self, mode, inputs, outputs):
        """TRL's metrics, under TRL's names and with its gathers, from the head's statistics
        and `MPOLoss`'s per-rank means (weighted by pairs across ranks); one host sync."""
        acc, metrics = self.accelerator, self._metrics[mode]
        shift_mask = inputs["completion_mask"][..., 1:]
        chosen_mask, rejected_mask = shift_mask.chunk(2, dim=0)
        sums = []
        if self._head_metrics:
            seq_len = shift_mask.shape[1]
            ent = outputs.entropy[:, -seq_len:]
            c_logit, r_logit = outputs.mean_logits[:, -seq_len:].chunk(2, dim=0)
            c_top1, _ = outputs.is_top1[:, -seq_len:].chunk(2, dim=0)
            sums += [(ent * shift_mask).sum(), shift_mask.sum(),
                     c_logit[chosen_mask.bool()].sum(), chosen_mask.sum(),
                     r_logit[rejected_mask.bool()].sum(), rejected_mask.sum(),
                     (c_top1 & chosen_mask.bool()).sum()]
        if mode == "train":
            sums.append(inputs["attention_mask"].sum())
        parts = []
        if self.aux_loss_enabled:
            parts.append(acc.gather_for_metrics(outputs.aux_loss.detach().float()).mean())
        if sums:
            parts.append(acc.gather_for_metrics(torch.stack([s.float() for s in sums])[None])
                         .sum(0))
        pairs = float(outputs.chosen_logps.shape[0])
        means = torch.stack([outputs.metrics[k].float() for k in _PAIR_METRICS])
        weighted = acc.gather(torch.cat([means.new_tensor([pairs]), means * pairs])[None]).sum(0)
        parts.append(weighted[1:] / weighted[0])
        values = torch.cat([t.reshape(-1) for t in parts]).tolist()  # the one host sync
        if self.aux_loss_enabled:
            metrics["aux_loss"].append(values.pop(0))
        if self._head_metrics:
            ent_sum, tok, c_sum, c_tok, r_sum, r_tok, correct = values[:7]
            values = values[7:]
            metrics["entropy"].append(ent_sum / tok if tok > 0 else 0.0)
        if mode == "train":
            self._total_train_tokens += int(values.pop(0)) // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]
        if self._head_metrics:
            metrics["logits/chosen"].append(c_sum / c_tok if c_tok > 0 else 0.0)
            metrics["logits/rejected"].append(r_sum / r_tok if r_tok > 0 else 0.0)
            metrics["mean_token_accuracy"].append(correct / c_tok if c_tok > 0 else 0.0)
        for key, value in zip(_PAIR_METRICS, values, strict=True):
            if key != "bco/delta" or self._bco_delta == "running_mean":
                metrics[key].append(value)

    # ------------------------------------------------------------------ VLM reference cache

    def _precompute_vision_reference(self):
        """TRL refuses precomputed reference log-probs for vision datasets; compute them once
        here (through the fused head), add them as dataset columns, and let the collator carry
        them. The reference model is not needed afterwards: the trainer lets go of it."""
        batch = self.args.precompute_ref_batch_size
        self.train_dataset = self._vision_ref_column(
            self.train_dataset, batch or self.args.per_device_train_batch_size)
        if isinstance(self.eval_dataset, dict):
            self.eval_dataset = {k: self._vision_ref_column(
                d, batch or self.args.per_device_eval_batch_size)
                for k, d in self.eval_dataset.items()}
        elif self.eval_dataset is not None:
            self.eval_dataset = self._vision_ref_column(
                self.eval_dataset, batch or self.args.per_device_eval_batch_size)
        self.data_collator = _WithReferenceLogps(self.data_collator)
        self.precompute_ref_logps = True
        self.ref_model = None

    def _vision_ref_column(self, dataset, batch_size: int):
        from datasets import IterableDataset

        if isinstance(dataset, IterableDataset):
            raise ValueError("precompute_ref_log_probs needs a map-style Dataset")
        loader = self.accelerator.prepare(DataLoader(
            dataset, batch_size=batch_size, shuffle=False, collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers))
        model = self.ref_model or self.model
        chosen, rejected = [], []
        for padded in loader:
            c, r = self.compute_ref_log_probs(model, padded)
            c, r = self.accelerator.gather_for_metrics((c, r))
            chosen.append(c.cpu())
            rejected.append(r.cpu())
        return dataset.add_column(_REF_KEYS[0], torch.cat(chosen).tolist()).add_column(
            _REF_KEYS[1], torch.cat(rejected).tolist())

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self.precompute_ref_logps and self._is_vision_dataset:
            self._signature_columns = [*self._signature_columns, *_REF_KEYS]

    # ------------------------------------------------------------------ checkpoints

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.mpo_loss is not None and self._bco_delta == "running_mean" and (
                self.args.should_save):
            save_checkpoint_loss_state(self, self.mpo_loss, trial)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self.mpo_loss is not None:
            load_checkpoint_loss_state(self.mpo_loss, resume_from_checkpoint)


class _WithReferenceLogps:
    """A collator that moves the reference log-prob columns past another collator."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, examples):
        ref = {k: torch.tensor([float(ex.pop(k)) for ex in examples]) for k in _REF_KEYS
               if k in examples[0]}
        batch = self.inner(examples)
        batch.update(ref)
        return batch


def _is_vision(dataset) -> bool:
    sample = next(iter(dataset))
    return "image" in sample or "images" in sample


def _refuse_zero3():
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        raise NotImplementedError(
            "FusedDPOTrainer does not support DeepSpeed ZeRO-3: the fused op keeps the LM head "
            "weight for its backward, which ZeRO-3 partitions away; use ZeRO-1/2, DDP or FSDP2")

