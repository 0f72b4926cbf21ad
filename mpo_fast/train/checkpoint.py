"""Atomic, checksummed checkpoints as one folder, exact resume, the run lock, stop signals.

    <output_dir>/checkpoints/step-00000120/
        model.safetensors     the policy's full weights under the Hugging Face names (tied
        config.json           weights once; the folder loads with from_pretrained)
        optimizer.pt          AdamW state (full, by parameter name: any process count loads it)
        scheduler.pt          the learning-rate schedule
        loss.safetensors      MPOLoss state: the BCO running mean and count
        ref.safetensors       the reference copy's weights, when TR-DPO syncing moved them
                              (``ref_sync_every``; absent otherwise: the initial model is it)
        rng-rank<r>.safetensors  every process's RNG states (python, numpy, torch, CUDA)
        trainer_state.json    step (the data position: see data.collate.step_pairs), config,
                              global_step, epoch, log_history, best metric (as the HF Trainer's)
        tokenizer files, generation_config.json (and processor files for a VLM, the adapter
                              of a PEFT policy): `export.write_model_files`, so the folder
                              loads with AutoModelForCausalLM + AutoTokenizer.from_pretrained
        manifest.json         sha256 and size of every file above, written last

Nothing in a checkpoint can run code: tensors are safetensors, the two ``.pt`` files are read
with ``torch.load(weights_only=True)`` (plain containers of tensors and numbers; anything else
is refused), the rest is JSON. Resume checks the manifest first, so a flipped byte or a
truncated file is named, and ``--resume auto`` falls back to the newest intact checkpoint.

Atomic: everything is written (and fsynced) into ``.tmp-step-<n>`` next to it; only then does
rank 0 rename it to ``step-<n>``. A process killed mid-save leaves a ``.tmp-*`` folder that
`latest` ignores (and the next save clears), and the previous checkpoint untouched. Non-finite
weights or optimizer state are never written. A failed write (disk full, permissions) raises
`CheckpointError` naming the cause and the file. Under DDP / FSDP2 the weights and optimizer
state are gathered to full tensors on rank 0 (``torch.distributed.checkpoint.state_dict``) and
scattered back on load.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import pickle
import random
import shutil
import signal
import socket
import threading
import time

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from ..console import RunError
from .distributed import Context, barrier, broadcast

__all__ = ["CheckpointError", "RunLock", "StopSignal", "candidates", "latest", "load",
           "load_weights", "rng_state", "save", "set_aside", "set_rng_state", "verify"]

PREFIX = "step-"
TMP_PREFIX = ".tmp-step-"
MANIFEST = "manifest.json"
REF_FILE = "ref.safetensors"
LOCK_FILE = "run.lock"


class CheckpointError(RunError):
    """A checkpoint that cannot be written, or cannot be trusted on load."""


def save(root: str, step: int, *, policy: nn.Module, optimizer, scheduler, ctx: Context,
         state: dict, config=None, keep: int = 0, files=None,
         reference: nn.Module | None = None) -> str:
    """Write checkpoint ``step`` under ``root`` atomically (replacing one of the same step);
    keep the newest ``keep`` up to this step (0: all). ``files(folder)``: writes the files
    that make the folder self-contained (tokenizer, generation config: rank 0, before the
    manifest, which lists them too).

    ``policy`` is the `MPOModel` (as wrapped by FSDP2, or the module inside DDP): its
    ``model.`` entries are the weights, the others (``loss_fn.bco_state``) the loss state.
    ``reference``: the reference copy's model (not sharded), written as ref.safetensors.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    final = os.path.join(root, f"{PREFIX}{step:08d}")
    tmp = os.path.join(root, f"{TMP_PREFIX}{step:08d}")
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights, optim = get_state_dict(policy, optimizer, options=options)
    bad = broadcast(_nonfinite(weights, optim) if ctx.main else None, ctx)
    if bad:
        raise CheckpointError(f"refusing to save checkpoint {final}: {bad} is not finite")
    with _naming_write_errors(final):
        if ctx.main:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        barrier(ctx)
        _write(os.path.join(tmp, f"rng-rank{ctx.rank}.safetensors"),
               lambda f: f.write(_rng_bytes()))
        if ctx.main:
            _write_main(tmp, weights, optim, scheduler, config,
                        {**state, "step": step, "world_size": ctx.world})
            if reference is not None:
                ref = {k: v.detach().cpu() for k, v in reference.state_dict().items()}
                _write(os.path.join(tmp, REF_FILE), lambda f: _save_weights(ref, f))
            if files is not None:
                files(tmp)
        barrier(ctx)  # every rank's RNG file is in
        if ctx.main:
            _write(os.path.join(tmp, MANIFEST), lambda f: f.write(_manifest(tmp, step)))
            _fsync(tmp)
            if os.path.isdir(final):  # a superseded copy of this step: out of the way first
                os.rename(final, os.path.join(root, f"{TMP_PREFIX}old-{step:08d}"))
            os.rename(tmp, final)
            _fsync(root)
            _prune(root, keep, step)
    barrier(ctx)
    return final


def _write_main(tmp: str, weights: dict, optim: dict, scheduler, config, state: dict) -> None:
    """Rank 0's files of a checkpoint (all but the RNG states and the manifest)."""
    model = {k[len("model."):]: v for k, v in weights.items() if k.startswith("model.")}
    loss = {k: v for k, v in weights.items() if not k.startswith("model.")}
    _write(os.path.join(tmp, "model.safetensors"), lambda f: _save_weights(model, f))
    _write(os.path.join(tmp, "loss.safetensors"), lambda f: f.write(safetensors_bytes(loss)))
    _write(os.path.join(tmp, "optimizer.pt"), lambda f: torch.save(optim, f))
    _write(os.path.join(tmp, "scheduler.pt"), lambda f: torch.save(scheduler.state_dict(), f))
    if config is not None:
        _write(os.path.join(tmp, "config.json"), lambda f: f.write(config.to_json_string().encode()))
    _write(os.path.join(tmp, "trainer_state.json"),
           lambda f: f.write(json.dumps(state, indent=1, default=str).encode()))


def candidates(root: str) -> list[str]:
    """The complete checkpoints under ``root``, newest first (``.tmp-*`` folders are not)."""
    if not os.path.isdir(root):
        return []
    steps = sorted((d for d in os.listdir(root) if d.startswith(PREFIX)), reverse=True)
    return [os.path.join(root, d) for d in steps]


def latest(root: str) -> str | None:
    """The newest complete checkpoint under ``root``, or None."""
    found = candidates(root)
    return found[0] if found else None


def verify(path: str) -> str | None:
    """Why the checkpoint folder ``path`` cannot be trusted (a file missing, or not the bytes
    its manifest records), or None when it is intact."""
    try:
        with open(os.path.join(path, MANIFEST), encoding="utf-8") as f:
            files = json.load(f)["files"]
    except FileNotFoundError:
        if _legacy(path):
            return None
        return f"{MANIFEST} is missing (the checkpoint is incomplete or was tampered with)"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{MANIFEST} is unreadable: {err}"
    for name, want in files.items():
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            return f"{name} is missing"
        if os.path.getsize(file) != want["bytes"]:
            return f"{name} has {os.path.getsize(file)} bytes, the manifest says {want['bytes']}"
        if _sha256(file) != want["sha256"]:
            return f"{name} does not match its sha256 in {MANIFEST} (corrupted or modified)"
    return None


def load(path: str, *, policy: nn.Module, optimizer, scheduler, ctx: Context,
         reference: nn.Module | None = None) -> dict:
    """Restore a checkpoint written by `save` (weights, loss state, optimizer, scheduler, this
    rank's RNG, and into ``reference`` its ref.safetensors if it has one) after checking its
    manifest; returns its trainer state (``step`` is the data position) with
    ``reference_saved`` (whether it held reference weights) and ``reference_loaded``. Raises
    `CheckpointError` for a checkpoint that fails the check or holds anything but tensors and
    plain values."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    why = verify(path)
    if why:
        raise CheckpointError(f"checkpoint {path} is not intact: {why}")
    state = read_state(path)
    with _naming_read_errors(os.path.join(path, "model.safetensors")):
        weights = {f"model.{k}": v for k, v in load_weights(path).items()}
    with _naming_read_errors(os.path.join(path, "loss.safetensors")):
        weights.update(load_file(os.path.join(path, "loss.safetensors")))
    optim = _load_pt(os.path.join(path, "optimizer.pt"))
    set_state_dict(policy, optimizer, model_state_dict=weights, optim_state_dict=optim,
                   options=StateDictOptions(full_state_dict=True))
    scheduler.load_state_dict(_load_pt(os.path.join(path, "scheduler.pt")))
    state["reference_saved"] = os.path.exists(os.path.join(path, REF_FILE))
    state["reference_loaded"] = state["reference_saved"] and reference is not None
    if state["reference_loaded"]:
        with _naming_read_errors(os.path.join(path, REF_FILE)):
            saved = load_weights(path, REF_FILE)
        try:
            reference.load_state_dict(saved)
        except RuntimeError as err:
            raise CheckpointError(f"{path}: {REF_FILE} does not fit this run's reference "
                                  f"model: {str(err)[:300]}") from err
    rng = os.path.join(path, f"rng-rank{ctx.rank}.safetensors")
    if state.get("world_size") == ctx.world and os.path.exists(rng):
        with _naming_read_errors(rng):
            _load_rng(rng)
    elif state.get("world_size") == ctx.world and _legacy(path):
        _load_legacy_rng(os.path.join(path, f"rng-rank{ctx.rank}.pt"))
    return state


def _legacy(path: str) -> bool:
    """A checkpoint from before manifests (RNG states in ``rng-rank<r>.pt``): loaded unverified,
    its ``.pt`` files still only weights-only."""
    return (os.path.exists(os.path.join(path, "rng-rank0.pt"))
            and not os.path.exists(os.path.join(path, "rng-rank0.safetensors")))


def read_state(path: str) -> dict:
    """A checkpoint's trainer_state.json (step, config, counters)."""
    try:
        with open(os.path.join(path, "trainer_state.json"), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path}: trainer_state.json unreadable: {err}") from err


def load_weights(path: str, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    """The model weights of a checkpoint folder (or its reference's: ``name``
    ref.safetensors), tied names restored."""
    file = os.path.join(path, name)
    weights = load_file(file)
    with safe_open(file, "pt") as f:
        aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    weights.update({alias: weights[name] for alias, name in aliases.items()})
    return weights


def set_aside(path: str, why: str) -> str:
    """Rename checkpoint ``path`` to ``<why>-step-<n>`` so that `latest` no longer picks it and
    no save overwrites it (nothing is deleted)."""
    root, name = os.path.split(path)
    target = os.path.join(root, f"{why}-{name}")
    n = 1
    while os.path.exists(target):
        n += 1
        target = os.path.join(root, f"{why}{n}-{name}")
    os.rename(path, target)
    return target


@contextlib.contextmanager
def _naming_read_errors(file: str):
    """A file that is not the safetensors it should be: a `CheckpointError` naming it."""
    try:
        yield
    except (SafetensorError, OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"cannot read {file}: {err}") from err


def _load_pt(path: str):
    """A ``.pt`` file of plain containers, tensors and numbers; a pickle that would build any
    other object (and so could run code) is refused, not run."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0][:300]
        raise CheckpointError(f"refusing {path}: it holds more than tensors and plain values, "
                              f"and loading it could run code ({first})") from err
    except (OSError, RuntimeError, EOFError) as err:
        raise CheckpointError(f"cannot read {path}: {err}") from err


# --------------------------------------------------------------------------- RNG


def rng_state() -> dict:
    """Every RNG the trainer may draw from: python, numpy, torch CPU and CUDA."""
    import numpy as np

    state = {"python": random.getstate(),
             "numpy": np.random.get_state(),  # noqa: NPY002 (the global one is what we save)
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])  # noqa: NPY002
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _rng_bytes() -> bytes:
    """`rng_state` as safetensors: the state vectors as tensors, the few scalars as JSON."""
    s = rng_state()
    version, mt, gauss = s["python"]
    _, keys, pos, has_gauss, cached = s["numpy"]
    tensors = {"python": torch.tensor(mt, dtype=torch.int64),
               "numpy": torch.from_numpy(keys.astype("int64")), "torch": s["torch"]}
    tensors.update({f"cuda.{i}": t for i, t in enumerate(s.get("cuda", []))})
    scalars = {"python": [version, gauss], "numpy": [int(pos), int(has_gauss), float(cached)]}
    return safetensors_bytes(tensors, metadata={"scalars": json.dumps(scalars)})


def _load_rng(path: str) -> None:
    import numpy as np

    t = load_file(path)
    with safe_open(path, "pt") as f:
        scalars = json.loads(f.metadata()["scalars"])
    version, gauss = scalars["python"]
    pos, has_gauss, cached = scalars["numpy"]
    state = {"python": (version, tuple(t["python"].tolist()), gauss),
             "numpy": ("MT19937", t["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached),
             "torch": t["torch"]}
    cuda = [t[k] for k in sorted((k for k in t if k.startswith("cuda.")),
                                 key=lambda k: int(k.split(".")[1]))]
    if cuda:
        state["cuda"] = cuda
    set_rng_state(state)


def _load_legacy_rng(path: str) -> None:
    import numpy as np

    old = _load_pt(path)
    old["python"] = (old["python"][0], tuple(old["python"][1]), old["python"][2])
    set_rng_state({"numpy": np.random.get_state(), **old})  # noqa: NPY002 (not saved then)


# --------------------------------------------------------------------------- stop signals


class StopSignal:
    """While active, the ``signals`` (names: SIGTERM, SIGINT, SIGUSR1 — what SLURM's
    ``--signal`` sends —, SIGHUP, ...) set ``.signum`` instead of killing the process, so the
    loop can stop at the next micro-batch boundary and checkpoint. A second SIGINT
    interrupts at once."""

    def __init__(self, signals=("SIGTERM", "SIGINT")):
        self.signals = [signal.Signals[name] for name in signals]
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
            for s in self.signals:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)
        return False


# --------------------------------------------------------------------------- run lock


class RunLock:
    """``<output_dir>/run.lock``: one run writes a folder at a time. The lock is an advisory
    ``flock`` on the file (the kernel drops it when its holder dies, SIGKILL included); the
    file names the holder (pid, host, start) for the refusal message. Where the file system
    has no flock, a holder whose pid is gone from this host counts as stale."""

    def __init__(self, folder: str, say=print):
        self.folder, self.say, self.fd = folder, say, None
        self.path = os.path.join(folder, LOCK_FILE)

    def acquire(self) -> RunLock:
        os.makedirs(self.folder, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        holder = _read_holder(fd)
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise self._refusal(holder) from None
        except OSError:  # no flock here (some network file systems): the pid decides
            if holder and (holder.get("host") != socket.gethostname()
                           or _alive(holder.get("pid", -1))):
                os.close(fd)
                raise self._refusal(holder) from None
        if holder:
            self.say(f"note: {self.folder} was locked by pid {holder.get('pid')} on "
                     f"{holder.get('host')}, which is no longer running (killed?): taking over")
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
        self.fd = fd
        return self

    def release(self) -> None:
        """Empty the file (its holder is gone) and drop the lock; the file stays, so that no
        second process can lock a deleted copy of it."""
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)
            self.fd = None

    def _refusal(self, holder: dict | None) -> RunError:
        who = (f"pid {holder.get('pid')} on host {holder.get('host')}, started "
               f"{holder.get('started')}" if holder else "another process")
        return RunError(f"{self.folder} is in use by another run ({who}; lock "
                            f"{self.path}): wait for it to finish, or train into another "
                            "--output-dir")


def _read_holder(fd: int) -> dict | None:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "null")
    except ValueError:
        return {"pid": "?", "host": "?", "started": "?"}


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError, TypeError):
        return False
    except PermissionError:
        return True
    return True


# --------------------------------------------------------------------------- files


def _save_weights(weights: dict[str, torch.Tensor], f) -> None:
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
    f.write(safetensors_bytes(unique, metadata={"format": "pt",
                                                "aliases": json.dumps(aliases)}))


class _WriteError(OSError):
    """An OSError with the file it happened on."""


def _write(path: str, fill) -> None:
    """Create ``path`` and let ``fill(file)`` write it, then fsync: every byte of a checkpoint
    goes through Python's file object, so a full disk is ENOSPC here, not an error from
    inside a serializer."""
    try:
        with open(path, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        raise _WriteError(err.errno, err.strerror or str(err), path) from err


class _naming_write_errors:
    """Turn a failed write into a `CheckpointError` that names the cause and the file."""

    def __init__(self, final: str):
        self.final = final

    def __enter__(self):
        return self

    def __exit__(self, kind, err, tb):
        if err is None or not isinstance(err, OSError):
            return False
        cause = {errno.ENOSPC: "no space left on the device",
                 errno.EDQUOT: "disk quota exceeded",
                 errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
                 errno.EROFS: "read-only file system"}.get(err.errno, err.strerror or str(err))
        where = err.filename or self.final
        raise CheckpointError(f"could not save checkpoint {self.final}: {cause} (writing "
                              f"{where}); the previous checkpoint is untouched") from err


def _manifest(folder: str, step: int) -> bytes:
    """Every file under ``folder`` (subfolders included, by relative path) but the manifest."""
    names = sorted(os.path.relpath(os.path.join(root, f), folder)
                   for root, _, files in os.walk(folder) for f in files)
    files = {name: {"sha256": _sha256(os.path.join(folder, name)),
                    "bytes": os.path.getsize(os.path.join(folder, name))}
             for name in names if name != MANIFEST}
    return json.dumps({"step": step, "files": files}, indent=1).encode()


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _nonfinite(weights: dict, optim: dict) -> str | None:
    """The first non-finite tensor of the weights, loss state or optimizer state, or None."""
    for name, t in weights.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    for key, slots in optim.get("state", {}).items():
        for slot, t in slots.items():
            if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                return f"optimizer state {slot} of {key}"
    return None


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _prune(root: str, keep: int, step: int) -> None:
    """Drop all but the newest ``keep`` checkpoints up to ``step`` (the one just written, so
    never the newest finite one: only finite ones are written), and leftovers of killed
    saves. Checkpoints past ``step`` (from before a resume at an older one) stay."""
    names = os.listdir(root)
    done = sorted(d for d in names if d.startswith(PREFIX) and d <= f"{PREFIX}{step:08d}")
    old = (done[:-keep] if keep > 0 else []) + [d for d in names if d.startswith(TMP_PREFIX)]
    for d in old:
        shutil.rmtree(os.path.join(root, d), ignore_errors=True)
