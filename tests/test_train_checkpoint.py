"""Checkpoints: exact resume (weights, optimizer, schedule, BCO running mean, data position),
SIGTERM saves before exit, and SIGKILL mid-save leaves the previous checkpoint loadable."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from mpo_fast.train import checkpoint
from mpo_fast.train.loop import train

STEPS = 6
SETUP = """
import torch
from mpo_fast.data import tiny
from mpo_fast.train.config import TrainConfig

def setup(out, **kw):
    torch.set_num_threads(1)
    tok = tiny.tiny_tokenizer()
    model = tiny.tiny_lm(tok, hidden=32, layers=1, heads=2, seed=0)
    cfg = TrainConfig(**{**dict(model="given", data="given", output_dir=out, max_steps=6,
                                pairs_per_step=8, max_tokens=96, max_length=32, lr=3e-3,
                                warmup_ratio=0.2, log_every=1, save_every=2,
                                keep_checkpoints=3, progress=False), **kw})
    return cfg, dict(model=model, tokenizer=tok, examples=tiny.make_task(40, seed=1))
"""
namespace: dict = {}
exec(SETUP, namespace)
setup = namespace["setup"]
quiet = dict(log=lambda *a: None)


def weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """2N steps in one go: the reference every interrupted run must reproduce exactly."""
    threads = torch.get_num_threads()
    cfg, given = setup(str(tmp_path_factory.mktemp("straight")))
    result = train(cfg, **given, **quiet)
    torch.set_num_threads(threads)
    return result, weights(given["model"])


def _same(result, ref_result, ref_weights, model, first_step=1):
    losses = {h["step"]: h["loss"] for h in result.history}
    ref = {h["step"]: h["loss"] for h in ref_result.history}
    assert sorted(losses) == list(range(first_step, STEPS + 1))
    for step, loss in losses.items():
        assert loss == ref[step], (step, loss, ref[step])
    got = weights(model)
    for name, w in ref_weights.items():
        assert torch.equal(got[name], w), name
    assert torch.equal(result.loss_fn.bco_state, ref_result.loss_fn.bco_state)


def test_sigterm_checkpoints_then_resume_is_exact(straight, tmp_path, monkeypatch):
    ref_result, ref_weights = straight
    out = str(tmp_path / "run")
    save = checkpoint.save

    def save_then_sigterm(*args, **kwargs):
        path = save(*args, **kwargs)
        if path.endswith("step-00000002"):
            os.kill(os.getpid(), signal.SIGTERM)  # arrives during training, like a scheduler's
        return path

    monkeypatch.setattr(checkpoint, "save", save_then_sigterm)
    cfg, given = setup(out)
    first = train(cfg, **given, **quiet)
    monkeypatch.undo()
    # the request came after step 2: no further step is trained, step 2's checkpoint stands
    assert first.stopped_by == signal.SIGTERM and first.step == 2
    assert first.checkpoint.endswith("step-00000002")
    state = json.load(open(os.path.join(first.checkpoint, "trainer_state.json")))
    assert state["step"] == 2 and state["pairs_seen"] == 16

    cfg, given = setup(out, resume="auto")  # a fresh process: new model, same init
    second = train(cfg, **given, **quiet)
    second.history = first.history + second.history
    _same(second, ref_result, ref_weights, given["model"])
    lines = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    assert [x["step"] for x in lines] == list(range(1, STEPS + 1))


def test_sigkill_mid_checkpoint_leaves_the_previous_one_loadable(straight, tmp_path):
    ref_result, ref_weights = straight
    out, marker = str(tmp_path / "run"), str(tmp_path / "saving")
    script = tmp_path / "victim.py"
    script.write_text(SETUP + textwrap.dedent(f"""
        import time
        from mpo_fast.train import checkpoint
        from mpo_fast.train.loop import train

        write = checkpoint._save_weights
        def stuck(weights, f):
            write(weights, f)  # the weights are in; the rest of the folder never will be
            if "step-00000004" in f.name:
                open({marker!r}, "w").close()
                time.sleep(600)
        checkpoint._save_weights = stuck
        cfg, given = setup({out!r})
        train(cfg, **given, log=lambda *a: None)
    """))
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen([sys.executable, str(script)], env=env, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not os.path.exists(marker):
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.time() < deadline, "the victim never reached its second checkpoint"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    root = os.path.join(out, "checkpoints")
    assert sorted(os.listdir(root)) == [".tmp-step-00000004", "step-00000002"]
    assert checkpoint.latest(root).endswith("step-00000002")
    assert checkpoint.load_weights(checkpoint.latest(root))  # readable

    cfg, given = setup(out, resume="auto")
    resumed = train(cfg, **given, **quiet)
    _same(resumed, ref_result, ref_weights, given["model"], first_step=3)
    assert ".tmp-step-00000004" not in os.listdir(root)  # the next save cleared it


def test_checkpoint_folder_loads_in_transformers(straight, tmp_path):
    from transformers import AutoModelForCausalLM

    ref_result, ref_weights = straight
    path = ref_result.checkpoint
    assert {"config.json", "loss.safetensors", "manifest.json", "model.safetensors",
            "optimizer.pt", "rng-rank0.safetensors", "scheduler.pt", "trainer_state.json",
            "tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= set(
        os.listdir(path))
    assert checkpoint.verify(path) is None  # the manifest lists the tokenizer files too
    model = AutoModelForCausalLM.from_pretrained(path)
    got = dict(model.named_parameters())
    for name, w in ref_weights.items():
        assert torch.equal(got[name], w), name
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, stored once
