"""The trainer a TRL user can switch to (issue 19): presets, self-contained checkpoints,
evaluation, LoRA, the bundled VLM from the command line, model / data options, trackers and
TRL's config names."""

from __future__ import annotations

import json

import pytest
import torch

from mpo_fast.train import cli
from mpo_fast.train.config import PRESETS, TrainConfig, resolve

ROWS = [{"prompt": "largest of 3 9 4", "chosen": "9", "rejected": "3"},
        {"prompt": "smallest of 12 5 40", "chosen": "5", "rejected": "40"},
        {"prompt": "largest of 7 1 30", "chosen": "30", "rejected": "7"},
        {"prompt": "smallest of 8 2 6", "chosen": "2", "rejected": "8"}]


def prefs(path, rows=ROWS, times=4):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows * times))
    return str(path)


# --------------------------------------------------------------------------- presets


def test_paper_preset_is_the_papers_recipe_and_flags_win():
    cfg = resolve({"preset": "paper", "model": "org/model"})
    assert (cfg.pairs_per_step, cfg.max_length, cfg.lr, cfg.epochs, cfg.max_steps,
            cfg.lr_schedule, cfg.warmup_ratio, cfg.weight_decay, cfg.beta, cfg.loss_types,
            cfg.loss_weights, cfg.sft_normalize) == (
        256, 6144, 5e-6, 1.0, 0, "cosine", 0.03, 0.05, 0.1, ("sigmoid", "bco_pair", "sft"),
        (0.8, 0.2, 1.0), "sequence")
    # a named preset replaces the tiny model's; a flag still wins over it
    cfg = resolve({"preset": "paper", "pairs_per_step": 64})
    assert cfg.model == "tiny" and cfg.pairs_per_step == 64 and cfg.lr == 5e-6
    assert resolve({}).preset == "tiny" and resolve({}).lr == PRESETS["tiny"]["lr"]
    assert resolve({"model": "org/model"}).preset == ""
    assert resolve({"preset": "tiny", "model": "org/model"}).lr == PRESETS["tiny"]["lr"]
    assert resolve({"preset": "none"}).lr == TrainConfig.lr  # the bare defaults
    with pytest.raises(ValueError, match="preset must be one of"):
        resolve({"preset": "papr"})


def test_help_shows_the_presets():
    text = " ".join(cli.build_parser().format_help().split())
    assert "--preset paper sets pairs_per_step=256, max_length=6144" in text
    assert "(default: 16; --preset paper: 256; --model tiny: 32" in text
    assert "--preset tiny (implied by --model tiny) sets" in text


# --------------------------------------------------------------------------- checkpoints


def test_checkpoints_and_final_load_with_from_pretrained(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mpo_fast.data import tiny
    from mpo_fast.train import checkpoint
    from mpo_fast.train.loop import train

    cfg = resolve({"data": prefs(tmp_path / "p.jsonl"), "output_dir": str(tmp_path / "run"),
                   "max_steps": 2, "save_every": 1, "pairs_per_step": 4, "progress": False})
    result = train(cfg, log=lambda *a: None)
    final = tmp_path / "run" / "final"
    assert result.final == str(final)
    trained = {n: p.detach() for n, p in result.model.named_parameters()}
    for folder in (result.checkpoint, str(final)):
        assert checkpoint.verify(folder) is None  # manifest written last, every file in it
        model = AutoModelForCausalLM.from_pretrained(folder)
        got = dict(model.named_parameters())
        assert all(torch.equal(got[n], w) for n, w in trained.items())
        tok = AutoTokenizer.from_pretrained(folder)
        want = tiny.tiny_tokenizer()
        assert tok("largest of 3 9")["input_ids"] == want("largest of 3 9")["input_ids"]
        assert tok.chat_template == want.chat_template
        assert model.generation_config.eos_token_id == want.eos_token_id
        state = json.loads(open(f"{folder}/trainer_state.json").read())
        assert state["global_step"] == 2 and state["log_history"][-1]["step"] == 2
    assert not (final / "optimizer.pt").exists()  # a model folder, not a resume point
