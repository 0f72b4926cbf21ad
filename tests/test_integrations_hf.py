"""mpo_fast.integrations.hf: patch_model (a forward without logits) and MPOTrainer.

The patched forward's log-probs, loss, statistics and gradients against the model's own
full-vocabulary logits (float64); undo; a plain transformers.Trainer on a patched model; and
one MPOTrainer step (padded and packed, reference model or precomputed reference columns)
against MPOLoss computed by hand from the backbone's hidden states.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("datasets")

import hf_tiny as _tiny
from datasets import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

from mpo_fast import MPOLoss
from mpo_fast.integrations.hf import MPOTrainer, PreferenceCollator, patch_model, unpatch_model
from mpo_fast.layout import Segments


@pytest.fixture(scope="module")
def tok():
    return _tiny.tokenizer()


def _batch(tok, n=3):
    """A padded causal-LM batch with random lengths, prompt masked, and labels."""
    collate = PreferenceCollator(tokenizer=tok)
    return collate(_tiny.pairs(n, seed=int(torch.randint(0, 2**31, ()))))


def _full_logit_logps(logits, labels):
    """float64 log p(labels[:, 1:]) from the model's own logits (0 where -100)."""
    lp = logits[:, :-1].double().log_softmax(-1)
    target = labels[:, 1:]
    out = lp.gather(-1, target.clamp(min=0)[..., None])[..., 0]
    return out.masked_fill(target == -100, 0.0), lp


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("config", [{}, {"logit_scale": 2.0}, {"final_logit_softcapping": 3.0}])
def test_patched_log_probs_match_the_models_logits(tok, config):
    model = _tiny.causal_lm(tok)
    for key, value in config.items():  # read by the fused head as TRL reads them
        setattr(model.config, key, value)
    b = _batch(tok)
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.double()
    if "logit_scale" in config:
        logits = logits * config["logit_scale"]
    if "final_logit_softcapping" in config:
        cap = config["final_logit_softcapping"]
        logits = cap * torch.tanh(logits / cap)
    ref, full = _full_logit_logps(logits, b["labels"])
    (ref.sum() / (b["labels"][:, 1:] != -100).sum()).neg().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    with patch_model(model, statistics=("entropy", "mean_logits", "is_top1",
                                        "log_sum_sq_probs")):
        out = model(**b)
        assert "logits" not in out
        assert out.log_probs.shape == b["labels"][:, 1:].shape
        assert _rel(out.log_probs, ref) <= 1e-5
        mask = b["labels"][:, 1:] != -100
        assert torch.equal(out.label_mask, mask)
        entropy = -(full.exp() * full).sum(-1)
        assert _rel(out.entropy[mask], entropy[mask]) <= 1e-5
        assert _rel(out.mean_logits[mask], logits[:, :-1].mean(-1)[mask]) <= 1e-5
        assert torch.equal(out.is_top1[mask], (logits[:, :-1].argmax(-1) == b["labels"][:, 1:])
                           [mask])
        assert _rel(out.log_sum_sq_probs[mask], torch.logsumexp(2 * full, -1)[mask]) <= 1e-5
        assert (out.entropy[~mask] == 0).all() and (out.log_probs[~mask] == 0).all()
        out.loss.backward()
    for name, g in expected.items():
        assert _rel(model.get_parameter(name).grad, g) <= 1e-5, name


def test_patch_is_undone_and_generation_is_untouched(tok):
    model = _tiny.causal_lm(tok)
    cls_forward = type(model).forward
    b = _batch(tok, 2)
    ids = b["input_ids"][:1, :4]
    before = model.generate(ids, max_new_tokens=3, do_sample=False)
    handle = patch_model(model)
    assert "forward" in model.__dict__
    plain = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    assert plain.logits.shape[-1] == len(tok)  # no labels: the original forward
    assert torch.equal(model.generate(ids, max_new_tokens=3, do_sample=False), before)
    handle.undo()
    assert "forward" not in model.__dict__ and model.forward.__func__ is cls_forward
    assert not unpatch_model(model)
    out = model(**b)
    assert out.logits is not None and not hasattr(out, "log_probs")


def test_hidden_states_output(tok):
    model = _tiny.causal_lm(tok)
    b = _batch(tok)
    expected = model.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    with patch_model(model, output="hidden_states"):
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                    fused_lm_head=True)
    assert torch.equal(out.last_hidden_state, expected.last_hidden_state)
    assert out.log_probs is None and out.loss is None


def test_patched_internvl_scores_with_its_images():
    """A VLM's base_model includes the image injection: the log-probs see the pixels."""
    tok = _tiny.tokenizer(vision=True)
    processor = _tiny.internvl_processor(tok)
    model = _tiny.internvl(tok)
    rows = _tiny.image_pairs(2, seed=int(torch.randint(0, 2**31, ())))
    b = processor(images=[r["images"] for r in rows], text=[r["prompt"] + r["chosen"]
                                                           for r in rows],
                  return_tensors="pt", padding=True)
    labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
    ref, _ = _full_logit_logps(model(**b).logits, labels)
    with patch_model(model):
        out = model(**b, labels=labels)
        other = model(**{**b, "pixel_values": torch.randn_like(b["pixel_values"])},
                      labels=labels)
    assert _rel(out.log_probs, ref) <= 1e-5
    assert _rel(other.log_probs, ref) > 1e-4


def test_mpo_loss_head_must_match_the_model(tok):
    model = _tiny.causal_lm(tok)
    model.config.final_logit_softcapping = 30.0
    b = _batch(tok, 2)
    with patch_model(model), pytest.raises(ValueError, match=r"softcap=30\.0"):
        model(**b, mpo_loss=MPOLoss(), ref_logps=(torch.zeros(2), torch.zeros(2)))


class _Grads(TrainerCallback):
    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()
                      if p.grad is not None}


def _args(tmp_path, **overrides):
    base = {"output_dir": str(tmp_path / "out"), "per_device_train_batch_size": 2,
            "max_steps": 1, "report_to": [], "logging_steps": 1, "save_strategy": "no",
            "use_cpu": True, "max_grad_norm": 0.0, "disable_tqdm": True}
    return TrainingArguments(**{**base, **overrides})


def test_plain_trainer_on_a_patched_model(tok, tmp_path):
    """SFT with the stock Trainer: the patched model gives the same loss and gradients as the
    model's own logits (token-mean NLL, gradient-accumulation scaling included)."""
    model = _tiny.causal_lm(tok)
    rows = [{"input_ids": ids, "labels": ids} for ids in
            (torch.randint(4, len(tok), (int(torch.randint(5, 12, ())),)).tolist()
             for _ in range(4))]

    def collate(examples):
        T = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), T), tok.pad_token_id)
        mask = torch.zeros_like(ids)
        for i, e in enumerate(examples):
            ids[i, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
            mask[i, : len(e["input_ids"])] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0,
                                                                                   -100)}

    results = []
    for patched in (False, True):
        m, grads = copy.deepcopy(model), _Grads()
        if patched:
            patch_model(m)
        trainer = Trainer(m, _args(tmp_path, gradient_accumulation_steps=2,
                                   per_device_train_batch_size=1),
                          train_dataset=Dataset.from_list(rows), data_collator=collate,
                          callbacks=[grads])
        trainer.train()
        results.append((trainer.state.log_history[0]["loss"], grads.grads))
    (loss, grads), (patched_loss, patched_grads) = results
    assert patched_loss == pytest.approx(loss, rel=1e-5)
    for name, g in grads.items():
        assert _rel(patched_grads[name], g) <= 1e-5, name


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("reference", ["model", "columns"])
def test_mpo_trainer_step_equals_mpo_loss_by_hand(tok, tmp_path, packed, reference):
    model, ref = _tiny.causal_lm(tok), _tiny.causal_lm(tok)
    rows = _tiny.pairs(2, seed=int(torch.randint(0, 2**31, ())))
    padded = PreferenceCollator(tokenizer=tok)(rows)
    targets = F.pad(padded["labels"][:, 1:], (0, 1), value=-100)
    inputs = {"input_ids": padded["input_ids"], "attention_mask": padded["attention_mask"]}
    with torch.no_grad():  # the reference's sequence log-probs from full float64 logits
        ref_hidden = ref.model(**inputs).last_hidden_state
        ref_logp = -torch.stack([F.cross_entropy(ref.lm_head(ref_hidden[i]).double(),
                                                 targets[i], reduction="sum")
                                 for i in range(4)])
    if reference == "columns":
        for i, row in enumerate(rows):
            row["ref_chosen_logps"], row["ref_rejected_logps"] = (ref_logp[i].item(),
                                                                  ref_logp[2 + i].item())

    by_hand_model, by_hand_loss = copy.deepcopy(model), MPOLoss()
    hidden = by_hand_model.model(**inputs).last_hidden_state
    expected = by_hand_loss(hidden, by_hand_model.lm_head.weight, targets,
                            ref_logps=(ref_logp[:2].float(), ref_logp[2:].float()))
    expected.loss.backward()

    grads = _Grads()
    trainer = MPOTrainer(copy.deepcopy(model), _args(tmp_path),
                         ref_model=copy.deepcopy(ref) if reference == "model" else None,
                         train_dataset=Dataset.from_list(rows), processing_class=tok,
                         data_collator=PreferenceCollator(tokenizer=tok, packed=packed),
                         callbacks=[grads])
    assert (trainer.ref_model is None) == (reference == "columns")
    trainer.train()
    logs = trainer.state.log_history[0]
    assert logs["loss"] == pytest.approx(expected.loss.item(), rel=1e-5)
    for key, value in expected.metrics.items():  # rewards: fp32 vs float64 reference sums
        tol = 2e-5 if key.startswith(("rewards/", "bco/")) else 1e-6
        assert logs[key] == pytest.approx(value.item(), rel=1e-5, abs=tol), key
    # the state is a mean of ~1e-2 rewards with fp32 (trainer) vs float64 (hand) references
    assert torch.allclose(trainer.loss_fn.bco_state, by_hand_loss.bco_state, rtol=1e-5,
                          atol=1e-6)
    for name, p in by_hand_model.named_parameters():
        assert _rel(grads.grads[name], p.grad) <= 1e-5, name


def test_collator_layouts(tok):
    rows = _tiny.pairs(3, seed=int(torch.randint(0, 2**31, ())))
    padded = PreferenceCollator(tokenizer=tok)(rows)
    packed = PreferenceCollator(tokenizer=tok, packed=True)(rows)
    lengths = padded["attention_mask"].sum(1)
    segs = packed["cu_seqlens"]  # the packer's Segments, handed through
    assert isinstance(segs, Segments)
    assert segs.cu_seqlens.tolist() == [0, *lengths.cumsum(0).tolist()]
    assert segs.max_seqlen == int(lengths.max()) and segs.num_tokens == int(lengths.sum())
    real = padded["attention_mask"].bool()
    assert torch.equal(packed["input_ids"][0], padded["input_ids"][real])
    shifted = F.pad(padded["labels"][:, 1:], (0, 1), value=-100)
    assert torch.equal(packed["shift_labels"][0], shifted[real])
    for i, row in enumerate(rows):  # chosen rows first, then rejected; prompt masked
        for r, key in ((i, "chosen"), (3 + i, "rejected")):
            scored = padded["labels"][r][padded["labels"][r] != -100]
            assert tok.decode(scored) == row[key] + tok.eos_token


def test_caller_offsets_are_checked(tok):
    """Bare int32 offsets from a caller go through Segments.from_cu_seqlens (checked): offsets
    that do not end at the tokens' count are an error naming them, never a silent mis-split."""
    model = _tiny.causal_lm(tok)
    patch_model(model)
    packed = PreferenceCollator(tokenizer=tok, packed=True)(
        _tiny.pairs(2, seed=int(torch.randint(0, 2**31, ()))))
    segs = packed.pop("cu_seqlens")
    good = model(**packed, cu_seqlens=segs.cu_seqlens.clone()).log_probs
    assert torch.equal(good, model(**packed, cu_seqlens=segs).log_probs)
    bad = segs.cu_seqlens.clone()
    bad[-1] -= 1
    with pytest.raises(ValueError, match="cu_seqlens"):
        model(**packed, cu_seqlens=bad)


@pytest.mark.parametrize("max_length", [None, 9])
def test_collator_tokenizes_a_pair_as_the_trainer_does(max_length):
    """One way to tokenize a pair (mpo_fast.pair_tokens): the collator's batch of text rows is
    the trainer's PairTokenizer + collate of the same rows (chat template, truncation)."""
    from mpo_fast.data import PairTokenizer, collate, tiny

    tok = tiny.tiny_tokenizer()  # has a chat template
    examples = tiny.make_task(4, seed=int(torch.randint(0, 2**31, ())))
    rows = [{"prompt": e.prompt, "chosen": e.chosen, "rejected": e.rejected} for e in examples]
    batch = PreferenceCollator(tokenizer=tok, max_length=max_length)(rows)
    tokenize = PairTokenizer(tok, max_length=max_length or 2048)
    expected = collate([tokenize(e, i) for i, e in enumerate(examples)], pad_id=tokenize.pad_id,
                       packed=False)
    assert torch.equal(batch["input_ids"], expected.input_ids)
    assert torch.equal(batch["attention_mask"].bool(), expected.attention_mask)
    assert torch.equal(batch["labels"][:, 1:], expected.targets[:, :-1])
