"""The trainer under faults and hostile input (issue 17): no code runs from a checkpoint, no
non-finite state is ever saved, one run per output folder, stop signals at a micro-batch
boundary, checksummed checkpoints with fallback, honest errors, and random SIGKILLs with
resume ending bit-identical to an uninterrupted run."""

from __future__ import annotations

import ast
import errno
import json
import os
import pathlib
import random
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import load_file
from test_train_checkpoint import SETUP, STEPS, _same, quiet, setup, straight

from mpo_fast.data import DataError
from mpo_fast.train import checkpoint, loop, model
from mpo_fast.train.config import TrainConfig, resolve
from mpo_fast.train.loop import NonFiniteError, train

__all__ = ["straight"]  # the uninterrupted reference run, shared with test_train_checkpoint

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def ckpt_root(out) -> str:
    return os.path.join(str(out), "checkpoints")


def logged(out) -> list[int]:
    return [json.loads(x)["step"] for x in open(os.path.join(str(out), "metrics.jsonl"))]


def assert_finite_checkpoint(path: str) -> None:
    """Every tensor of a checkpoint folder is finite (weights, BCO state, optimizer)."""
    for name, t in checkpoint.load_weights(path).items():
        assert torch.isfinite(t).all(), (path, name)
    for name, t in load_file(os.path.join(path, "loss.safetensors")).items():
        assert torch.isfinite(t).all(), (path, name)
    optim = torch.load(os.path.join(path, "optimizer.pt"), weights_only=True)
    for slots in optim["state"].values():
        for t in slots.values():
            assert torch.isfinite(torch.as_tensor(t)).all(), path
    assert checkpoint.verify(path) is None, path


# --------------------------------------------------------------------------- 1. no pickles


def torch_loads_without_weights_only(path: pathlib.Path) -> list[int]:
    """Line numbers of ``torch.load(...)`` / ``torch.serialization.load(...)`` calls in the
    file that do not pass ``weights_only=True`` literally."""
    bad = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "load"):
            continue
        owner = ast.unparse(node.func.value)
        if owner not in ("torch", "torch.serialization"):
            continue
        safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant)
                   and k.value.value is True for k in node.keywords)
        if not safe:
            bad.append(node.lineno)
    return bad


def test_every_torch_load_in_the_repository_is_weights_only(tmp_path):
    files = [p for d in ("mpo_fast", "bench", "tests") for p in sorted((ROOT / d).rglob("*.py"))]
    assert len(files) > 20
    offenders = {str(p.relative_to(ROOT)): lines for p in files
                 if (lines := torch_loads_without_weights_only(p))}
    assert not offenders, f"torch.load without weights_only=True: {offenders}"
    # the checker itself catches the forms it must (a test that cannot fail proves nothing)
    probe = tmp_path / "probe.py"
    probe.write_text("import torch\ntorch.load('a')\ntorch.load('b', weights_only=False)\n"
                     "torch.load(\n  'c',\n  map_location='cpu')\ntorch.load('d', weights_only=True)\n")
    assert torch_loads_without_weights_only(probe) == [2, 3, 4]


class Evil:
    """Unpickling this runs ``touch <marker>``: what an attacker's checkpoint file would do."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def rewrite_manifest(path: str) -> None:
    """What an attacker who can write the folder can also do: a manifest matching the files."""
    step = json.load(open(os.path.join(path, checkpoint.MANIFEST)))["step"]
    os.remove(os.path.join(path, checkpoint.MANIFEST))
    with open(os.path.join(path, checkpoint.MANIFEST), "wb") as f:
        f.write(checkpoint._manifest(path, step))


def test_a_malicious_pickle_in_any_checkpoint_file_never_runs(straight, tmp_path):
    ref_result, _ = straight
    good = ref_result.checkpoint
    marker = tmp_path / "pwned"
    # every file a resume reads (the tokenizer and generation files are for from_pretrained:
    # a resume never opens them, the manifest covers them)
    names = sorted(n for n in os.listdir(good) if n.endswith((".pt", ".safetensors"))
                   or n == "trainer_state.json")
    assert {"optimizer.pt", "scheduler.pt", "rng-rank0.safetensors",
            "model.safetensors"} <= set(names)
    for name in names:
        out = tmp_path / name
        target = os.path.join(ckpt_root(out), "step-00000006")
        shutil.copytree(good, target)
        torch.save({"state": Evil(str(marker)), "param_groups": []}, os.path.join(target, name))
        rewrite_manifest(target)
        cfg, given = setup(str(out), resume=target)
        with pytest.raises((checkpoint.CheckpointError, ValueError)) as err:
            train(cfg, **given, **quiet)
        assert not marker.exists(), f"unpickling {name} ran code"
        assert name in str(err.value), str(err.value)  # the refusal names the file
        if name.endswith(".pt"):
            assert "refusing" in str(err.value) and "run code" in str(err.value)


def test_resume_auto_skips_a_poisoned_newest_checkpoint_for_the_intact_one(straight, tmp_path):
    ref_result, ref_weights = straight
    out = tmp_path / "run"
    shutil.copytree(os.path.dirname(ref_result.checkpoint), ckpt_root(out))
    root = ckpt_root(out)
    assert [os.path.basename(c) for c in checkpoint.candidates(root)] == [
        "step-00000006", "step-00000004", "step-00000002"]
    newest, marker = checkpoint.latest(root), tmp_path / "pwned"
    torch.save(Evil(str(marker)), os.path.join(newest, "optimizer.pt"))
    rewrite_manifest(newest)
    said = []
    cfg, given = setup(str(out), resume="auto")
    resumed = train(cfg, **given, log=said.append)
    assert not marker.exists()
    assert any("not resuming from" in s and "optimizer.pt" in s for s in said), said
    assert any("resumed from" in s and "step-00000004" in s for s in said), said
    assert os.path.isdir(os.path.join(root, "corrupt-step-00000006"))  # kept, out of the way
    _same(resumed, ref_result, ref_weights, given["model"], first_step=5)


# --------------------------------------------------------------------------- 2. non-finite


def nan_at(monkeypatch, steps: set[int]):
    """In each optimizer step numbered in ``steps`` (0-based), the policy's hidden states of
    its first micro-batch become NaN (the reference, under no_grad, stays clean)."""
    real_hidden, real_pairs, now = model.hidden_states, loop.step_pairs, {"step": -1, "hit": -1}

    def step_pairs(step, *a, **k):
        now["step"] = step
        return real_pairs(step, *a, **k)

    def poisoned(m, batch):
        hidden = real_hidden(m, batch)
        if torch.is_grad_enabled() and now["step"] in steps and now["hit"] != now["step"]:
            now["hit"] = now["step"]
            return hidden * float("nan")
        return hidden

    monkeypatch.setattr(loop, "step_pairs", step_pairs)
    monkeypatch.setattr(model, "hidden_states", poisoned)


def test_one_nan_step_is_skipped_counted_and_never_saved(straight, tmp_path, monkeypatch):
    clean_bco = straight[0].loss_fn.bco_state
    out = tmp_path / "run"
    cfg, given = setup(str(out), keep_checkpoints=0)
    nan_at(monkeypatch, {random.randrange(1, STEPS)})
    said = []
    result = train(cfg, **given, log=said.append)
    assert result.step == STEPS and result.stopped_by is None
    assert result.skipped_nonfinite == 1
    bco = result.loss_fn.bco_state
    assert torch.isfinite(bco).all()
    assert 0 < bco[1] < clean_bco[1]  # the skipped step's rewards never entered the mean
    for p in given["model"].parameters():
        assert torch.isfinite(p).all()
    records = [json.loads(x) for x in open(out / "metrics.jsonl")]
    skipped = [r for r in records if r.get("skipped") == "nonfinite"]
    assert len(skipped) == 1 and records[-1]["skipped_nonfinite"] == 1
    assert all(r["loss"] == r["loss"] for r in records if "loss" in r)  # no NaN logged
    assert any("non-finite" in s for s in said) and any("skipped 1 steps" in s for s in said)
    saved = checkpoint.candidates(ckpt_root(out))
    assert len(saved) == STEPS // 2
    for path in saved:
        assert_finite_checkpoint(path)


def test_persistent_nans_stop_the_run_with_an_error_and_keep_the_last_good_checkpoint(
        tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg, given = setup(str(out), max_nonfinite_steps=2)
    nan_at(monkeypatch, set(range(2, STEPS)))  # two good steps, then NaNs
    with pytest.raises(NonFiniteError, match="2 optimizer steps in a row"):
        train(cfg, **given, **quiet)
    saved = checkpoint.candidates(ckpt_root(out))
    assert [os.path.basename(p) for p in saved] == ["step-00000002"]
    assert_finite_checkpoint(saved[0])


def test_save_refuses_non_finite_weights(tmp_path):
    _, given = setup(str(tmp_path / "run"))
    lm = given["model"]
    with torch.no_grad():
        next(lm.parameters())[0, 0] = float("inf")
    from mpo_fast import MPOLoss
    from mpo_fast.train.distributed import Context
    from mpo_fast.train.model import MPOModel

    policy = MPOModel(lm, MPOLoss())
    opt = torch.optim.AdamW(policy.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    ctx = Context("none", 0, 1, torch.device("cpu"))
    os.makedirs(tmp_path / "ck")
    with pytest.raises(checkpoint.CheckpointError, match="not finite"):
        checkpoint.save(str(tmp_path / "ck"), 1, policy=policy, optimizer=opt, scheduler=sched,
                        ctx=ctx, state={})
    assert os.listdir(tmp_path / "ck") == []


# --------------------------------------------------------------------------- 6. empty step


def test_a_step_whose_pairs_are_all_bad_is_skipped_not_a_crash(tmp_path, monkeypatch):
    cfg, given = setup(str(tmp_path / "run"))
    examples = given["examples"]
    from mpo_fast.data.collate import step_pairs

    doomed = set(step_pairs(2, len(examples), 8, cfg.seed, 0, 1))  # every pair of step 3
    real = loop.PairTokenizer.__call__

    def tokenize(self, ex, index=-1):
        if index in doomed:
            raise DataError("pairs.jsonl:7", "an image path that does not exist")
        return real(self, ex, index)

    monkeypatch.setattr(loop.PairTokenizer, "__call__", tokenize)
    result = train(cfg, **given, **quiet)
    assert result.step == STEPS and result.skipped_empty >= 1
    records = {r["step"]: r for r in result.history}
    assert records[3]["skipped"] == "empty" and records[3]["pairs"] == 0
    assert records[STEPS]["skipped_empty"] == result.skipped_empty


# --------------------------------------------------------------------------- 7. config


def test_config_values_are_converted_and_checked_by_name(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("lr: 1e-5\nmax_steps: '12'\npacking: 'false'\nmax_grad_norm: null\n"
                         "adam_betas: [0.9, '0.95']\n")
    cfg = resolve({}, str(yaml_file))
    assert cfg.lr == 1e-5 and isinstance(cfg.lr, float)
    assert cfg.max_steps == 12 and cfg.packing is False and cfg.max_grad_norm is None
    assert cfg.adam_betas == (0.9, 0.95)
    lr = random.choice([0, -1e-5])
    for bad, name in [(dict(max_steps=-3), "max_steps"), (dict(max_grad_norm=0), "max_grad_norm"),
                      (dict(min_lr_ratio=-0.5), "min_lr_ratio"), (dict(lr=lr), "lr"),
                      (dict(lr="fast"), "lr"), (dict(save_every=-1), "save_every"),
                      (dict(max_steps=2.5), "max_steps"), (dict(beta=float("nan")), "beta"),
                      (dict(weight_decay=-0.1), "weight_decay"), (dict(epochs=0), "epochs"),
                      (dict(max_nonfinite_steps=0), "max_nonfinite_steps"),
                      (dict(stop_signals="SIGKILL"), "stop_signals")]:
        with pytest.raises(ValueError, match=name):
            TrainConfig(**bad)


def test_metrics_never_record_a_step_twice_after_a_resume(straight, tmp_path):
    ref_result, ref_weights = straight
    out = tmp_path / "run"
    shutil.copytree(os.path.dirname(ref_result.checkpoint), ckpt_root(out))
    for c in checkpoint.candidates(ckpt_root(out))[:1]:  # the run got to 6 but resumes at 4
        shutil.rmtree(c)
    with open(out / "metrics.jsonl", "w") as f:  # records up to 5, the last one cut by a kill
        for r in ref_result.history[:5]:
            f.write(json.dumps(r) + "\n")
        f.write('{"step": 6, "lo')
    cfg, given = setup(str(out), resume="auto")
    resumed = train(cfg, **given, **quiet)
    _same(resumed, ref_result, ref_weights, given["model"], first_step=5)
    assert logged(out) == list(range(1, STEPS + 1))


# --------------------------------------------------------------------------- 3. run identity


HOLDER = """
import sys, time
from mpo_fast.train.checkpoint import RunLock
RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(600)
"""


def test_a_second_writer_is_refused_and_a_killed_holders_lock_is_taken_over(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], env=ENV,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        cfg, given = setup(str(out))
        with pytest.raises(RuntimeError) as err:
            train(cfg, **given, **quiet)
        message = str(err.value)
        assert str(out) in message and f"pid {holder.pid}" in message
        assert socket.gethostname() in message
        assert not os.path.exists(out / "metrics.jsonl")  # nothing was written
    finally:
        holder.kill()
        holder.wait()
    said = []
    cfg, given = setup(str(out))
    result = train(cfg, **given, log=said.append)
    assert result.step == STEPS
    assert any(f"pid {holder.pid}" in s and "no longer running" in s for s in said), said
    run = json.load(open(out / "run.json"))
    assert run["pid"] == os.getpid() and run["config"]["seed"] == 0
    assert open(out / "run.lock").read() == ""  # released at the end


def test_resume_refuses_another_runs_configuration_unless_forced(straight, tmp_path):
    ref_result, _ = straight
    out = tmp_path / "run"
    shutil.copytree(os.path.dirname(ref_result.checkpoint), ckpt_root(out))
    shutil.rmtree(checkpoint.latest(ckpt_root(out)))  # resume at step 4
    for change in (dict(seed=1), dict(lr=1e-3), dict(loss_types="sigmoid,sft",
                                                      loss_weights="1,1")):
        cfg, given = setup(str(out), resume="auto", **change)
        with pytest.raises(ValueError, match="other settings") as err:
            train(cfg, **given, **quiet)
        assert next(iter(change)) in str(err.value) and "--resume-force" in str(err.value)
    said = []  # output-only settings may change freely
    cfg, given = setup(str(out), resume="auto", log_every=2, keep_checkpoints=5, max_tokens=200)
    assert train(cfg, **given, log=said.append).step == STEPS
    cfg, given = setup(str(out / "forced"), resume=checkpoint.latest(ckpt_root(out)), seed=1,
                       resume_force=True)
    assert train(cfg, **given, log=said.append).step == STEPS
    assert any("--resume-force" in s and "seed" in s for s in said), said


# --------------------------------------------------------------------------- 5. integrity


def test_a_corrupted_newest_checkpoint_falls_back_to_the_previous_one(straight, tmp_path):
    ref_result, ref_weights = straight
    out = tmp_path / "run"
    shutil.copytree(os.path.dirname(ref_result.checkpoint), ckpt_root(out))
    newest = checkpoint.latest(ckpt_root(out))
    file = os.path.join(newest, "model.safetensors")
    data = bytearray(open(file, "rb").read())
    at = random.randrange(len(data) // 2, len(data))  # inside the tensors, past the header
    data[at] ^= 0xFF
    open(file, "wb").write(bytes(data))
    assert checkpoint.load_weights(newest)  # safetensors itself cannot tell
    assert "model.safetensors" in checkpoint.verify(newest)
    said = []
    cfg, given = setup(str(out), resume="auto")
    resumed = train(cfg, **given, log=said.append)
    assert any("not resuming from" in s and "sha256" in s for s in said), said
    assert any("newest intact checkpoint" in s and "step-00000004" in s for s in said), said
    _same(resumed, ref_result, ref_weights, given["model"], first_step=5)
    cfg, given = setup(str(out), resume=os.path.join(ckpt_root(out), "corrupt-step-00000006"))
    with pytest.raises(checkpoint.CheckpointError, match="not intact"):  # named, not used
        train(cfg, **given, **quiet)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES])
def test_a_failed_save_names_the_cause_and_the_file(tmp_path, monkeypatch, code):
    out = tmp_path / "run"
    real, calls = checkpoint._save_weights, [0]

    def failing(weights, f):
        calls[0] += 1
        if calls[0] == 2:  # the second checkpoint (step 4)
            raise OSError(code, os.strerror(code))
        real(weights, f)

    monkeypatch.setattr(checkpoint, "_save_weights", failing)
    cfg, given = setup(str(out))
    with pytest.raises(checkpoint.CheckpointError) as err:
        train(cfg, **given, **quiet)
    cause = "no space left" if code == errno.ENOSPC else "permission denied"
    assert cause in str(err.value) and "model.safetensors" in str(err.value)
    assert "step-00000004" in str(err.value)
    assert [os.path.basename(c) for c in checkpoint.candidates(ckpt_root(out))] == [
        "step-00000002"]
    assert checkpoint.verify(checkpoint.latest(ckpt_root(out))) is None


# --------------------------------------------------------------------------- 4. stop signals


def test_a_stop_request_mid_step_drops_the_partial_step_and_resume_is_exact(
        straight, tmp_path, monkeypatch):
    ref_result, ref_weights = straight
    out = tmp_path / "run"
    real, calls = loop.collate, [0]
    per_step = [h["micro_batches"] for h in ref_result.history]
    split = [i for i in range(STEPS - 1) if per_step[i] >= 2]
    assert split, per_step  # steps of several micro-batches, or there is no "mid-step"
    i = random.choice(split)  # the request arrives during a micro-batch of step i + 1 that
    at = sum(per_step[:i]) + 1 + random.randrange(per_step[i] - 1)  # is not its last

    def collate(*a, **k):
        calls[0] += 1
        if calls[0] == at:
            os.kill(os.getpid(), signal.SIGUSR1)
        return real(*a, **k)

    monkeypatch.setattr(loop, "collate", collate)
    cfg, given = setup(str(out))
    first = train(cfg, **given, **quiet)
    monkeypatch.undo()
    assert first.stopped_by == signal.SIGUSR1
    assert calls[0] == at  # not one more micro-batch after the request
    assert first.step == i  # the partial step was dropped, not finished
    if i:
        assert first.checkpoint.endswith(f"step-{i:08d}")
    else:  # stopped in the first step: nothing to save, a resume starts afresh
        assert first.checkpoint is None and checkpoint.latest(ckpt_root(out)) is None
    cfg, given = setup(str(out), resume="auto")
    second = train(cfg, **given, **quiet)
    second.history = first.history + second.history
    _same(second, ref_result, ref_weights, given["model"])
    assert logged(out) == list(range(1, STEPS + 1))


VICTIM = SETUP + """
import os, random, sys, time
from mpo_fast.train import loop
from mpo_fast.train.loop import train

out, pause = sys.argv[1], float(sys.argv[2])
real, calls = loop.collate, [0]
def collate(*a, **k):  # slower micro-batches: a signal lands mid-run, numerics unchanged
    calls[0] += 1  # "running" holds the micro-batches this process has started
    with open(os.path.join(out, "running.tmp"), "w") as f:
        f.write(str(calls[0]))
    os.replace(os.path.join(out, "running.tmp"), os.path.join(out, "running"))
    time.sleep(pause)
    return real(*a, **k)
loop.collate = collate
os.makedirs(out, exist_ok=True)
cfg, given = setup(out, resume="auto", save_every=1)
r = train(cfg, **given, log=lambda *a: None)
sys.exit(128 + r.stopped_by if r.stopped_by else 0)
"""


def start_victim(tmp_path, out, pause: float) -> subprocess.Popen:
    script = tmp_path / "victim.py"
    script.write_text(textwrap.dedent(VICTIM))
    running = os.path.join(str(out), "running")
    if os.path.exists(running):
        os.remove(running)
    return subprocess.Popen([sys.executable, str(script), str(out), str(pause)], env=ENV,
                            stderr=subprocess.PIPE)


def wait_running(proc, out, micro_batches: int = 1, timeout=120.0) -> bool:
    """Until the victim has started its ``micro_batches``-th micro-batch (True) or exits
    (False)."""
    deadline, running = time.time() + timeout, os.path.join(str(out), "running")
    while not (os.path.exists(running) and int(open(running).read() or 0) >= micro_batches):
        if proc.poll() is not None:
            return False
        assert time.time() < deadline, "the victim never started training"
        time.sleep(0.01)
    return True


def final_state(path: str) -> tuple[dict, torch.Tensor, dict]:
    optim = torch.load(os.path.join(path, "optimizer.pt"), weights_only=True)
    bco = load_file(os.path.join(path, "loss.safetensors"))["loss_fn.bco_state"]
    return checkpoint.load_weights(path), bco, optim


def assert_same_state(path: str, ref_path: str) -> None:
    (w, bco, opt), (rw, rbco, ropt) = final_state(path), final_state(ref_path)
    assert w.keys() == rw.keys()
    for name in rw:
        assert torch.equal(w[name], rw[name]), name
    assert torch.equal(bco, rbco)
    assert opt["state"].keys() == ropt["state"].keys()
    for key, slots in ropt["state"].items():
        for slot, t in slots.items():
            assert torch.equal(torch.as_tensor(opt["state"][key][slot]), torch.as_tensor(t))


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGHUP, signal.SIGTERM])
def test_each_stop_signal_to_a_running_process_leaves_an_exact_checkpoint(
        straight, tmp_path, sig):
    ref_result, ref_weights = straight
    out = tmp_path / "run"
    proc = start_victim(tmp_path, out, pause=0.05)
    assert wait_running(proc, out), proc.stderr.read().decode()[-3000:]
    time.sleep(random.uniform(0.2, 1.0))
    proc.send_signal(sig)
    assert proc.wait(timeout=300) == 128 + sig, proc.stderr.read().decode()[-3000:]
    stopped = checkpoint.latest(ckpt_root(out))  # None: stopped during the first step
    step = int(os.path.basename(stopped).split("-")[1]) if stopped else 0
    assert step < STEPS and (stopped is None or checkpoint.verify(stopped) is None)
    assert logged(out) == list(range(1, step + 1))
    cfg, given = setup(str(out), resume="auto")
    resumed = train(cfg, **given, **quiet)
    _same(resumed, ref_result, ref_weights, given["model"], first_step=step + 1)
    assert logged(out) == list(range(1, STEPS + 1))


# --------------------------------------------------------------------------- 8. SIGKILLs


def kill_and_resume(straight, tmp_path, kills: int, every_life_steps: bool) -> None:
    """``kills`` SIGKILLs at random points of a run (mid-step, mid-save, between steps), each
    after a random number of micro-batches (enough to finish a step if ``every_life_steps``)
    and a random delay, each
    followed by a resume; then the run is finished: its final weights, optimizer and BCO
    state are those of the uninterrupted run, and metrics.jsonl has each step once."""
    ref_result, _ = straight
    out = tmp_path / "run"
    rng = random.Random(int(torch.randint(0, 2**31, ())))
    most = max(h["micro_batches"] for h in ref_result.history) + 1
    done, reached = 0, []
    for _ in range(kills):
        proc = start_victim(tmp_path, out, pause=0.02)
        if wait_running(proc, out, rng.randint(most if every_life_steps else 1, most + 2)):
            time.sleep(rng.uniform(0.0, 0.15))
        proc.kill()
        proc.wait()
        done += proc.returncode == 0
        latest = checkpoint.latest(ckpt_root(out))
        reached.append(int(latest.rsplit("-", 1)[1]) if latest else 0)
    proc = start_victim(tmp_path, out, pause=0.0)
    assert proc.wait(timeout=600) == 0, proc.stderr.read().decode()[-3000:]
    final = checkpoint.latest(ckpt_root(out))
    assert final.endswith(f"step-{STEPS:08d}") and checkpoint.verify(final) is None
    assert_same_state(final, ref_result.checkpoint)
    assert logged(out) == list(range(1, STEPS + 1))
    assert done < kills  # the kills landed in the run, not all after its end
    assert any(0 < r < STEPS for r in reached), reached  # and some resumes were mid-run


def test_three_random_sigkills_then_resume_end_bit_identical(straight, tmp_path):
    kill_and_resume(straight, tmp_path, kills=3, every_life_steps=True)


@pytest.mark.slow
def test_twenty_random_sigkills_then_resume_end_bit_identical(straight, tmp_path):
    kill_and_resume(straight, tmp_path, kills=20, every_life_steps=False)


NAN_CLI = """
import sys
import torch
from mpo_fast.train import model
from mpo_fast.train.cli import main

real = model.hidden_states
model.hidden_states = lambda m, b: real(m, b) * (float("nan") if torch.is_grad_enabled() else 1)
sys.exit(main(sys.argv[1:]))
"""


def test_the_command_exits_non_zero_when_steps_stay_non_finite(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"largest of {i} 7 3", "chosen": "7",
                                        "rejected": str(i)}) + "\n" for i in range(8)))
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-c", NAN_CLI, "--model", "tiny", "--data", str(data), "--output-dir",
         str(out), "--max-steps", "4", "--pairs-per-step", "4", "--save-every", "1",
         "--max-nonfinite-steps", "2", "--no-progress"],
        env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "error: 2 optimizer steps in a row" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr  # the user's run, not a bug: one line
    saved = checkpoint.candidates(ckpt_root(out))  # step 1: skipped, its weights the initial
    assert [os.path.basename(p) for p in saved] == ["step-00000001"]
    assert_finite_checkpoint(saved[0])
    records = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert [r.get("skipped") for r in records] == ["nonfinite", "nonfinite"]


def test_a_run_saved_before_sft_normalize_resumes_only_as_token_mean():
    """Runs saved before the field existed trained with the token mean: a resume under the
    new default ("sequence") would switch the loss mid-run, so it is a named difference."""
    from mpo_fast.train.config import TrainConfig, identity_changes

    old = TrainConfig().to_dict()
    del old["sft_normalize"]
    assert identity_changes(old, TrainConfig().to_dict()) == {
        "sft_normalize": ("token", "sequence")}
    assert identity_changes(old, TrainConfig(sft_normalize="token").to_dict()) == {}
