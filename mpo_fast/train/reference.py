"""The reference model's sequence log-probs, three ways; each has ``logps(batch) -> (chosen [B],
rejected [B])`` (fp32 sums of completion-token log-probs, no grad), passed to `MPOLoss` as
``ref_logps``.

    FrozenCopy       a deep copy of the policy before training: eval mode, no grad, its own
                     forward each micro-batch (images encoded once per pair, as the policy)
    CachedReference  the same numbers computed once for the whole dataset, before training, and
                     kept on disk keyed by a fingerprint of the data and the model (so a second
                     run, or a resume, reads them); no reference model in memory while training.
                     The file holds its fingerprint and a checksum of its table: one that does
                     not match (overwritten, edited, copied from another run, unreadable) is
                     recomputed, with a warning, never trusted
    AdapterDisabled  a PEFT/LoRA policy with its adapters switched off (needs `peft`)

TR-DPO (``ref_sync_every`` > 0): `sync` moves a FrozenCopy's weights towards the policy's
every N optimizer steps; only the copy can follow (config.py refuses the others).

All three go through `sequence_logps`: the backbone's hidden states and the fused head of
`mpo_fast.hf_model` (the policy's rules: logit scale, soft-cap, precision) — no logits.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import pickle
import warnings

import torch
from torch import nn

from ..data.collate import Batch, collate, micro_batches
from ..data.formats import DataError
from .distributed import Context, all_sum, barrier, shard
from .model import head_logprobs

__all__ = ["AdapterDisabled", "CachedReference", "FrozenCopy", "data_key", "fingerprint", "make",
           "sequence_logps", "sync"]

NO_REFERENCE = frozenset({"sft", "orpo"})


def make(cfg, model: nn.Module, examples, tokenize, ctx: Context, out_dir: str, autocast,
         amp_dtype=None):
    """The reference ``cfg.reference`` asks for (None when the loss needs none), made from
    ``model`` before training starts (and before a resume loads trained weights)."""
    if set(cfg.loss_types) <= NO_REFERENCE:
        return None
    if cfg.ref_sync_every and ctx.mode == "fsdp":
        raise ValueError("ref_sync_every (TR-DPO reference syncing) is not supported with FSDP "
                         "(the reference copy is sharded); use DDP (--distributed ddp) or "
                         "ref_sync_every=0")
    if cfg.reference == "copy":
        return FrozenCopy(model, ctx, autocast, amp_dtype, cfg.backend)
    if cfg.reference == "adapter":
        if ctx.mode == "fsdp":
            raise ValueError("reference='adapter' is not supported with FSDP; use 'copy' or "
                             "'cached'")
        return AdapterDisabled(model, autocast, amp_dtype, cfg.backend)
    config = getattr(model, "config", None)
    key = fingerprint(model, data_key(examples, tokenize),
                      {"amp": str(amp_dtype), "loss_head": "fused", "packed": cfg.packing,
                       "backend": cfg.backend,
                       "model_config": config.to_dict() if config is not None else None})

    def pair(i):
        try:
            return tokenize(examples[i], i)
        except DataError:
            return None  # skipped in training too

    return CachedReference.build(
        model, (pair, len(examples)), cfg.ref_cache_dir or os.path.join(out_dir, "ref_cache"),
        key, ctx, max_tokens=cfg.max_tokens, pad_id=tokenize.pad_id, packed=cfg.packing,
        autocast=autocast, amp_dtype=amp_dtype, backend=cfg.backend)


@torch.no_grad()
def sequence_logps(model: nn.Module, batch: Batch, amp_dtype: torch.dtype | None = None,
                   backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs of the batch's B chosen and B rejected sequences."""
    logp = head_logprobs(model, batch, amp_dtype, backend)
    seq = batch.segments.sum(logp) if batch.packed else logp.sum(-1)
    return seq[:batch.num_pairs], seq[batch.num_pairs:]


class FrozenCopy(nn.Module):
    """A frozen deep copy of ``model``; under FSDP2 sharded like the policy (this module is
    the root whose forward unshards the copy's top-level weights)."""

    def __init__(self, model: nn.Module, ctx: Context, autocast, amp_dtype=None,
                 backend: str = "auto"):
        super().__init__()
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.autocast, self.amp_dtype, self.backend = autocast, amp_dtype, backend
        if ctx.mode == "fsdp":
            shard(self)

    def forward(self, batch: Batch):
        with self.autocast():
            return sequence_logps(self.model, batch, self.amp_dtype, self.backend)

    def logps(self, batch: Batch):
        return self(batch)


def synced_weights(ref) -> nn.Module | None:
    """The model whose weights TR-DPO syncing moves: a frozen copy's (the only reference kind
    that is a module of its own); None for the cache, the adapter-disabled policy or none."""
    return ref.model if isinstance(ref, nn.Module) else None


@torch.no_grad()
def sync(ref: FrozenCopy, policy: nn.Module, alpha: float = 1.0) -> None:
    """TR-DPO's reference update (Gorbatovski et al. 2024), in place: every parameter of the
    reference becomes the policy's (``alpha`` 1: a hard update, an exact copy) or
    ``alpha * policy + (1 - alpha) * ref`` (soft: `torch.lerp`). ``policy`` is the unwrapped
    model (under DDP the module inside the wrapper: every rank holds the same weights and
    updates its own copy, no communication); its buffers are not trained and are left."""
    mine, theirs = dict(ref.model.named_parameters()), dict(policy.named_parameters())
    if mine.keys() != theirs.keys():
        raise RuntimeError("the reference copy and the policy have different parameters: "
                           f"{sorted(mine.keys() ^ theirs.keys())[:5]}")
    for name, r in mine.items():
        p = theirs[name].detach()
        if alpha == 1.0:
            r.copy_(p)
        else:
            r.lerp_(p.to(r.dtype), alpha)


class AdapterDisabled:
    """The PEFT policy itself with its adapters disabled (and dropout off) as the reference."""

    def __init__(self, model: nn.Module, autocast, amp_dtype=None, backend: str = "auto"):
        if not hasattr(model, "disable_adapter"):
            raise ValueError("reference='adapter' needs a PEFT model (with disable_adapter): "
                             "train with LoRA (--lora-r 16), or use reference='copy' for a "
                             "full fine-tune")
        self.model, self.autocast, self.amp_dtype = model, autocast, amp_dtype
        self.backend = backend

    def logps(self, batch: Batch):
        was_training = self.model.training
        self.model.eval()
        try:
            with self.model.disable_adapter(), self.autocast():
                return sequence_logps(self.model, batch, self.amp_dtype, self.backend)
        finally:
            self.model.train(was_training)


class CachedReference:
    """Reference log-probs of every pair, looked up by the batch's dataset indices."""

    def __init__(self, table: torch.Tensor, path: str = ""):
        self.table, self.path = table, path  # fp32 [P, 2]: (chosen, rejected)

    def logps(self, batch: Batch):
        rows = self.table[torch.tensor(batch.index)].to(batch.targets.device, non_blocking=True)
        return rows[:, 0], rows[:, 1]

    @classmethod
    def build(cls, model: nn.Module, tokenized, cache_dir: str, key: str, ctx: Context, *,
              max_tokens: int, pad_id: int, packed: bool, autocast, amp_dtype=None,
              backend: str = "auto") -> CachedReference:
        """Load the cache ``cache_dir/ref_logps-<key>.pt``, or compute it with ``model`` (the
        policy before training), every rank a share, and write it once (atomically).

        ``tokenized``: a function ``i -> TokenizedPair`` and the number of pairs, as
        ``(fn, P)``; ``key``: `fingerprint` of the model and data."""
        fn, P = tokenized
        path = os.path.join(cache_dir, f"ref_logps-{key}.pt")
        if os.path.exists(path):
            table = _read_cache(path, key, P)
            if table is not None:
                return cls(table, path)
        table = torch.zeros(P, 2, dtype=torch.float64, device=ctx.device)
        mine = [p for p in (fn(i) for i in range(ctx.rank, P, ctx.world)) if p is not None]
        was_training = model.training
        model.eval()
        with contextlib.ExitStack() as stack:
            stack.enter_context(autocast())
            for group in micro_batches(mine, max_tokens):
                batch = collate([mine[i] for i in group], pad_id=pad_id,
                                packed=packed).to(ctx.device)
                chosen, rejected = sequence_logps(model, batch, amp_dtype, backend)
                index = torch.tensor(batch.index, device=ctx.device)
                table[index, 0], table[index, 1] = chosen.double(), rejected.double()
        model.train(was_training)
        table = all_sum(table, ctx).float().cpu()
        if ctx.main:
            os.makedirs(cache_dir, exist_ok=True)
            tmp = f"{path}.tmp{os.getpid()}"
            torch.save({"table": table, "key": key, "pairs": P, "sha256": _checksum(table)}, tmp)
            os.replace(tmp, path)
        barrier(ctx)
        return cls(table, path)


def _read_cache(path: str, key: str, pairs: int) -> torch.Tensor | None:
    """The table of a cache file, or None (with a warning saying why) when the file is not
    exactly what this run would have written: its recorded fingerprint must be ``key``, its
    table [pairs, 2] fp32 with the recorded checksum. Tensors only (weights_only=True)."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # weights_only refused it: never retried without
        return _stale(path, "it holds objects other than tensors (refused unread)")
    except Exception as exc:  # truncated, not a torch file
        first = (str(exc).splitlines() or [""])[0]
        return _stale(path, f"cannot be read ({type(exc).__name__}: {first})")
    if not isinstance(saved, dict) or saved.get("key") != key:
        return _stale(path, "it records another fingerprint (written for another model, data "
                      "or settings, or by an older version)")
    table = saved.get("table")
    if not (isinstance(table, torch.Tensor) and table.dtype == torch.float32
            and tuple(table.shape) == (pairs, 2)):
        return _stale(path, f"its table is not [{pairs}, 2] float32")
    if saved.get("sha256") != _checksum(table):
        return _stale(path, "its table does not match its checksum (modified after it was "
                      "written)")
    return table


def _stale(path: str, why: str) -> None:
    warnings.warn(f"reference cache {path} is not used: {why}; recomputing it", stacklevel=3)
    return None


def _checksum(table: torch.Tensor) -> str:
    return hashlib.sha256(table.contiguous().numpy().tobytes()).hexdigest()


def fingerprint(model: nn.Module, data_key: str, extra: dict) -> str:
    """A short hash of the model's weights (a strided sample of every tensor, with names,
    shapes and dtypes), the data (``data_key``) and whatever else changes the numbers."""
    h = hashlib.sha256()
    h.update(json.dumps({"data": data_key, **extra}, sort_keys=True, default=str).encode())
    for name, t in model.state_dict().items():
        flat = t.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 65536)].float().cpu()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def data_key(examples, tokenize) -> str:
    """What of the data changes the reference log-probs: every pair's text and image files
    (path, size, mtime), the tokenizer (class, size, chat template) and max_length."""
    h = hashlib.sha256()
    tok = tokenize.tokenizer
    h.update(f"{type(tok).__name__}{len(tok)}{getattr(tok, 'chat_template', None)}"
             f"{tokenize.max_length}{getattr(tok, 'name_or_path', '')}".encode())
    for ex in examples:
        h.update(json.dumps([ex.prompt, ex.chosen, ex.rejected], default=str).encode())
        for image in ex.images:
            h.update(f"{image}{_file_stamp(image)}".encode())
    return h.hexdigest()


def _file_stamp(image) -> tuple | None:
    """(size, mtime) of an image file; None for an in-memory image or a file gone missing
    (tokenizing the pair then reports it as bad data)."""
    try:
        st = os.stat(image) if isinstance(image, str) else None
    except OSError:
        return None
    return st and (st.st_size, st.st_mtime_ns)
