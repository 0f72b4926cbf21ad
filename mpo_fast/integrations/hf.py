"""Hugging Face integration: a model whose training forward never builds logits, and a
`transformers.Trainer` that trains it with `mpo_fast.MPOLoss`.

    handle = patch_model(model)                       # undo with handle.undo() / unpatch_model
    out = model(input_ids, attention_mask=mask, labels=labels)
    out.log_probs   # [B, T - 1] fp32 log p(labels[:, 1:]), 0 where the label is -100
    out.loss        # token-mean NLL, as the model's own loss (so a plain SFT Trainer works)
    model.generate(...)                               # calls without labels are unchanged

    trainer = MPOTrainer(model, TrainingArguments(...), train_dataset=pairs,
                         processing_class=tokenizer)  # pairs: prompt/chosen/rejected
    trainer.train()

`patch_model` puts mpo-fast's fused head (`mpo_fast.fused_logprobs`) inside the model's
forward: a call with ``labels`` (or ``shift_labels``, or ``fused_lm_head=True``) runs the
backbone (``model.base_model``, which for a VLM includes the image injection) and scores the
labels from the final hidden states; with ``mpo_loss=MPOLoss(...)`` and ``ref_logps`` (or the
reference's ``ref_hidden`` and ``ref_weight``) it returns the whole preference loss (see
`mpo_fast.integrations._head` for every convention). The plain
Trainer hook ``compute_loss_func(outputs, labels, num_items_in_batch)`` runs after the logits
exist and outside the forward, so it cannot save their memory and escapes ZeRO-3/FSDP2; hence
a Trainer subclass.

`MPOTrainer` computes `MPOLoss` (the MPO paper's loss by default, with its BCO running-mean
shift) inside the model's forward, so DDP / FSDP reduce the head's gradients. The reference
is a frozen model (``ref_model``; a frozen copy of the policy is made when none is given) or
per-pair reference log-probs carried by the dataset (columns ``ref_chosen_logps``,
``ref_rejected_logps``). `PreferenceCollator` pads pairs (chosen rows, then rejected rows) or
packs them into one padding-free row (``packed=True``: position ids restart per sequence and
the boundaries travel as the packer's ``Segments``, so attention stays inside each sequence). Metrics are
logged under TRL's names.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import transformers

from .. import packing, pair_tokens
from ..hf_model import logit_shape
from ..mpo import MPOLoss
from ._head import (
    STATISTICS,
    FusedHead,
    FusedOutput,
    frozen_loss_state,
    install,
    installed,
    load_checkpoint_loss_state,
    save_checkpoint_loss_state,
    uninstall,
)

__all__ = ["FusedOutput", "MPOTrainer", "PatchHandle", "PreferenceCollator", "patch_model",
           "unpatch_model"]

IGNORE_INDEX = -100
_REF_KEYS = ("ref_chosen_logps", "ref_rejected_logps")


class PatchHandle:
    """What `patch_model` returns: ``undo()`` restores the model's forward; also a context
    manager (``with patch_model(model): ...``)."""

    def __init__(self, model: torch.nn.Module, head: FusedHead):
        self.model, self.head = model, head

    def undo(self) -> None:
        unpatch_model(self.model)

    def __enter__(self) -> PatchHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.undo()


def patch_model(model: torch.nn.Module, output: str = "log_probs", *,
                statistics: Sequence[str] = (), temperature: float = 1.0, pack: bool = False,
                encode_images_once: bool = False, backend: str = "auto") -> PatchHandle:
    """Make ``model``'s training forward return per-token log-probs (or the final hidden
    states) instead of logits. Only this instance changes; `unpatch_model` undoes it.

    Args:
        model: a Hugging Face causal LM or image-text-to-text model (it has an output
            embedding and a ``base_model``).
        output: "log_probs" (per-token log p(label), the token-mean NLL as ``loss``; with
            ``mpo_loss=`` the preference loss) or "hidden_states" (``last_hidden_state``, for
            computing the loss yourself, e.g. with `mpo_fast.MPOLoss`).
        statistics: per-token extras to return with the log-probs, any of "entropy",
            "log_sum_sq_probs", "mean_logits", "is_top1" (one extra no-grad vocabulary pass).
        temperature: the logits are divided by it.
        pack: pack each right-padded batch into one padding-free row inside the forward.
        encode_images_once: when the batch repeats each pair's images (chosen, then rejected
            rows), run the vision tower on one copy.
        backend: `mpo_fast.fused_logprobs` backend.

    The patched forward is fused when called with ``labels``, ``shift_labels``,
    ``fused_lm_head=True`` or ``mpo_loss``; other calls (``generate``) run the original.
    """
    if output not in ("log_probs", "hidden_states"):
        raise ValueError(f"output must be 'log_probs' or 'hidden_states', got {output!r}")
    bad = [s for s in statistics if s not in STATISTICS]
    if bad:
        raise ValueError(f"unknown statistics {bad}; choose from {list(STATISTICS)}")
    head = FusedHead((output, *statistics), temperature, False, pack, encode_images_once,
                     backend)
    return PatchHandle(model, install(model, head))


def unpatch_model(model: torch.nn.Module) -> bool:
    """Restore the forward `patch_model` replaced; False if the model was not patched."""
    return uninstall(model)


# --------------------------------------------------------------------------- collator


@dataclass
class PreferenceCollator:
    """Batches of preference pairs for `MPOTrainer` (and any loop using a patched model).

    Examples are dicts with token ids ``prompt_ids``, ``chosen_ids``, ``rejected_ids``, or with
    text ``prompt`` (a string or chat messages), ``chosen``, ``rejected`` and a ``tokenizer``
    here, tokenized as the trainer tokenizes a pair (`mpo_fast.pair_tokens`: the tokenizer's
    chat template when it has one, else the text with its special tokens and the answers +
    EOS). Optional ``ref_chosen_logps`` / ``ref_rejected_logps`` are carried along.

    Args:
        pad_token_id: id of padding (default: the tokenizer's pad, else its EOS).
        tokenizer: for text examples.
        max_length: most tokens of a sequence, by the trainer's rule (`pair_tokens.truncate`:
            the completions' ends first, then the prompt's start).
        packed: one padding-free row instead of a padded batch.

    Returns (B pairs, S = 2B sequences: the B chosen, then the B rejected):
        padded  input_ids [S, T], attention_mask [S, T], labels [S, T] (unshifted, -100 on
                prompt and padding)
        packed  input_ids [1, N], position_ids [1, N] (restarting per sequence), shift_labels
                [1, N] (shifted inside each sequence), cu_seqlens: the packer's
                `mpo_fast.Segments` (offsets, N, longest sequence), all by
                `mpo_fast.packing.pack`
        and ref_chosen_logps / ref_rejected_logps [B] when the examples have them.
    """

    pad_token_id: int | None = None
    tokenizer: object = None
    max_length: int | None = None
    packed: bool = False

    def __post_init__(self):
        if self.pad_token_id is None:
            tok = self.tokenizer
            if tok is None:
                raise ValueError("PreferenceCollator needs pad_token_id or a tokenizer")
            pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
            if pad is None:
                raise ValueError("the tokenizer has neither a pad nor an EOS token: pass "
                                 "pad_token_id")
            self.pad_token_id = pad

    def __call__(self, examples: list[dict]) -> dict:
        pairs = [self._ids(ex) for ex in examples]  # (prompt, chosen, rejected)
        rows = [(p[0], p[k]) for k in (1, 2) for p in pairs]  # the B chosen, then the B rejected
        lengths = torch.tensor([len(p) + len(c) for p, c in rows])
        ids = torch.full((len(rows), int(lengths.max())), self.pad_token_id, dtype=torch.long)
        completion = torch.zeros(ids.shape, dtype=torch.bool)
        for i, (prompt, answer) in enumerate(rows):
            ids[i, :len(prompt) + len(answer)] = torch.tensor(prompt + answer, dtype=torch.long)
            completion[i, len(prompt):len(prompt) + len(answer)] = True
        batch = self._packed(ids, lengths, completion) if self.packed else self._padded(
            ids, lengths, completion)
        for key in _REF_KEYS:
            if key in examples[0]:
                batch[key] = torch.tensor([float(ex[key]) for ex in examples])
        return batch

    def _ids(self, ex: dict) -> tuple[list[int], list[int], list[int]]:
        if "prompt_ids" in ex:
            ids = tuple(list(ex[f"{k}_ids"]) for k in ("prompt", "chosen", "rejected"))
            return ids if self.max_length is None else pair_tokens.truncate(*ids,
                                                                            self.max_length)
        if self.tokenizer is None:
            raise ValueError("text examples (prompt/chosen/rejected) need tokenizer=")
        return pair_tokens.tokenize_pair(self.tokenizer, ex["prompt"], ex["chosen"],
                                         ex["rejected"], self.max_length)

    @staticmethod
    def _padded(ids, lengths, completion) -> dict:
        mask = torch.arange(ids.shape[1])[None, :] < lengths[:, None]  # never from the ids
        return {"input_ids": ids, "attention_mask": mask.long(),
                "labels": ids.masked_fill(~completion, IGNORE_INDEX)}

    @staticmethod
    def _packed(ids, lengths, completion) -> dict:
        p = packing.pack(ids, lengths)  # the one packer; its Segments travel as cu_seqlens
        return {"input_ids": p.tokens[None], "position_ids": p.position_ids[None],
                "shift_labels": p.shift_targets(completion, IGNORE_INDEX)[None],
                "cu_seqlens": p.segments}


# --------------------------------------------------------------------------- trainer


class MPOTrainer(transformers.Trainer):
    """`transformers.Trainer` for preference pairs with `mpo_fast.MPOLoss` computed inside the
    model's forward (see the module docstring).

    Args:
        model: the policy (a Hugging Face causal LM / VLM); its forward gets the fused head.
        args: `transformers.TrainingArguments`.
        loss_fn: the loss; default ``MPOLoss()`` (MPO: 0.8 sigmoid + 0.2 bco_pair + 1.0 sft,
            beta 0.1, the paper's BCO running mean), with the model's logit softcap.
        ref_model: the frozen reference. None: the dataset's reference log-prob columns if it
            has them, else a frozen copy of ``model`` taken now.
        data_collator: default `PreferenceCollator` (with ``processing_class`` as tokenizer).
        **kwargs: the rest of `transformers.Trainer`'s arguments.

    The loss is a per-micro-batch mean (the Trainer divides by the accumulation steps). The
    loss's state (the BCO running mean) is saved with each checkpoint as ``loss.safetensors``.
    """

    loss_is_scaled_for_ga = False

    def __init__(self, model, args=None, *, loss_fn: MPOLoss | None = None, ref_model=None,
                 data_collator=None, train_dataset=None, processing_class=None, **kwargs):
        softcap = logit_shape(model).softcap
        self.loss_fn = loss_fn if loss_fn is not None else MPOLoss(softcap=softcap)
        if data_collator is None:
            data_collator = PreferenceCollator(tokenizer=processing_class)
        has_ref = train_dataset is not None and set(_REF_KEYS) <= set(
            getattr(train_dataset, "column_names", None) or next(iter(train_dataset)))
        if ref_model is None and not has_ref and self.loss_fn.loss_config.needs_reference:
            ref_model = copy.deepcopy(model)
        head = installed(model)
        if head is None or "log_probs" not in head.outputs:
            install(model, FusedHead())
        super().__init__(model=model, args=args, data_collator=data_collator,
                         train_dataset=train_dataset, processing_class=processing_class,
                         **kwargs)
        self.model_accepts_loss_kwargs = False  # transformers < 5.19 reads this instead
        self.ref_model = None
        if ref_model is not None:
            ref_model.requires_grad_(False).eval()
            if installed(ref_model) is None:
                install(ref_model)
            self.ref_model = self.accelerator.prepare_model(ref_model, evaluation_mode=True)
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["prompt_ids", "chosen_ids", "rejected_ids", "prompt",
                                       "chosen", "rejected", *_REF_KEYS]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        if all(k in inputs for k in _REF_KEYS):
            ref = {"ref_logps": tuple(inputs.pop(k) for k in _REF_KEYS)}
        else:
            ref = self._reference(inputs)
        mode = "train" if model.training else "eval"
        with frozen_loss_state(self.loss_fn, frozen=mode == "eval"):
            out = model(**inputs, mpo_loss=self.loss_fn, **ref)
        names = list(out.metrics)
        values = torch.stack([out.metrics[k].float() for k in names])
        for k, v in zip(names, self.accelerator.gather_for_metrics(values[None]).mean(0).tolist(),
                        strict=True):
            self._metrics[mode][k].append(v)
        return (out.loss, out) if return_outputs else out.loss

    @torch.no_grad()
    def _reference(self, inputs) -> dict:
        """The reference's hidden states and LM head, for `MPOLoss` to score with the policy's
        rows and reductions (a policy equal to its reference gets rewards of exactly 0)."""
        if not self.loss_fn.loss_config.needs_reference:
            return {}
        if self.ref_model is None:
            raise ValueError("this loss needs a reference: give MPOTrainer a ref_model, or "
                             "dataset columns ref_chosen_logps / ref_rejected_logps")
        out = self.ref_model(**inputs, return_hidden_states=True)
        head = self.accelerator.unwrap_model(self.ref_model).get_output_embeddings()
        return {"ref_hidden": out.last_hidden_state, "ref_weight": head.weight,
                "ref_bias": head.bias}

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        prefix = "eval_" if mode == "eval" else ""
        logs.update({f"{prefix}{k}": sum(v) / len(v) for k, v in self._metrics[mode].items()})
        super().log(logs, start_time)
        self._metrics[mode].clear()

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            save_checkpoint_loss_state(self, self.loss_fn, trial)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_checkpoint_loss_state(self.loss_fn, resume_from_checkpoint)
