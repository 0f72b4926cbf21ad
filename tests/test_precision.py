"""Precision under TRL's defaults (docs/DESIGN.md §3.4, precision).

TRL 1.16's `DPOConfig` defaults to bf16 autocast, on the CPU too. Its fused head then computes
the logits as a bf16 matmul (bf16 results) before its log-softmax; mpo-fast's head takes the
same bf16 operands but keeps the logits in fp32. One training step of each trainer under that
default: the policy's sequence log-probs against a float64 recompute of the head on the very
bf16 hidden states and LM-head weight it was given (mpo-fast within fp32 tolerance; TRL within
bf16's).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("datasets")

import hf_tiny as _tiny
from datasets import Dataset
from trl import DPOConfig, DPOTrainer

from mpo_fast.integrations.trl import FusedDPOTrainer

F32_TOL, BF16_TOL = 1e-5, 1e-2


class _FirstPolicyCall:
    """The policy's first forward of the step: its labels, the backbone's final hidden states,
    the LM-head weight and the sequence log-probs the head returned."""

    def __init__(self, model):
        self.hidden = self.labels = self.logps = None
        self.handles = [model.register_forward_hook(self.model_hook, with_kwargs=True),
                        model.model.register_forward_hook(self.backbone_hook)]

    def backbone_hook(self, module, args, output):
        if self.hidden is None and torch.is_grad_enabled():
            self.hidden = output.last_hidden_state.detach()

    def model_hook(self, module, args, kwargs, output):
        if self.logps is not None or not torch.is_grad_enabled():
            return
        self.labels = kwargs["labels"]
        self.weight = module.get_output_embeddings().weight.detach().clone()  # before the step
        if getattr(output, "chosen_logps", None) is not None:  # mpo-fast: the MPOLoss path
            self.logps = torch.cat([output.chosen_logps, output.rejected_logps]).detach()
        else:  # TRL: per-token log-probs [2B, T - 1]
            self.logps = output.log_probs.detach().float().sum(-1)


def float64_head(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor):
    """[2B] sums of log_softmax(h W^T) at the next-token labels, in float64, from the bf16
    operands the heads were given (the autocast dtype)."""
    h = hidden[:, :-1].to(torch.bfloat16).double()
    logits = h @ weight.to(torch.bfloat16).double().T
    targets = labels[:, 1:]
    token = logits.log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    return (token * (targets != -100)).sum(-1)


def _one_step(cls, tmp_path, model, ref, rows, tok):
    args = DPOConfig(output_dir=os.path.join(str(tmp_path), cls.__name__),
                     per_device_train_batch_size=2, max_steps=1, report_to=[],
                     save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
                     loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0])
    assert args.bf16  # TRL's default, also on the CPU
    trainer = cls(model=model, ref_model=ref, args=args, train_dataset=Dataset.from_list(rows),
                  processing_class=tok)
    spy = _FirstPolicyCall(trainer.model)
    trainer.train()
    for handle in spy.handles:
        handle.remove()
    expected = float64_head(spy.hidden, spy.weight, spy.labels)
    return ((spy.logps.double() - expected).norm() / expected.norm()).item()


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_fp32_logits_under_trls_default_bf16(tmp_path):
    tok = _tiny.tokenizer()
    model, ref = _tiny.causal_lm(tok), _tiny.causal_lm(tok)
    rows = _tiny.pairs(2, seed=int(torch.randint(0, 2**31, ())))
    errors = {cls.__name__: _one_step(cls, tmp_path, copy.deepcopy(model), copy.deepcopy(ref),
                                      rows, tok) for cls in (DPOTrainer, FusedDPOTrainer)}
    assert errors["FusedDPOTrainer"] <= F32_TOL, errors  # fp32 logits (measured ~1e-7)
    assert errors["DPOTrainer"] <= BF16_TOL, errors  # logits rounded to bf16 (~2-7e-6)
    assert errors["FusedDPOTrainer"] < errors["DPOTrainer"], errors
