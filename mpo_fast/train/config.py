"""`TrainConfig`: every knob of the trainer, one dataclass with the paper's defaults.

Sources, later ones win: the dataclass defaults (the paper's loss and optimizer, as trained for
InternVL2-8B-MPO: beta 0.1, sigmoid + bco_pair + sft at 0.8 / 0.2 / 1.0 with the running-mean
BCO shift and the SFT term normalized per answer (the paper's Eq. 5), lr 5e-6, cosine schedule
with 3% warmup, weight decay 0.05, 1 epoch, bf16 autocast on GPU; not its batch shape: 16 pairs
per step, 4096 tokens), then a preset (``--preset paper``: the whole recipe, 256 pairs per step
and 6144 tokens included; ``tiny`` / ``tiny-vl``: the bundled models, whose random init needs
a far larger learning rate, applied by ``--model tiny`` / ``tiny-vl`` unless another preset is
named), then a YAML file (``--config``), then command-line flags (``--lr 1e-5``,
``--loss-types sigmoid,sft``, ``--no-packing``). A flag is the field's name with dashes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
from dataclasses import dataclass, fields

__all__ = ["PRESETS", "TRL_NAMES", "TrainConfig", "from_trl", "resolve"]


@dataclass
class TrainConfig:
    # what to train on
    preset: str = ""  # "paper", "tiny", "tiny-vl", "none" ("": the model's, if it has one)
    model: str = "tiny"  # "tiny" / "tiny-vl" (bundled, built in code), or an HF model path / id
    trust_remote_code: bool = False  # run the model repository's own code (never on by itself)
    revision: str = ""  # the model's branch / tag / commit on the Hub ("": its default)
    torch_dtype: str = "float32"  # weights load as float32 (master copy), bfloat16, float16, auto
    attn_implementation: str = ""  # padded batches / vision tower ("": sdpa, else eager)
    chat_template: str = ""  # a Jinja chat template file, in place of the tokenizer's
    data: str = "tiny"  # "tiny", MMPR meta.json, preference .jsonl/.json, datasets name/folder
    data_split: str = "train"  # the split of a datasets name / save_to_disk DatasetDict
    data_config: str = ""  # the configuration of a datasets name
    output_dir: str = ""  # where metrics and checkpoints go ("": runs/<timestamp>)
    on_bad_data: str = "skip"  # "skip" (counted, reported) or "raise"
    allow_outside_root: bool = False  # image paths may leave the data's root (.., /abs, symlinks)
    max_length: int = 4096  # tokens of one sequence (prompt + answer)
    # evaluation on held-out pairs
    eval_data: str = ""  # held-out pairs, in any --data form ("": no evaluation)
    eval_split: str = "test"  # the split of an eval_data datasets name / DatasetDict
    eval_every: int = 0  # steps between evaluations (0: only at the end)
    eval_pairs: int = 0  # evaluate on the first N held-out pairs (0: all)
    best_metric: str = ""  # keep the best model in <output_dir>/best by this, e.g. eval/loss
    greater_is_better: bool | None = None  # none: lower is better for *loss, else higher
    # the loss (MPO, the paper's)
    beta: float = 0.1  # KL coefficient of the preference terms
    loss_types: tuple[str, ...] = ("sigmoid", "bco_pair", "sft")  # any of mpo_fast.LOSS_TYPES
    loss_weights: tuple[float, ...] = (0.8, 0.2, 1.0)  # one per loss type
    bco_delta: str = "running_mean"  # the paper's reward shift; "none" for delta = 0
    sft_normalize: str = "sequence"  # the paper's Eq. 5 (per answer); "token": TRL's token mean
    backend: str = "auto"  # the fused head: "auto" (Triton on CUDA, else torch), "triton", "torch"
    label_smoothing: float = 0.0  # cDPO / robust / exo_pair / aot
    reference: str = "auto"  # "copy" (frozen), "cached" (on disk), "adapter" (LoRA's; auto: LoRA)
    ref_cache_dir: str = ""  # for reference="cached" ("": <output_dir>/ref_cache)
    ref_sync_every: int = 0  # TR-DPO: update the reference from the policy every N steps (0: off)
    ref_sync_alpha: float = 1.0  # TR-DPO: ref <- a * policy + (1 - a) * ref (1: a hard copy)
    # LoRA (PEFT): adapters train, the model stays as it is
    lora_r: int = 0  # LoRA rank (0: full fine-tune)
    lora_alpha: float = 32.0  # LoRA scaling numerator (scale = alpha / r)
    lora_dropout: float = 0.05  # dropout on the adapters' input
    lora_target_modules: tuple[str, ...] = ()  # names, "all-linear" ("": LM linear layers)
    lora_save: str = "adapter"  # final/ holds the "adapter" or the "merged" model
    # optimization
    lr: float = 5e-6  # peak learning rate (AdamW)
    weight_decay: float = 0.05  # on matrices; biases and norms get none
    adam_betas: tuple[float, ...] = (0.9, 0.999)  # AdamW betas
    warmup_ratio: float = 0.03  # linear warmup over this fraction of the steps
    lr_schedule: str = "cosine"  # "cosine" (to min_lr_ratio * lr) or "constant" (after warmup)
    min_lr_ratio: float = 0.0  # where the cosine ends, as a fraction of lr
    max_grad_norm: float | None = 1.0  # gradient clipping (global norm); none or inf: off
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
    report_to: tuple[str, ...] = ("none",)  # "tensorboard", "wandb" too (none: metrics.jsonl)
    save_every: int = 0  # steps between checkpoints (0: only at the end)
    keep_checkpoints: int = 2  # newest checkpoints kept (0: all)
    resume: str = ""  # "" (fresh), "auto" (latest in output_dir if any) or a checkpoint path
    resume_force: bool = False  # resume a checkpoint whose run had other data / model / loss
    max_nonfinite_steps: int = 10  # stop with an error after this many non-finite steps in a row
    stop_signals: tuple[str, ...] = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGHUP")  # save, then exit
    progress: bool = True  # a progress bar on rank 0

    def __post_init__(self):
        _coerce(self)
        for name in ("loss_types", "loss_weights", "adam_betas"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            setattr(self, name, tuple(value))
        self.loss_weights = tuple(float(w) for w in self.loss_weights)
        self.adam_betas = tuple(float(b) for b in self.adam_betas)
        _choice("preset", self.preset, ("", "none", *PRESETS))
        _choice("on_bad_data", self.on_bad_data, ("skip", "raise"))
        _choice("sft_normalize", self.sft_normalize, ("sequence", "token"))
        _choice("backend", self.backend, ("auto", "triton", "torch"))
        asked = self.reference
        if self.reference == "auto":  # the adapter-disabled policy with LoRA: no second model
            self.reference = "adapter" if self.lora_r else "copy"
        _choice("reference", self.reference, ("copy", "cached", "adapter"))
        _choice("lora_save", self.lora_save, ("adapter", "merged"))
        for kind in self.report_to:
            _choice("report_to", kind, ("none", "tensorboard", "wandb"))
        _choice("torch_dtype", self.torch_dtype, ("float32", "bfloat16", "float16", "auto"))

        _choice("lr_schedule", self.lr_schedule, ("cosine", "constant"))
        _choice("dtype", self.dtype, ("auto", "bf16", "fp32"))
        _choice("distributed", self.distributed, ("auto", "ddp", "fsdp", "none"))
        if len(self.loss_weights) != len(self.loss_types):
            raise ValueError(f"loss_weights has {len(self.loss_weights)} entries for "
                             f"{len(self.loss_types)} loss_types {list(self.loss_types)}")
        if self.best_metric and not self.eval_data:
            raise ValueError(f"best_metric {self.best_metric!r} needs eval_data (held-out "
                             "pairs to evaluate)")
        for name in ("pairs_per_step", "max_tokens", "max_length", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        _check_ranges(self)
        _check_ref_sync(self, asked)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))


# Presets: defaults for a named setup, below a YAML file and flags. "paper" is InternVL's MPO
# recipe (InternVL2-8B-MPO: 256 pairs per optimizer step, reached by gradient accumulation
# over packed micro-batches, sequences up to 6144 tokens). "tiny" is the bundled demo: a
# random-init 2-layer model learns from scratch, so it needs lr ~1e-3, not 5e-6; "tiny-vl" the
# same for the bundled tiny VLM, whose image tiles need longer sequences.
PRESETS: dict[str, dict] = {
    "paper": dict(pairs_per_step=256, max_length=6144, max_tokens=16384, lr=5e-6, epochs=1.0,
                  max_steps=0, lr_schedule="cosine", warmup_ratio=0.03, min_lr_ratio=0.0,
                  weight_decay=0.05, beta=0.1, loss_types=("sigmoid", "bco_pair", "sft"),
                  loss_weights=(0.8, 0.2, 1.0), bco_delta="running_mean",
                  sft_normalize="sequence", max_grad_norm=1.0),
    "tiny": dict(lr=1e-3, weight_decay=0.0, warmup_ratio=0.05, max_steps=240,
                 pairs_per_step=32, max_tokens=384, max_length=64, log_every=10,
                 save_every=0),
    "tiny-vl": dict(lr=1e-3, weight_decay=0.0, warmup_ratio=0.05, max_steps=240,
                    pairs_per_step=8, max_tokens=1024, max_length=256, log_every=10,
                    save_every=0),
}
# the preset a model implies when none is named
MODEL_PRESETS = {"tiny": "tiny", "tiny-vl": "tiny-vl"}


def resolve(overrides: dict | None = None, yaml_path: str | None = None) -> TrainConfig:
    """Defaults, then the preset (``preset``, or the model's if it has one), then the YAML
    file, then ``overrides`` (the flags that were given)."""
    values: dict = {}
    if yaml_path:
        import yaml

        with open(yaml_path, encoding="utf-8") as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{yaml_path}: expected a mapping of config fields")
        values.update(from_trl(loaded, yaml_path))
    values.update(overrides or {})
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown config fields {unknown}; known: {sorted(known)}")
    name = values.get("preset") or MODEL_PRESETS.get(values.get("model", TrainConfig.model), "")
    if name not in ("", "none") and name not in PRESETS:
        raise ValueError(f"preset must be one of {('none', *PRESETS)}, got {name!r}")
    preset = PRESETS.get(name, {})
    return TrainConfig(**{**preset, **values, "preset": name})


# TRL's DPOConfig / ModelConfig / ScriptArguments names a --config file may use, for the
# fields that mean the same here (README "TRL names"); the value converted where its form
# differs. Fields with the same name (beta, max_length, warmup_ratio, ...) need no entry.
TRL_NAMES: dict[str, str] = {
    "learning_rate": "lr", "num_train_epochs": "epochs", "lr_scheduler_type": "lr_schedule",
    "logging_steps": "log_every", "save_steps": "save_every",
    "save_total_limit": "keep_checkpoints", "eval_steps": "eval_every",
    "resume_from_checkpoint": "resume", "metric_for_best_model": "best_metric",
    "loss_type": "loss_types", "padding_free": "packing",
    "precompute_ref_log_probs": "reference", "model_name_or_path": "model",
    "model_revision": "revision", "dtype": "torch_dtype", "dataset_name": "data",
    "dataset_config": "data_config", "dataset_train_split": "data_split",
    "dataset_test_split": "eval_split", "bf16": "dtype"}
_SCHEDULES = {"cosine": "cosine", "constant": "constant", "constant_with_warmup": "constant"}


def from_trl(values: dict, where: str = "config") -> dict:
    """``values`` with TRL's names (`TRL_NAMES`, adam_beta1/2, use_peft,
    per_device_train_batch_size x gradient_accumulation_steps) turned into TrainConfig fields;
    a field given under both names is an error."""
    out = {k: v for k, v in values.items() if k not in TRL_NAMES}

    def put(field: str, value, source: str) -> None:
        if field in out:
            raise ValueError(f"{where}: {source} and {field} both set {field}; give one")
        out[field] = value

    for trl, field in TRL_NAMES.items():
        if trl not in values:
            continue
        value = values[trl]
        if trl == "lr_scheduler_type":
            if value not in _SCHEDULES:
                raise ValueError(f"{where}: lr_scheduler_type {value!r}: only "
                                 f"{sorted(_SCHEDULES)} have a counterpart (lr_schedule)")
            value = _SCHEDULES[value]
        elif trl == "save_total_limit":
            value = value or 0
        elif trl == "resume_from_checkpoint":
            value = "auto" if value is True else (value or "")
        elif trl == "metric_for_best_model" and value:
            value = value if value.startswith("eval/") else "eval/" + value.removeprefix(
                "eval_")
        elif trl == "loss_type" and isinstance(value, str):
            value = [value]
        elif trl == "precompute_ref_log_probs":
            if not value:
                continue
            value = "cached"
        elif trl == "bf16":
            value = "bf16" if value else "fp32"
        put(field, value, trl)
    if "adam_beta1" in out or "adam_beta2" in out:
        put("adam_betas", (out.pop("adam_beta1", 0.9), out.pop("adam_beta2", 0.999)),
            "adam_beta1/adam_beta2")
    if out.pop("use_peft", False) and "lora_r" not in out:
        out["lora_r"] = 16  # TRL's ModelConfig default rank
    per_device = out.pop("per_device_train_batch_size", None)
    accumulation = out.pop("gradient_accumulation_steps", None)
    if per_device is not None or accumulation is not None:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        put("pairs_per_step", int(per_device or 8) * int(accumulation or 1) * world,
            "per_device_train_batch_size x gradient_accumulation_steps")
    return out


# Fields a resumed run may change: where and how often it reports and saves, how it splits
# the work (memory, processes). Every other field is the run's identity: `--resume` refuses a
# checkpoint whose run differed in one of them (unless --resume-force).
NOT_IDENTITY = frozenset({
    "preset", "output_dir", "resume", "resume_force", "progress", "log_every", "save_every",
    "keep_checkpoints", "max_nonfinite_steps", "stop_signals", "max_tokens",
    "gradient_checkpointing", "distributed", "on_bad_data", "ref_cache_dir", "backend",
    # evaluation reads the weights and changes nothing training reads
    "eval_data", "eval_split", "eval_every", "eval_pairs", "best_metric", "greater_is_better",
    "lora_save", "report_to"})


# Fields added after runs were saved without them, with the value those runs trained with
# (a new default must not slip into a resumed run unseen).
LEGACY_VALUES = {"sft_normalize": "token", "ref_sync_every": 0, "ref_sync_alpha": 1.0}


def identity_changes(saved: dict, now: dict) -> dict:
    """``{field: (saved value, current value)}`` for the identity fields that differ."""
    saved = {**{k: v for k, v in LEGACY_VALUES.items() if k in now}, **saved}
    return {k: (saved[k], now[k]) for k in sorted(set(saved) & set(now))
            if k not in NOT_IDENTITY and saved[k] != now[k]}


_YES, _NO = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}


def _coerce(cfg: TrainConfig) -> None:
    """Every field to its declared type, so that YAML's strings (YAML 1.1 reads ``1e-5`` as a
    string) and flags agree; a value that does not convert is an error naming the field."""
    for f in fields(cfg):
        kind = str(f.type).replace(" ", "")
        value = getattr(cfg, f.name)
        if kind.startswith("tuple["):
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, (list, tuple)):
                raise ValueError(f"{f.name} must be a list (or comma-separated), got {value!r}")
            inner = kind[len("tuple["):].split(",")[0]
            setattr(cfg, f.name, tuple(_convert(f.name, v, inner) for v in value))
        elif kind.endswith("|None") and (value is None or str(value).lower() in ("none", "null")):
            setattr(cfg, f.name, None)
        else:
            setattr(cfg, f.name, _convert(f.name, value, kind.removesuffix("|None")))


def _convert(name: str, value, kind: str):
    """``value`` as a ``kind`` ("int", "float", "bool" or "str"), or ValueError naming ``name``."""
    wrong = ValueError(f"{name} must be {'an' if kind == 'int' else 'a'} {kind}, got {value!r}")
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if str(value).strip().lower() in _YES | _NO:
            return str(value).strip().lower() in _YES
        raise wrong
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise wrong
    if kind == "str":
        return str(value)
    try:
        number = float(value) if isinstance(value, str) else value
    except ValueError:
        raise wrong from None
    if kind == "float":
        return float(number)
    if not math.isfinite(number) or number != int(number):
        raise wrong
    return int(number)


def _check_ranges(cfg: TrainConfig) -> None:
    """Every number in its range, named in the message: a setting that would silently do
    nothing (max_steps -3, max_grad_norm 0) or harm (a negative learning rate) is refused."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        for v in value if isinstance(value, tuple) else (value,):
            if isinstance(v, float) and not math.isfinite(v) and f.name != "max_grad_norm":
                raise ValueError(f"{f.name} must be finite, got {value!r}")
    if cfg.max_grad_norm is not None and not cfg.max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be > 0 (the global norm to clip to), or none / "
                         f"inf for no clipping; got {cfg.max_grad_norm}")
    if cfg.max_grad_norm == math.inf:
        cfg.max_grad_norm = None
    rules = [("lr", cfg.lr > 0, "> 0"), ("beta", cfg.beta > 0, "> 0"),
             ("epochs", cfg.epochs > 0, "> 0"), ("weight_decay", cfg.weight_decay >= 0, ">= 0"),
             ("min_lr_ratio", 0 <= cfg.min_lr_ratio <= 1, "in [0, 1]"),
             ("label_smoothing", 0 <= cfg.label_smoothing < 1, "in [0, 1)"),
             ("adam_betas", len(cfg.adam_betas) == 2 and all(0 <= b < 1 for b in cfg.adam_betas),
              "two values in [0, 1)"),
             ("max_steps", cfg.max_steps >= 0, ">= 0 (0: epochs decide)"),
             ("seed", cfg.seed >= 0, ">= 0"), ("save_every", cfg.save_every >= 0, ">= 0"),
             ("eval_every", cfg.eval_every >= 0, ">= 0 (0: only at the end)"),
             ("lora_r", cfg.lora_r >= 0, ">= 0 (0: no LoRA)"),
             ("lora_alpha", cfg.lora_alpha > 0, "> 0"),
             ("lora_dropout", 0 <= cfg.lora_dropout < 1, "in [0, 1)"),
             ("eval_pairs", cfg.eval_pairs >= 0, ">= 0 (0: all)"),
             ("keep_checkpoints", cfg.keep_checkpoints >= 0, ">= 0 (0: keep all)"),
             ("max_nonfinite_steps", cfg.max_nonfinite_steps >= 1, ">= 1"),
             ("ref_sync_every", cfg.ref_sync_every >= 0, ">= 0 (0: no reference syncing)"),
             ("ref_sync_alpha", 0 < cfg.ref_sync_alpha <= 1, "in (0, 1] (1: a hard copy)")]
    for name, ok, must in rules:
        if not ok:
            raise ValueError(f"{name} must be {must}, got {getattr(cfg, name)!r}")
    signals = {s.name for s in signal.Signals} - {"SIGKILL", "SIGSTOP"}
    unknown = [s for s in cfg.stop_signals if s not in signals]
    if unknown:
        raise ValueError(f"stop_signals: {unknown} are not signals a process can catch")


def _check_ref_sync(cfg: TrainConfig, asked: str) -> None:
    """TR-DPO (``ref_sync_every`` > 0) moves the reference's weights during training: only a
    reference with weights of its own (``copy``) can follow. Refused with the others (and
    with losses that use no reference), ``asked`` being the reference as given ("auto")."""
    if not cfg.ref_sync_every:
        return
    given = f"reference={asked!r}" + (f" (here {cfg.reference!r})" if asked == "auto" else "")
    if cfg.reference == "cached":
        raise ValueError(
            f"ref_sync_every={cfg.ref_sync_every} cannot be used with {given}: the cached "
            "reference log-probs are computed once, from the initial model, and cannot follow "
            "a reference that is updated during training; use reference='copy'")
    if cfg.reference == "adapter":
        raise ValueError(
            f"ref_sync_every={cfg.ref_sync_every} cannot be used with {given}: the "
            "adapter-disabled reference is the frozen base model, which syncing cannot "
            "update; use reference='copy' (a frozen copy of the LoRA policy, adapters "
            "included) or ref_sync_every=0")
    if set(cfg.loss_types) <= {"sft", "orpo"}:
        raise ValueError(f"ref_sync_every={cfg.ref_sync_every} does nothing: loss_types "
                         f"{list(cfg.loss_types)} use no reference")


def _choice(name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")

