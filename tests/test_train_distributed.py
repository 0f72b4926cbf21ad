"""DDP and FSDP2 through torchrun on 2 CPU processes (gloo): the same loss curve and weights as
one process with the same global batch, identical parameters and BCO running mean on every
rank (an LM head outside the wrapped forward would leave the ranks' heads apart)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from mpo_fast.train import checkpoint
from mpo_fast.train.loop import train

WORKER = """
import os, sys, torch
from mpo_fast.data import tiny
from mpo_fast.train.config import TrainConfig
from mpo_fast.train.loop import train

def setup(out, **kw):
    torch.set_num_threads(1)
    tok = tiny.tiny_tokenizer()
    model = tiny.tiny_lm(tok, hidden=32, layers=2, heads=2, seed=0)
    cfg = TrainConfig(model="given", data="given", output_dir=out, max_steps=3,
                      pairs_per_step=8, max_tokens=4096, max_length=32, lr=3e-3,
                      warmup_ratio=0.0, log_every=1, progress=False, **kw)
    return cfg, dict(model=model, tokenizer=tok, examples=tiny.make_task(40, seed=1))

if __name__ == "__main__":
    mode, out = sys.argv[1], sys.argv[2]
    cfg, given = setup(out, distributed=mode)
    r = train(cfg, **given, log=lambda *a: None)
    model = given["model"]
    local = {n: p.detach() for n, p in model.named_parameters()} if mode == "ddp" else {}
    torch.save({"losses": [h["loss"] for h in r.history], "weights": local,
                "bco": r.loss_fn.bco_state, "micro": [h["micro_batches"] for h in r.history],
                "pairs": [h["pairs"] for h in r.history],
                "sharded": all(type(p).__name__ == "DTensor" for p in model.parameters())},
               f"{out}/rank-{os.environ['RANK']}.pt")
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    namespace: dict = {}
    exec(WORKER, namespace)
    threads = torch.get_num_threads()
    cfg, given = namespace["setup"](str(tmp_path_factory.mktemp("single")), distributed="none")
    result = train(cfg, **given, log=lambda *a: None)
    torch.set_num_threads(threads)
    return result, {n: p.detach().clone() for n, p in given["model"].named_parameters()}


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one_with_the_same_global_batch(mode, single, tmp_path):
    ref, ref_weights = single
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(WORKER))
    out = str(tmp_path / mode)
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), str(script), mode,
           out]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [torch.load(f"{out}/rank-{r}.pt", weights_only=True) for r in range(2)]
    ref_losses = [h["loss"] for h in ref.history]
    for r in ranks:
        assert r["sharded"] == (mode == "fsdp")
        assert r["pairs"] == [8, 8, 8] and r["micro"] == [1, 1, 1]  # 4 pairs a rank, 8 a step
        assert r["losses"] == pytest.approx(ref_losses, rel=1e-5)  # the one-process curve
        assert torch.equal(r["bco"], ranks[0]["bco"])  # the same BCO state on every rank
        assert r["bco"][0].item() == pytest.approx(ref.loss_fn.bco_state[0].item(), rel=1e-5)
    if mode == "ddp":  # every rank holds the full parameters: identical, head included
        for name, w in ranks[0]["weights"].items():
            assert torch.equal(ranks[1]["weights"][name], w), name
    saved = checkpoint.load_weights(checkpoint.latest(os.path.join(out, "checkpoints")))
    for name, w in ref_weights.items():  # FSDP: gathered from the shards by the checkpoint
        assert rel(saved[name], w) < 1e-5, name
    if mode == "ddp":
        for name, w in ranks[0]["weights"].items():
            assert rel(w, ref_weights[name]) < 1e-5, name
