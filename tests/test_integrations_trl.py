"""FusedDPOTrainer against the installed trl.DPOTrainer (pinned: trl 1.16.0).

One training step of each, same seed, same random-init models and data: the same loss, the same
gradients (fp32 tolerance) and the same logged metrics, for a tiny causal LM and a tiny
HF-native InternVL with images; plus what TRL cannot do (padding-free pairs, images encoded once,
precomputed reference log-probs for a VLM), the paper's BCO running mean, the version gate, and
DDP on two CPU processes (gloo).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("datasets")

import hf_tiny as _tiny
from datasets import Dataset
from safetensors.torch import load_file
from transformers import TrainerCallback
from trl import DPOConfig, DPOTrainer

from mpo_fast import MPOLoss, packing
from mpo_fast.integrations import _head
from mpo_fast.integrations import trl as fused_trl
from mpo_fast.integrations.trl import FusedDPOTrainer, check_trl_version
from mpo_fast.mpo import LOSS_STATE_FILE

MPO = {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]}


class _Grads(TrainerCallback):
    """The gradients the optimizer is about to apply (clipping is off in these tests)."""

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()
                      if p.grad is not None}


def _config(folder, **overrides) -> DPOConfig:
    base = {"output_dir": os.path.join(str(folder), "out"), "per_device_train_batch_size": 2,
            "max_steps": 1, "report_to": [], "logging_steps": 1, "save_strategy": "no",
            "use_cpu": True, "bf16": False, "gradient_checkpointing": False,
            "max_grad_norm": 0.0, "disable_tqdm": True, "seed": 0}
    return DPOConfig(**{**base, **overrides})


def _step(cls, tmp_path, model, ref, rows, processing, fused_kwargs=None, both=None, **config):
    """One training step; (logged metrics, gradients, trainer). ``fused_kwargs`` go to
    FusedDPOTrainer only, ``both`` to either trainer."""
    grads = _Grads()
    kwargs = {**(both or {}), **((fused_kwargs or {}) if cls is FusedDPOTrainer else {})}
    trainer = cls(model=copy.deepcopy(model), ref_model=copy.deepcopy(ref),
                  args=_config(tmp_path, **config), train_dataset=Dataset.from_list(rows),
                  processing_class=processing, callbacks=[grads], **kwargs)
    trainer.train()
    return trainer.state.log_history[0], grads.grads, trainer


def _assert_same(trl_run, ours_run):
    (logs, grads, _), (our_logs, our_grads, _) = trl_run, ours_run
    assert list(our_logs) == list(logs), "logged metric names (and order) differ"
    for key, value in logs.items():
        if key in ("train_runtime",):
            continue
        assert our_logs[key] == pytest.approx(value, rel=1e-5, abs=_abs_tol(key)), key
    assert set(our_grads) == set(grads)
    for name, g in grads.items():
        assert torch.isfinite(our_grads[name]).all(), name
        err = ((our_grads[name] - g).norm() / g.norm().clamp(min=1e-30)).item()
        assert err <= 1e-5, f"{name}: relative gradient error {err:.2e}"
    assert any(g.norm() > 0 for g in grads.values())


def _abs_tol(key: str) -> float:
    """Rewards are beta * differences of fp32 sums of ~50 token log-probs (each sum ~ -50):
    two fp32 implementations differ by ~1e-5 in a sum, so ~1e-6 in a reward, whatever its size."""
    return 2e-5 if key.startswith(("rewards/", "bco/", "eval_rewards/")) else 1e-6


@pytest.fixture
def spy_mpo_loss(monkeypatch):
    """Counts MPOLoss calls: proves the loss came from the fused path."""
    calls = []
    forward = MPOLoss.forward

    def counted(self, *args, **kwargs):
        calls.append(1)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(MPOLoss, "forward", counted)
    return calls


@pytest.fixture(scope="module")
def text_setup():
    tok = _tiny.tokenizer()
    return tok


TEXT_CASES = {
    "mpo": (MPO, {}),
    "sigmoid": ({"loss_type": ["sigmoid"]}, {}),
    "ipo": ({"loss_type": ["ipo"]}, {}),
    "hinge": ({"loss_type": ["hinge"]}, {}),
    "robust+aot_unpaired": ({"loss_type": ["robust", "aot_unpaired"], "label_smoothing": 0.1},
                            {}),
    "the other loss types": ({"loss_type": ["nca_pair", "sppo_hard", "apo_zero", "apo_down",
                                            "discopop", "exo_pair", "aot"],
                              "label_smoothing": 1e-3}, {}),
    "precomputed_reference": ({**MPO, "precompute_ref_log_probs": True}, {}),
    "padding_free": ({**MPO, "padding_free": True, "gradient_checkpointing": True}, {}),
    "sigmoid_norm (TRL's loss code)": ({"loss_type": ["sigmoid_norm", "sft"]}, {}),
}


@pytest.mark.parametrize("case", list(TEXT_CASES))
def test_text_step_matches_trl(case, text_setup, tmp_path, spy_mpo_loss, monkeypatch):
    config, fused_kwargs = TEXT_CASES[case]
    tok = text_setup
    model, ref = _tiny.causal_lm(tok), _tiny.causal_lm(tok)  # ref != policy: rewards != 0
    rows = _tiny.pairs(4, seed=int(torch.randint(0, 2**31, ())))
    packs = []
    pack = packing.pack
    monkeypatch.setattr(packing, "pack", lambda *a, **k: packs.append(1) or pack(*a, **k))
    expected = _step(DPOTrainer, tmp_path, model, ref, rows, tok, **config)
    assert not packs and not spy_mpo_loss
    ours = _step(FusedDPOTrainer, tmp_path, model, ref, rows, tok, fused_kwargs, **config)
    _assert_same(expected, ours)
    trainer = ours[2]
    if case.startswith("sigmoid_norm"):
        assert trainer.mpo_loss is None and not spy_mpo_loss
        assert "sigmoid_norm" in fused_trl.fused_loss_blocker(trainer.args)
    else:
        assert trainer.mpo_loss is not None and spy_mpo_loss
    assert bool(packs) == (case == "padding_free")
    if case == "precomputed_reference":
        assert "ref_chosen_logps" in trainer.train_dataset.column_names


def test_peft_reference_matches_trl(text_setup, tmp_path):
    """No reference model: TRL's reference is the policy with its LoRA adapter disabled."""
    peft = pytest.importorskip("peft")
    tok = text_setup
    model = _tiny.causal_lm(tok)
    rows = _tiny.pairs(4, seed=int(torch.randint(0, 2**31, ())))
    lora = {"peft_config": peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])}
    expected = _step(DPOTrainer, tmp_path, model, None, rows, tok, both=lora, **MPO)
    ours = _step(FusedDPOTrainer, tmp_path, model, None, rows, tok, both=lora, **MPO)
    assert ours[2].ref_model is None and ours[2].mpo_loss is not None
    assert all("lora_" in name for name in ours[1])
    _assert_same(expected, ours)


def test_moe_router_loss_matches_trl(text_setup, tmp_path):
    """A Mixture-of-Experts policy: TRL adds router_aux_loss_coef * the load-balancing loss."""
    from transformers import MixtralConfig, MixtralForCausalLM

    tok = text_setup
    cfg = MixtralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=32,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        num_local_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.1,
                        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    model, ref = MixtralForCausalLM(cfg), MixtralForCausalLM(cfg)
    rows = _tiny.pairs(4, seed=int(torch.randint(0, 2**31, ())))
    expected = _step(DPOTrainer, tmp_path, model, ref, rows, tok, **MPO)
    ours = _step(FusedDPOTrainer, tmp_path, model, ref, rows, tok, **MPO)
    assert expected[0]["aux_loss"] > 0
    _assert_same(expected, ours)


@pytest.mark.parametrize("precompute", [False, True], ids=["live", "precomputed"])
def test_reference_equal_to_the_policy_ties_like_trl(text_setup, tmp_path, precompute):
    """The first step of a standard run: the reference is the policy, so TRL logs rewards of
    exactly 0 and an accuracy of 0 (no chosen reward > rejected). Ours must too: the reference
    is scored with the policy's rows and summed with the policy's reductions."""
    tok = text_setup
    model = _tiny.causal_lm(tok)
    rows = _tiny.pairs(4, seed=int(torch.randint(0, 2**31, ())))
    config = {**MPO, "precompute_ref_log_probs": precompute}
    expected = _step(DPOTrainer, tmp_path, model, model, rows, tok, **config)
    ours = _step(FusedDPOTrainer, tmp_path, model, model, rows, tok, **config)
    for logs in (expected[0], ours[0]):
        assert logs["rewards/chosen"] == logs["rewards/margins"] == 0.0
        assert logs["rewards/accuracies"] == 0.0
    _assert_same(expected, ours)


def test_precomputed_reference_never_reads_trls_cache(text_setup, tmp_path, monkeypatch):
    """TRL caches precomputed reference log-probs by (dataset, model) fingerprints: after a TRL
    run on the same data and model, ours must use its own (TRL's head rounds differently,
    which once broke the exact ties of the test above). TRL's run here caches values off by
    one nat, so reading its cache cannot go unnoticed."""
    tok = text_setup
    model = _tiny.causal_lm(tok)
    rows = _tiny.pairs(4, seed=int(torch.randint(0, 2**31, ())))
    config = {**MPO, "precompute_ref_log_probs": True}
    trls = DPOTrainer.compute_ref_log_probs
    with monkeypatch.context() as m:
        m.setattr(DPOTrainer, "compute_ref_log_probs",
                  lambda self, *a: tuple(t - 1.0 for t in trls(self, *a)))
        _step(DPOTrainer, tmp_path, model, model, rows, tok, **config)
    ours = []
    real = FusedDPOTrainer.compute_ref_log_probs
    monkeypatch.setattr(FusedDPOTrainer, "compute_ref_log_probs",
                        lambda self, *a: ours.append(real(self, *a)) or ours[-1])
    trainer = _step(FusedDPOTrainer, tmp_path, model, model, rows, tok, **config)[2]
    computed = torch.cat([torch.cat(pair) for pair in zip(*ours, strict=True)])
    stored = torch.cat([torch.tensor(trainer.train_dataset[k])
                        for k in ("ref_chosen_logps", "ref_rejected_logps")])
    torch.testing.assert_close(stored, computed, rtol=0, atol=0)


def test_evaluation_matches_trl(text_setup, tmp_path):
    tok = text_setup
    model, ref = _tiny.causal_lm(tok), _tiny.causal_lm(tok)
    rows = _tiny.pairs(4, seed=int(torch.randint(0, 2**31, ())))
    results = []
    for cls in (DPOTrainer, FusedDPOTrainer):
        trainer = cls(model=copy.deepcopy(model), ref_model=copy.deepcopy(ref),
                      args=_config(tmp_path, per_device_eval_batch_size=2, **MPO),
                      train_dataset=Dataset.from_list(rows),
                      eval_dataset=Dataset.from_list(rows), processing_class=tok)
        results.append(trainer.evaluate())
    expected, ours = results
    assert list(ours) == list(expected)
    for key, value in expected.items():
        if not key.endswith(("runtime", "per_second")):
            assert ours[key] == pytest.approx(value, rel=1e-5, abs=_abs_tol(key)), key


def test_head_metrics_off_drops_only_the_head_statistics(text_setup, tmp_path):
    tok = text_setup
    model, ref = _tiny.causal_lm(tok), _tiny.causal_lm(tok)
    rows = _tiny.pairs(4, seed=int(torch.randint(0, 2**31, ())))
    logs, grads, _ = _step(DPOTrainer, tmp_path, model, ref, rows, tok, **MPO)
    ours, our_grads, _ = _step(FusedDPOTrainer, tmp_path, model, ref, rows, tok,
                               {"head_metrics": False}, **MPO)
    dropped = {"entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy"}
    assert set(logs) - set(ours) == dropped
    for key in set(ours) - {"train_runtime"}:
        assert ours[key] == pytest.approx(logs[key], rel=1e-5, abs=_abs_tol(key)), key
    for name, g in grads.items():
        assert torch.allclose(our_grads[name], g, rtol=1e-5, atol=1e-7), name


def test_bco_running_mean(text_setup, tmp_path):
    """The paper's shift: delta = running mean of this batch's rewards (first step: their
    mean), logged as bco/delta, saved with the checkpoint, and left alone by evaluation."""
    tok = text_setup
    model, ref = _tiny.causal_lm(tok), _tiny.causal_lm(tok)
    rows = _tiny.pairs(4, seed=int(torch.randint(0, 2**31, ())))
    trl_logs, *_ = _step(DPOTrainer, tmp_path, model, ref, rows, tok, **MPO)
    logs, _, trainer = _step(FusedDPOTrainer, tmp_path, model, ref, rows, tok,
                             {"bco_delta": "running_mean"}, save_strategy="steps", save_steps=1,
                             **MPO)
    batch_mean = (logs["rewards/chosen"] + logs["rewards/rejected"]) / 2
    # rewards are ~1e-2 and their mean cancels: fp32 rounding of each is ~1e-9 absolute
    assert logs["bco/delta"] == pytest.approx(batch_mean, rel=1e-5, abs=1e-7)  # same run
    state = trainer.mpo_loss.bco_state.clone()
    assert state[0].item() == pytest.approx(batch_mean, rel=1e-5, abs=1e-7)
    assert set(logs) - set(trl_logs) == {"bco/delta"}
    saved = load_file(tmp_path / "out" / "checkpoint-1" / LOSS_STATE_FILE)  # no pickle
    assert torch.equal(saved["bco_state"], state)
    trainer.evaluate(Dataset.from_list(rows))
    assert torch.equal(trainer.mpo_loss.bco_state, state)


def test_running_mean_needs_the_fused_loss(text_setup, tmp_path):
    tok = text_setup
    with pytest.raises(ValueError, match=r"running_mean.*sigmoid_norm"):
        FusedDPOTrainer(model=_tiny.causal_lm(tok), ref_model=_tiny.causal_lm(tok),
                        args=_config(tmp_path, loss_type=["sigmoid_norm"]),
                        train_dataset=Dataset.from_list(_tiny.pairs(2)), processing_class=tok,
                        bco_delta="running_mean")


@pytest.mark.parametrize(("loss_type", "bco_delta", "expected"), [
    (MPO["loss_type"], "none", ('pass FusedDPOTrainer(..., bco_delta="running_mean")',)),
    (["bco_pair", "sigmoid_norm"], "none",
     ('bco_delta="running_mean" gives it, but not with this config', "sigmoid_norm")),
    (MPO["loss_type"], "running_mean", ()),
    (["sigmoid", "sft"], "none", ())])
def test_unshifted_bco_pair_warns_once_per_trainer(text_setup, tmp_path, loss_type, bco_delta,
                                                   expected):
    """bco_pair without the paper's reward shift says so, once, when the trainer is built
    (naming bco_delta="running_mean", or why this config cannot have it); never otherwise."""
    tok = text_setup
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        FusedDPOTrainer(model=_tiny.causal_lm(tok), ref_model=_tiny.causal_lm(tok),
                        args=_config(tmp_path, loss_type=loss_type),
                        train_dataset=Dataset.from_list(_tiny.pairs(2)), processing_class=tok,
                        bco_delta=bco_delta)
    ours = [str(w.message) for w in caught if w.category is fused_trl.UnshiftedBCOWarning]
    if not expected:
        assert ours == []
    else:
        assert len(ours) == 1 and "without the reward shift" in ours[0]
        assert all(part in ours[0] for part in expected), ours[0]


def test_version_gate(text_setup, tmp_path, monkeypatch):
    assert check_trl_version("1.16.0") == "1.16.0"
    assert check_trl_version("1.15.0") == "1.15.0"
    for bad in ("1.14.2", "0.28.0", "2.0.0"):
        with pytest.raises(RuntimeError, match=r"trl>=1.15,<2.*found trl " + bad):
            check_trl_version(bad)
    monkeypatch.setattr(fused_trl.trl, "__version__", "1.12.0")
    with pytest.raises(RuntimeError, match=r"supports trl>=1.15,<2 .*found trl 1.12.0"):
        FusedDPOTrainer(model=_tiny.causal_lm(text_setup), args=_config(tmp_path),
                        train_dataset=Dataset.from_list(_tiny.pairs(2)),
                        processing_class=text_setup)


def test_a_patched_dpo_init_without_its_signature_still_builds(text_setup, tmp_path,
                                                              monkeypatch):
    """A third-party patch may hide DPOTrainer.__init__ behind (*args, **kwargs) without
    functools.wraps: the arguments, positional ones included, still reach TRL by name."""
    original, seen = DPOTrainer.__init__, []

    def patched(self, *args, **kwargs):  # no functools.wraps: the signature is gone
        seen.append((len(args), sorted(kwargs)))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DPOTrainer, "__init__", patched)
    model = _tiny.causal_lm(text_setup)
    trainer = FusedDPOTrainer(model, copy.deepcopy(model), _config(tmp_path),
                              train_dataset=Dataset.from_list(_tiny.pairs(2)),
                              processing_class=text_setup)
    assert trainer.args.output_dir == _config(tmp_path).output_dir and trainer.model is model
    assert seen == [(0, ["args", "model", "processing_class", "ref_model", "train_dataset"])]
    with pytest.raises(TypeError, match="multiple values for"):
        FusedDPOTrainer(model, args=_config(tmp_path), model=model)


# --------------------------------------------------------------------------- vision


@pytest.fixture(scope="module")
def vision_setup():
    tok = _tiny.tokenizer(vision=True)
    return tok, _tiny.internvl_processor(tok)


VISION_CASES = {
    "plain": ({}, {}),
    "images_once": ({"encode_images_once": True}, {}),
    "padding_free": ({}, {"padding_free": True}),
    "precomputed_reference+images_once": ({"encode_images_once": True},
                                          {"precompute_ref_log_probs": True}),
}


@pytest.mark.parametrize("case", list(VISION_CASES))
def test_internvl_step_matches_trl(case, vision_setup, tmp_path, spy_mpo_loss, monkeypatch):
    """TRL's vision path (DataCollatorForVisionPreference, images repeated for chosen and
    rejected) on a tiny HF-native InternVL. TRL refuses a precomputed reference for a VLM;
    ours gives what TRL gives with a live reference model."""
    fused_kwargs, extra = VISION_CASES[case]
    tok, processor = vision_setup
    model, ref = _tiny.internvl(tok), _tiny.internvl(tok)
    rows = _tiny.image_pairs(4, seed=int(torch.randint(0, 2**31, ())))
    images_seen = []
    get = type(model.model).get_image_features

    def spy(self, pixel_values, *args, **kwargs):
        images_seen.append(pixel_values.shape[0])
        return get(self, pixel_values, *args, **kwargs)

    monkeypatch.setattr(type(model.model), "get_image_features", spy)
    expected = _step(DPOTrainer, tmp_path, model, ref, rows, processor, **MPO)
    assert images_seen == [4, 4]  # policy and reference: 2 pairs, images repeated
    images_seen.clear()
    ours = _step(FusedDPOTrainer, tmp_path, model, ref, rows, processor, fused_kwargs,
                 **MPO, **extra)
    _assert_same(expected, ours)
    assert ours[2].mpo_loss is not None and spy_mpo_loss
    once = fused_kwargs.get("encode_images_once", False)
    if "precompute_ref_log_probs" in extra:
        # two precompute batches (reference), then one training step (policy only)
        assert images_seen == [2, 2, 2]
        assert "ref_chosen_logps" in ours[2].train_dataset.column_names
    else:
        assert images_seen == ([2, 2] if once else [4, 4])


def test_padding_free_refuses_mrope(vision_setup):
    tok, _ = vision_setup
    model = _tiny.causal_lm(tok, rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                  "mrope_section": [2, 1, 1]})
    _head.install(model, pack=True)
    ids = torch.randint(5, len(tok), (2, 6))
    with pytest.raises(NotImplementedError, match="M-RoPE"):
        model(ids, attention_mask=torch.ones_like(ids), labels=ids)


# --------------------------------------------------------------------------- DDP


def test_ddp_two_processes_keep_identical_parameters(tmp_path):
    """Two gloo ranks, different pairs on each: after one SGD step with the fused loss inside
    the wrapped forward, every parameter (LM head included) is identical on both ranks."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
         os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.abspath(__file__),
           str(tmp_path), str(int(torch.randint(0, 2**31, ())))]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "ddp.json").read_text())
    assert result["wrapper"] == "DistributedDataParallel"
    assert result["losses"][0] != result["losses"][1]  # the ranks saw different pairs
    assert result["changed"] > 1e-3  # the step moved the parameters
    assert result["max_diff"] == 0.0, result
    assert result["head_diff"] == 0.0 and result["head_changed"] > 0


def _ddp_worker(out: str, seed: int):
    import torch.distributed as dist

    torch.manual_seed(seed)
    tok = _tiny.tokenizer()
    model, ref = _tiny.causal_lm(tok), _tiny.causal_lm(tok)
    init = [p.detach().clone() for p in model.parameters()]
    args = _config(out, optim="sgd", learning_rate=0.5, **MPO)
    trainer = FusedDPOTrainer(model=model, ref_model=ref, args=args, processing_class=tok,
                              train_dataset=Dataset.from_list(_tiny.pairs(8, seed=seed)))
    losses = []
    compute = trainer.compute_loss
    trainer.compute_loss = lambda *a, **k: losses.append(compute(*a, **k)) or losses[-1]
    trainer.train()
    flat = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    head = trainer.model.get_output_embeddings().weight.detach().flatten()
    gathered = {}
    for name, value in (("flat", flat), ("head", head), ("loss", losses[0].detach()[None])):
        both = [torch.zeros_like(value) for _ in range(2)]
        dist.all_gather(both, value)
        gathered[name] = both
    if dist.get_rank() == 0:
        first = torch.cat([p.flatten() for p in init])
        head0 = init[[n for n, _ in model.named_parameters()].index("lm_head.weight")].flatten()
        result = {
            "wrapper": type(trainer.model_wrapped).__name__,
            "max_diff": (gathered["flat"][0] - gathered["flat"][1]).abs().max().item(),
            "head_diff": (gathered["head"][0] - gathered["head"][1]).abs().max().item(),
            "changed": (gathered["flat"][0] - first).norm().item(),
            "head_changed": (gathered["head"][0] - head0).norm().item(),
            "losses": [t.item() for t in gathered["loss"]],
        }
        with open(os.path.join(out, "ddp.json"), "w") as f:
            json.dump(result, f)
    # a clean teardown: a process group left to the interpreter's exit can abort in gloo's
    # threads ("terminate called without an active exception", exit -6: a CI flake)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":  # the DDP test's worker, launched by torch.distributed.run
    _ddp_worker(sys.argv[1], int(sys.argv[2]))
