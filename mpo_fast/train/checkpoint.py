"""Atomic checkpoints as one folder, exact resume, and a checkpoint on SIGTERM / SIGINT.

    <output_dir>/checkpoints/step-00000120/
        model.safetensors     the policy's full weights under the Hugging Face names (tied
        config.json           weights once; the folder loads with from_pretrained)
        optimizer.pt          AdamW state (full, by parameter name: any process count loads it)
        scheduler.pt          the learning-rate schedule
        loss.safetensors      MPOLoss state: the BCO running mean and count
        rng-rank<r>.pt        every process's RNG states (python, torch, CUDA)
        trainer_state.json    step (the data position: see data.collate.step_pairs), config

Atomic: everything is written (and fsynced) into ``.tmp-step-<n>`` next to it; only then does
rank 0 rename it to ``step-<n>``. A process killed mid-save leaves a ``.tmp-*`` folder that
`latest` ignores (and the next save clears), and the previous checkpoint untouched. Under
DDP / FSDP2 the weights and optimizer state are gathered to full tensors on rank 0
(``torch.distributed.checkpoint.state_dict``) and scattered back on load.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import threading

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .distributed import Context, barrier

__all__ = ["StopSignal", "latest", "load", "load_weights", "save"]

PREFIX = "step-"
TMP_PREFIX = ".tmp-step-"


def save(root: str, step: int, *, policy: nn.Module, optimizer, scheduler, ctx: Context,
         state: dict, config=None, keep: int = 0) -> str:
    """Write checkpoint ``step`` under ``root`` atomically; keep the newest ``keep`` (0: all).

    ``policy`` is the `MPOModel` (as wrapped by FSDP2, or the module inside DDP): its
    ``model.`` entries are the weights, the others (``loss_fn.bco_state``) the loss state.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    final = os.path.join(root, f"{PREFIX}{step:08d}")
    tmp = os.path.join(root, f"{TMP_PREFIX}{step:08d}")
    if os.path.isdir(final):
        return final  # this step is already saved
    if ctx.main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier(ctx)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights, optim = get_state_dict(policy, optimizer, options=options)
    _save_rng(os.path.join(tmp, f"rng-rank{ctx.rank}.pt"))
    if ctx.main:
        model = {k[len("model."):]: v for k, v in weights.items() if k.startswith("model.")}
        loss = {k: v for k, v in weights.items() if not k.startswith("model.")}
        _save_weights(model, os.path.join(tmp, "model.safetensors"))
        save_file(loss, os.path.join(tmp, "loss.safetensors"))
        torch.save(optim, os.path.join(tmp, "optimizer.pt"))
        torch.save(scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
        if config is not None:
            config.save_pretrained(tmp)
        _write_json(os.path.join(tmp, "trainer_state.json"), {**state, "step": step,
                                                              "world_size": ctx.world})
    barrier(ctx)  # every rank's RNG file is in
    if ctx.main:
        for name in os.listdir(tmp):
            _fsync(os.path.join(tmp, name))
        _fsync(tmp)
        os.rename(tmp, final)
        _fsync(root)
        _prune(root, keep)
    barrier(ctx)
    return final


def latest(root: str) -> str | None:
    """The newest complete checkpoint under ``root`` (``.tmp-*`` folders are not), or None."""
    if not os.path.isdir(root):
        return None
    steps = sorted(d for d in os.listdir(root) if d.startswith(PREFIX))
    return os.path.join(root, steps[-1]) if steps else None


def load(path: str, *, policy: nn.Module, optimizer, scheduler, ctx: Context) -> dict:
    """Restore a checkpoint written by `save` (weights, loss state, optimizer, scheduler, this
    rank's RNG); returns its trainer state (``step`` is the data position)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    with open(os.path.join(path, "trainer_state.json"), encoding="utf-8") as f:
        state = json.load(f)
    weights = {f"model.{k}": v for k, v in load_weights(path).items()}
    weights.update(load_file(os.path.join(path, "loss.safetensors")))
    optim = torch.load(os.path.join(path, "optimizer.pt"), map_location="cpu",
                       weights_only=False)
    set_state_dict(policy, optimizer, model_state_dict=weights, optim_state_dict=optim,
                   options=StateDictOptions(full_state_dict=True))
    scheduler.load_state_dict(torch.load(os.path.join(path, "scheduler.pt"),
                                         weights_only=False))
    rng = os.path.join(path, f"rng-rank{ctx.rank}.pt")
    if state.get("world_size") == ctx.world and os.path.exists(rng):
        _load_rng(rng)
    return state


def load_weights(path: str) -> dict[str, torch.Tensor]:
    """The model weights of a checkpoint folder, tied names restored."""
    file = os.path.join(path, "model.safetensors")
    weights = load_file(file)
    from safetensors import safe_open

    with safe_open(file, "pt") as f:
        aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    weights.update({alias: weights[name] for alias, name in aliases.items()})
    return weights


class StopSignal:
    """While active, SIGTERM and SIGINT set ``.signum`` instead of killing the process, so the
    loop can finish its step and checkpoint. A second SIGINT interrupts at once."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)
        return False


# --------------------------------------------------------------------------- files


def _save_weights(weights: dict[str, torch.Tensor], path: str) -> None:
    """safetensors refuses shared tensors: tied weights are stored once, the other names in
    the metadata (and left out, as Hugging Face checkpoints do)."""
    unique, aliases, seen = {}, {}, {}
    for name, t in weights.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            unique[name] = t.contiguous()
    save_file(unique, path, metadata={"format": "pt", "aliases": json.dumps(aliases)})


def _save_rng(path: str) -> None:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(state, path)


def _load_rng(path: str) -> None:
    state = torch.load(path, weights_only=False)
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, default=str)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _prune(root: str, keep: int) -> None:
    """Drop all but the newest ``keep`` checkpoints, and the leftovers of killed saves."""
    names = os.listdir(root)
    steps = sorted(d for d in names if d.startswith(PREFIX))
    old = (steps[:-keep] if keep > 0 else []) + [d for d in names if d.startswith(TMP_PREFIX)]
    for d in old:
        shutil.rmtree(os.path.join(root, d), ignore_errors=True)
