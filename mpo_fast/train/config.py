"""`TrainConfig`: every knob of the trainer, one dataclass with the paper's defaults.

Sources, later ones win: the dataclass defaults (MPO as trained for InternVL2-8B-MPO: beta 0.1,
sigmoid + bco_pair + sft at 0.8 / 0.2 / 1.0 with the running-mean BCO shift and the SFT term
normalized per answer (the paper's Eq. 5), lr 5e-6, cosine
schedule with 3% warmup, weight decay 0.05, bf16 autocast on GPU), then a preset (``tiny``:
the bundled model and task, whose random init needs a far larger learning rate), then a YAML
file (``--config``), then command-line flags (``--lr 1e-5``, ``--loss-types sigmoid,sft``,
``--no-packing``). A flag is the field's name with dashes.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, fields

__all__ = ["PRESETS", "TrainConfig", "resolve"]


@dataclass
class TrainConfig:
    # what to train on
    model: str = "tiny"  # "tiny" (bundled, built in code) or a Hugging Face model path / id
    data: str = "tiny"  # "tiny" (bundled task), an MMPR meta.json, or HF preference .jsonl/.json
    output_dir: str = ""  # where metrics and checkpoints go ("": runs/<timestamp>)
    on_bad_data: str = "skip"  # "skip" (counted, reported) or "raise"
    allow_outside_root: bool = False  # image paths may leave the data's root (.., /abs, symlinks)
    max_length: int = 4096  # tokens of one sequence (prompt + answer)
    # the loss (MPO, the paper's)
    beta: float = 0.1  # KL coefficient of the preference terms
    loss_types: tuple[str, ...] = ("sigmoid", "bco_pair", "sft")  # any of mpo_fast.LOSS_TYPES
    loss_weights: tuple[float, ...] = (0.8, 0.2, 1.0)  # one per loss type
    bco_delta: str = "running_mean"  # the paper's reward shift; "none" for delta = 0
    sft_normalize: str = "sequence"  # the paper's Eq. 5 (per answer); "token": TRL's token mean
    label_smoothing: float = 0.0  # cDPO / robust / exo_pair / aot
    reference: str = "copy"  # "copy" (frozen), "cached" (log-probs on disk), "adapter" (PEFT)
    ref_cache_dir: str = ""  # for reference="cached" ("": <output_dir>/ref_cache)
    # optimization
    lr: float = 5e-6  # peak learning rate (AdamW)
    weight_decay: float = 0.05  # on matrices; biases and norms get none
    adam_betas: tuple[float, ...] = (0.9, 0.999)  # AdamW betas
    warmup_ratio: float = 0.03  # linear warmup over this fraction of the steps
    lr_schedule: str = "cosine"  # "cosine" (to min_lr_ratio * lr) or "constant" (after warmup)
    min_lr_ratio: float = 0.0  # where the cosine ends, as a fraction of lr
    max_grad_norm: float = 1.0  # gradient clipping (global norm)
    epochs: float = 1.0  # passes over the data (when max_steps is 0)
    max_steps: int = 0  # > 0: train this many optimizer steps (cycling the data) instead
    pairs_per_step: int = 16  # the global batch, in pairs, of one optimizer step
    max_tokens: int = 16384  # token budget of one packed micro-batch (per process)
    packing: bool = True  # False: padded batches (the naive layout), sdpa attention
    gradient_checkpointing: bool = False  # recompute layer activations in the backward
    freeze_vision: bool = False  # keep a VLM's vision tower frozen
    dtype: str = "auto"  # "auto" (bf16 autocast on GPU, fp32 on CPU), "bf16" or "fp32"
    distributed: str = "auto"  # "auto" (DDP under torchrun), "ddp", "fsdp" or "none"
    # bookkeeping
    seed: int = 0  # initial weights of built models, data order
    log_every: int = 1  # steps between metrics.jsonl records
    save_every: int = 0  # steps between checkpoints (0: only at the end)
    keep_checkpoints: int = 2  # newest checkpoints kept (0: all)
    resume: str = ""  # "" (fresh), "auto" (latest in output_dir if any) or a checkpoint path
    progress: bool = True  # a progress bar on rank 0

    def __post_init__(self):
        for name in ("loss_types", "loss_weights", "adam_betas"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            setattr(self, name, tuple(value))
        self.loss_weights = tuple(float(w) for w in self.loss_weights)
        self.adam_betas = tuple(float(b) for b in self.adam_betas)
        _choice("on_bad_data", self.on_bad_data, ("skip", "raise"))
        _choice("sft_normalize", self.sft_normalize, ("sequence", "token"))
        _choice("reference", self.reference, ("copy", "cached", "adapter"))
        _choice("lr_schedule", self.lr_schedule, ("cosine", "constant"))
        _choice("dtype", self.dtype, ("auto", "bf16", "fp32"))
        _choice("distributed", self.distributed, ("auto", "ddp", "fsdp", "none"))
        if len(self.loss_weights) != len(self.loss_types):
            raise ValueError(f"loss_weights has {len(self.loss_weights)} entries for "
                             f"{len(self.loss_types)} loss_types {list(self.loss_types)}")
        for name in ("pairs_per_step", "max_tokens", "max_length", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))


# Presets: defaults for a named setup, below a YAML file and flags. "tiny" is the bundled
# demo: a random-init 2-layer model learns from scratch, so it needs lr ~1e-3, not 5e-6.
PRESETS: dict[str, dict] = {
    "tiny": dict(lr=1e-3, weight_decay=0.0, warmup_ratio=0.05, max_steps=240,
                 pairs_per_step=32, max_tokens=384, max_length=64, log_every=10,
                 save_every=0),
}


def resolve(overrides: dict | None = None, yaml_path: str | None = None) -> TrainConfig:
    """Defaults, then the model's preset (if it has one), then the YAML file, then
    ``overrides`` (the flags that were given)."""
    values: dict = {}
    if yaml_path:
        import yaml

        with open(yaml_path, encoding="utf-8") as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{yaml_path}: expected a mapping of config fields")
        values.update(loaded)
    values.update(overrides or {})
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown config fields {unknown}; known: {sorted(known)}")
    preset = PRESETS.get(values.get("model", TrainConfig.model), {})
    return TrainConfig(**{**preset, **values})


def _choice(name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")

