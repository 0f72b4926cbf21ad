"""TR-DPO reference syncing (issue 20, build 2; Gorbatovski et al. 2024): ``ref_sync_every`` /
``ref_sync_alpha`` move the frozen reference copy towards the policy after every N-th optimizer
step. A hard sync makes the reference the policy (the next step's rewards are exactly 0), a
soft one is the lerp; cached and adapter references (and FSDP) are refused; a checkpoint holds
the synced reference and a resume is bit-identical to the straight run. The bundled tiny model,
6 steps, a checkpoint every step."""

from __future__ import annotations

import contextlib
import json
import os
import shutil

import pytest
import torch
from test_train_checkpoint import STEPS, setup, weights

from mpo_fast.data import tiny
from mpo_fast.data.collate import PairTokenizer, collate
from mpo_fast.train import checkpoint, reference
from mpo_fast.train.config import TrainConfig, identity_changes, resolve
from mpo_fast.train.distributed import Context
from mpo_fast.train.loop import train

quiet = dict(log=lambda *a: None)
HARD = dict(ref_sync_every=2)
SOFT = dict(ref_sync_every=2, ref_sync_alpha=0.5)


def run(out, **kw):
    """The 6-step run of test_train_checkpoint, a checkpoint after every step, all kept."""
    threads = torch.get_num_threads()
    cfg, given = setup(str(out), save_every=1, keep_checkpoints=0, **kw)
    result = train(cfg, **given, **quiet)
    torch.set_num_threads(threads)
    return result, weights(given["model"])


@pytest.fixture(scope="module")
def hard(tmp_path_factory):
    return run(tmp_path_factory.mktemp("hard") / "run", **HARD)


@pytest.fixture(scope="module")
def soft(tmp_path_factory):
    return run(tmp_path_factory.mktemp("soft") / "run", **SOFT)


def ckpt(result, step: int) -> str:
    return os.path.join(result.output_dir, "checkpoints", f"{checkpoint.PREFIX}{step:08d}")


def policy_at(result, step: int) -> dict:
    return checkpoint.load_weights(ckpt(result, step))


def ref_at(result, step: int) -> dict:
    return checkpoint.load_weights(ckpt(result, step), checkpoint.REF_FILE)


def initial() -> dict:
    """The policy's weights before training (setup builds the same model every time)."""
    _, given = setup("unused")
    return {k: v.detach().clone() for k, v in given["model"].state_dict().items()}


def rewards(result) -> dict[int, tuple[float, float]]:
    return {h["step"]: (h["rewards/chosen"], h["rewards/rejected"]) for h in result.history}


# --------------------------------------------------------------------------- the sync itself


def test_sync_hard_copies_and_soft_lerps_the_policy():
    tok = tiny.tiny_tokenizer()
    model = tiny.tiny_lm(tok, hidden=32, layers=1, heads=2, seed=0)
    ctx = Context("none", 0, 1, torch.device("cpu"))
    ref = reference.FrozenCopy(model, ctx, contextlib.nullcontext)
    with torch.no_grad():  # the policy moves away from its copy
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    before = {n: p.detach().clone() for n, p in ref.model.named_parameters()}
    policy = {n: p.detach().clone() for n, p in model.named_parameters()}

    reference.sync(ref, model, 0.3)  # soft: 0.3 * policy + 0.7 * ref, computed here in fp64
    for n, r in ref.model.named_parameters():
        want = 0.3 * policy[n].double() + 0.7 * before[n].double()
        torch.testing.assert_close(r.double(), want, rtol=1e-6, atol=1e-7)
        assert not r.requires_grad
    assert any(not torch.equal(r, policy[n]) for n, r in ref.model.named_parameters())

    reference.sync(ref, model, 1.0)  # hard: the policy's weights exactly
    for n, r in ref.model.named_parameters():
        assert torch.equal(r, policy[n]), n
    # so the reference's log-probs of a batch are the policy's, bit for bit: rewards 0
    tokenize = PairTokenizer(tok, None, max_length=32)
    batch = collate([tokenize(e, i) for i, e in enumerate(tiny.make_task(4, seed=1))],
                    pad_id=tokenize.pad_id, packed=True)
    model.eval()
    for mine, theirs in zip(ref.logps(batch), reference.sequence_logps(model, batch),
                            strict=True):
        assert torch.equal(mine, theirs)


def test_sync_refuses_a_policy_with_other_parameters():
    tok = tiny.tiny_tokenizer()
    ctx = Context("none", 0, 1, torch.device("cpu"))
    ref = reference.FrozenCopy(tiny.tiny_lm(tok, hidden=32, layers=1, heads=2, seed=0), ctx,
                               contextlib.nullcontext)
    with pytest.raises(RuntimeError, match="different parameters"):
        reference.sync(ref, tiny.tiny_lm(tok, hidden=32, layers=2, heads=2, seed=0))


# --------------------------------------------------------------------------- in the loop


def test_hard_sync_every_2_steps_makes_the_reference_the_policy(hard):
    result, _ = hard
    r = rewards(result)
    assert sorted(r) == list(range(1, STEPS + 1))
    for step in (1, 3, 5):  # the first step after a sync (and step 1): reference = policy
        assert r[step] == (0.0, 0.0), (step, r[step])
    for step in (2, 4, 6):  # one optimizer step later the policy has moved
        assert r[step] != (0.0, 0.0), (step, r[step])
    for step in range(1, STEPS + 1):  # synced after steps 2, 4, 6; held in between
        ref, want = ref_at(result, step), policy_at(result, step - step % 2) if step > 1 \
            else initial()
        assert set(ref) == set(want)
        for name, w in want.items():
            assert torch.equal(ref[name], w), (step, name)
        manifest = json.load(open(os.path.join(ckpt(result, step), checkpoint.MANIFEST)))
        assert checkpoint.REF_FILE in manifest["files"]


def test_soft_sync_is_the_lerp_of_reference_and_policy(soft):
    result, _ = soft
    assert all(r != (0.0, 0.0) for step, r in rewards(result).items() if step > 1)
    ref = initial()
    for step in range(1, STEPS + 1):
        if step % 2 == 0:  # ref <- 0.5 * policy + 0.5 * ref, computed here from the checkpoints
            policy = policy_at(result, step)
            ref = {k: (0.5 * policy[k].double() + 0.5 * ref[k].double()).float() for k in ref}
        saved = ref_at(result, step)
        for name, w in ref.items():
            torch.testing.assert_close(saved[name], w, rtol=1e-6, atol=1e-7)
        ref = saved  # the next lerp starts from the reference the run really had


def test_no_sync_when_off(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(reference, "sync", lambda *a: calls.append(a))
    cfg, given = setup(str(tmp_path / "off"), max_steps=3, save_every=1, keep_checkpoints=0)
    result = train(cfg, **given, **quiet)
    assert calls == []
    assert rewards(result)[3] != (0.0, 0.0)
    for step in (1, 2, 3):  # nothing moved the reference: no reference weights saved
        assert not os.path.exists(os.path.join(ckpt(result, step), checkpoint.REF_FILE))

    cfg, given = setup(str(tmp_path / "on"), max_steps=3, save_every=0, ref_sync_every=1,
                       ref_sync_alpha=0.25)
    train(cfg, **given, **quiet)
    assert [(step_alpha[2]) for step_alpha in calls] == [0.25] * 3  # after steps 1, 2 and 3


# --------------------------------------------------------------------------- refusals


def test_refuses_references_that_cannot_follow_and_bad_values():
    for kw, words in [(dict(reference="cached"), ("ref_sync_every", "cached", "computed once")),
                      (dict(reference="adapter", lora_r=8), ("ref_sync_every", "adapter")),
                      (dict(lora_r=8), ("ref_sync_every", "'auto' (here 'adapter')")),
                      (dict(loss_types="sft", loss_weights="1.0"), ("ref_sync_every", "no "
                                                                    "reference"))]:
        with pytest.raises(ValueError) as err:
            TrainConfig(ref_sync_every=2, **kw)
        for word in words:
            assert word in str(err.value), (kw, str(err.value))
    for bad, name in [(dict(ref_sync_every=-1), "ref_sync_every"),
                      (dict(ref_sync_every=1.5), "ref_sync_every"),
                      (dict(ref_sync_alpha=0.0), "ref_sync_alpha"),
                      (dict(ref_sync_alpha=1.5), "ref_sync_alpha")]:
        with pytest.raises(ValueError, match=name):
            TrainConfig(**bad)
    # off, the other references stay as they were; the copy (with LoRA too) can follow
    assert TrainConfig(reference="cached").ref_sync_every == 0
    assert TrainConfig(lora_r=8, reference="copy", ref_sync_every=2).reference == "copy"
    # flags / YAML strings convert; a resume that changes syncing is another run
    cfg = resolve({"ref_sync_every": "3", "ref_sync_alpha": "0.5"})
    assert (cfg.ref_sync_every, cfg.ref_sync_alpha) == (3, 0.5)
    older = {k: v for k, v in cfg.to_dict().items() if not k.startswith("ref_sync")}
    assert set(identity_changes(older, cfg.to_dict())) == {"ref_sync_every", "ref_sync_alpha"}


def test_refuses_fsdp():
    cfg = TrainConfig(ref_sync_every=2)
    ctx = Context("fsdp", 0, 1, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"ref_sync_every.*FSDP"):
        reference.make(cfg, None, [], None, ctx, "unused", contextlib.nullcontext)


# --------------------------------------------------------------------------- resume


@pytest.mark.parametrize("kind,at", [("hard", 3), ("soft", 4)])
def test_resume_is_exact(kind, at, hard, soft, tmp_path):
    """Resumed at a step between syncs (hard: the reference is step 2's policy) and at a sync
    step (soft: a second sync on resume would show): the losses, the policy, the BCO state and
    the reference end bit-identical to the straight run."""
    straight, straight_weights = hard if kind == "hard" else soft
    kw = HARD if kind == "hard" else SOFT
    assert any(not torch.equal(ref_at(straight, at)[k], v) for k, v in initial().items())
    out = tmp_path / "run"
    shutil.copytree(os.path.dirname(ckpt(straight, 1)), out / "checkpoints")
    for step in range(at + 1, STEPS + 1):
        shutil.rmtree(out / "checkpoints" / f"{checkpoint.PREFIX}{step:08d}")
    threads = torch.get_num_threads()
    cfg, given = setup(str(out), save_every=1, keep_checkpoints=0, resume="auto", **kw)
    resumed = train(cfg, **given, **quiet)
    torch.set_num_threads(threads)

    want = {h["step"]: h for h in straight.history}
    assert [h["step"] for h in resumed.history] == list(range(at + 1, STEPS + 1))
    for h in resumed.history:
        for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins"):
            assert h[key] == want[h["step"]][key], (h["step"], key)
    got = weights(given["model"])
    for name, w in straight_weights.items():
        assert torch.equal(got[name], w), name
    assert torch.equal(resumed.loss_fn.bco_state, straight.loss_fn.bco_state)
    mine, theirs = ref_at(resumed, STEPS), ref_at(straight, STEPS)
    for name, w in theirs.items():
        assert torch.equal(mine[name], w), name
