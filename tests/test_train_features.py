"""The trainer a TRL user can switch to (issue 19): presets, self-contained checkpoints,
evaluation, LoRA, the bundled VLM from the command line, model / data options, trackers and
TRL's config names."""

from __future__ import annotations

import json
import shutil

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


# --------------------------------------------------------------------------- evaluation


def test_eval_logs_every_metric_changes_no_training_state_and_keeps_the_best(tmp_path):
    from transformers import AutoModelForCausalLM

    from mpo_fast.train.loop import train

    data, held = prefs(tmp_path / "p.jsonl"), prefs(tmp_path / "h.jsonl", ROWS[:3], 1)
    common = {"data": data, "max_steps": 4, "pairs_per_step": 4, "progress": False,
              "lr": 3e-3}
    plain = train(resolve({**common, "output_dir": str(tmp_path / "plain")}),
                  log=lambda *a: None)
    said = []
    cfg = resolve({**common, "output_dir": str(tmp_path / "eval"), "eval_data": held,
                   "eval_every": 2, "best_metric": "eval/rewards/accuracies"})
    result = train(cfg, log=said.append)
    evals = [h for h in result.history if "eval/loss" in h]
    assert [h["step"] for h in evals] == [2, 4]
    names = set(result.loss_fn.loss_config.metric_names)
    assert {f"eval/{k}" for k in names} | {"eval/loss", "eval/pairs"} <= set(evals[0])
    assert evals[0]["eval/pairs"] == 3
    lines = [json.loads(x) for x in open(tmp_path / "eval" / "metrics.jsonl")]
    assert [x["step"] for x in lines if "eval/loss" in x] == [2, 4]
    # no gradient, no BCO-state update, no random draw: training is bit-identical
    train_losses = lambda r: [h["loss"] for h in r.history if "loss" in h]
    assert train_losses(result) == train_losses(plain)
    assert torch.equal(result.loss_fn.bco_state, plain.loss_fn.bco_state)
    for (n, a), b in zip(result.model.named_parameters(), plain.model.parameters(),
                         strict=True):
        assert torch.equal(a, b), n
    # the best by a higher-is-better metric, kept as <output_dir>/best
    best = max(evals, key=lambda h: h["eval/rewards/accuracies"])
    state = json.loads((tmp_path / "eval" / "best" / "trainer_state.json").read_text())
    assert state["metric_for_best_model"] == "eval/rewards/accuracies"
    assert state["best_metric"] == best["eval/rewards/accuracies"]
    assert state["best"]["greater_is_better"] is True
    assert state["best_model_checkpoint"] == str(tmp_path / "eval" / "best")
    assert any("best so far" in s and "higher is better" in s for s in said), said
    AutoModelForCausalLM.from_pretrained(tmp_path / "eval" / "best")


def test_eval_line_and_lower_is_better_for_a_loss(tmp_path):
    import subprocess
    import sys

    held = prefs(tmp_path / "h.jsonl", ROWS[:2], 1)
    proc = subprocess.run(
        [sys.executable, "-m", "mpo_fast", "train", "--data", prefs(tmp_path / "p.jsonl"),
         "--eval-data", held, "--eval-pairs", "1", "--best-metric", "eval/loss",
         "--output-dir", str(tmp_path / "run"), "--max-steps", "2", "--pairs-per-step", "4",
         "--reference", "cached", "--no-progress"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert len(list((tmp_path / "run" / "ref_cache").iterdir())) == 2  # the eval set's own
    assert "eval step 2/2: eval/loss" in proc.stdout, proc.stdout
    assert "(lower is better)" in proc.stdout
    state = json.loads((tmp_path / "run" / "best" / "trainer_state.json").read_text())
    assert state["best"]["greater_is_better"] is False and state["best_global_step"] == 2


# --------------------------------------------------------------------------- LoRA


@pytest.mark.parametrize("save", ["adapter", "merged"])
def test_lora_trains_only_adapters_against_the_adapter_disabled_policy(tmp_path, monkeypatch,
                                                                        save):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from mpo_fast.data import tiny
    from mpo_fast.train import reference
    from mpo_fast.train.loop import train

    def no_copy(*a, **k):
        raise AssertionError("LoRA must not build a frozen copy")

    monkeypatch.setattr(reference, "FrozenCopy", no_copy)
    cfg = resolve({"data": prefs(tmp_path / "p.jsonl"), "output_dir": str(tmp_path / "run"),
                   "max_steps": 3, "pairs_per_step": 4, "progress": False, "lora_r": 4,
                   "lora_save": save, "log_every": 1})
    assert cfg.reference == "adapter"  # the default with LoRA
    tok = tiny.tiny_tokenizer()
    base = tiny.tiny_lm(tok, hidden=128, layers=2, seed=0)  # what --model tiny builds
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    result = train(cfg, log=lambda *a: None)
    model = result.model
    assert isinstance(model, peft.PeftModel)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    targeted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable}
    assert targeted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                        "down_proj"}  # every linear of the language model, not the LM head
    for n, p in model.get_base_model().named_parameters():
        if "lora_" not in n:
            key = n.replace(".base_layer", "")
            assert torch.equal(p, before[key]), f"{n} changed"
    assert any(not torch.equal(p, torch.zeros_like(p)) for n, p in model.named_parameters()
               if "lora_B" in n)  # the adapters did train
    # step 1's rewards are 0: the reference is the policy with its (zero-init) adapters off
    first = result.history[0]
    assert first["rewards/chosen"] == 0 and first["rewards/margins"] == 0
    batch = tok(["<|user|> largest of 3 9 4 <|end|> <|assistant|> 9"],
                return_tensors="pt")["input_ids"]
    model.eval()
    with torch.no_grad():
        want = model(input_ids=batch).logits
    final = tmp_path / "run" / "final"
    if save == "adapter":
        assert (final / "adapter_config.json").exists()
        assert not (final / "model.safetensors").exists()
        loaded = peft.PeftModel.from_pretrained(tiny.tiny_lm(tok, hidden=128, layers=2, seed=0),
                                                str(final))
    else:
        assert not (final / "adapter_config.json").exists()
        loaded = AutoModelForCausalLM.from_pretrained(str(final))
    with torch.no_grad():
        got = loaded.eval()(input_ids=batch).logits
    assert (got - want).abs().max() < 1e-5
    # every checkpoint holds the adapter too
    assert (tmp_path / "run" / "checkpoints" / "step-00000003" / "adapter_config.json").exists()


# --------------------------------------------------------------------------- the tiny VLM


def mmpr_folder(root, n=6):
    """A tiny MMPR set: meta.json, an annotation .jsonl and PIL-made images."""
    from PIL import Image

    (root / "images").mkdir(parents=True)
    colors = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
    rows = []
    for i in range(n):
        name = list(colors)[i % 3]
        Image.new("RGB", (40, 40), colors[name]).save(root / "images" / f"{i}.png")
        rows.append({"image": f"{i}.png", "question": "<image>\nWhat color is the square?",
                     "chosen": f"It is {name}.", "rejected": f"It is {list(colors)[i % 3 - 1]}."})
    (root / "ann.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "meta.json").write_text(json.dumps(
        {"colors": {"root": "images", "annotation": "ann.jsonl", "repeat_time": 1}}))
    return str(root / "meta.json")


def test_tiny_vl_trains_on_mmpr_images_from_the_cli(tmp_path):
    import subprocess
    import sys

    from transformers import AutoModelForImageTextToText, AutoTokenizer

    from mpo_fast.data.tiny import TinyVLProcessor

    meta = mmpr_folder(tmp_path / "mmpr")
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "mpo_fast", "train", "--model", "tiny-vl", "--data", meta,
         "--output-dir", str(out), "--max-steps", "3", "--pairs-per-step", "4",
         "--log-every", "1", "--no-progress"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["pairs"] == 4 and r["loss"] == r["loss"] for r in records)  # no pair skipped
    config = json.loads((out / "config.json").read_text())
    assert config["preset"] == "tiny-vl" and config["max_length"] == 256
    final = str(out / "final")
    model = AutoModelForImageTextToText.from_pretrained(final)
    processor = TinyVLProcessor.from_pretrained(final)
    tok = AutoTokenizer.from_pretrained(final)
    assert type(model).__name__ == "InternVLForConditionalGeneration"
    assert tok.chat_template == processor.tokenizer.chat_template and processor.image_size == 32


# --------------------------------------------------------------------------- model and data


def test_model_options_reach_from_pretrained_and_remote_code_stays_off(tmp_path, monkeypatch):
    import transformers

    from mpo_fast.data import tiny
    from mpo_fast.train.model import load

    tok = tiny.tiny_tokenizer()
    tiny.tiny_lm(tok, hidden=32, layers=1, heads=2).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    calls = []
    for name in ("AutoConfig", "AutoModelForCausalLM", "AutoTokenizer"):
        cls = getattr(transformers, name)
        real = cls.from_pretrained

        def spy(*a, _real=real, _name=name, **k):
            calls.append((_name, k))
            return _real(*a, **k)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    model, _, _ = load(str(tmp_path / "m"))
    assert calls and all(k["trust_remote_code"] is False for _, k in calls)  # never on unasked
    assert next(p for p in model.parameters()).dtype == torch.float32
    calls.clear()
    (tmp_path / "t.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    model, tok2, _ = load(str(tmp_path / "m"), trust_remote_code=True, revision="main",
                          torch_dtype="bfloat16", attn_implementation="eager",
                          chat_template=str(tmp_path / "t.jinja"))
    assert all(k["trust_remote_code"] is True and k["revision"] == "main" for _, k in calls)
    kw = dict(calls)["AutoModelForCausalLM"]
    assert kw["attn_implementation"] == "eager" and kw["dtype"] == torch.bfloat16
    assert next(p for p in model.parameters()).dtype == torch.bfloat16
    assert tok2.chat_template == (tmp_path / "t.jinja").read_text()
    text = " ".join(cli.build_parser().format_help().split())
    assert "--trust-remote-code, --no-trust-remote-code" in text and "(default: False)" in text


def test_a_dataset_saved_with_save_to_disk_trains(tmp_path):
    datasets = pytest.importorskip("datasets")
    from mpo_fast.train.loop import train

    datasets.Dataset.from_list(ROWS * 4).save_to_disk(str(tmp_path / "flat"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS * 4),
                          "test": datasets.Dataset.from_list(ROWS[:2])}).save_to_disk(
        str(tmp_path / "dict"))
    said = []
    result = train(resolve({"data": str(tmp_path / "flat"), "output_dir": str(tmp_path / "a"),
                            "max_steps": 2, "pairs_per_step": 4, "progress": False}),
                   log=said.append)
    assert result.step == 2 and "data: 16 pairs loaded" in said
    result = train(resolve({"data": str(tmp_path / "dict"), "eval_data": str(tmp_path / "dict"),
                            "output_dir": str(tmp_path / "b"), "max_steps": 2,
                            "pairs_per_step": 4, "progress": False}), log=said.append)
    assert "eval data: 2 pairs loaded" in said  # the test split
    assert result.history[-1]["eval/pairs"] == 2
    with pytest.raises(ValueError, match="no split 'validation'"):
        train(resolve({"data": str(tmp_path / "dict"), "data_split": "validation",
                       "output_dir": str(tmp_path / "c"), "progress": False}), log=said.append)


def test_a_dataset_name_goes_through_datasets_load_dataset(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    from mpo_fast.data import load_dataset
    from mpo_fast.train.loop import train

    asked = []

    def fake(name, config=None, split=None):
        asked.append((name, config, split))
        return datasets.Dataset.from_list(ROWS * 4)

    monkeypatch.setattr(datasets, "load_dataset", fake)
    result = train(resolve({"data": "someone/prefs", "data_config": "en",
                            "data_split": "train[:90%]", "output_dir": str(tmp_path / "a"),
                            "max_steps": 1, "pairs_per_step": 4, "progress": False}),
                   log=lambda *a: None)
    assert result.step == 1 and asked == [("someone/prefs", "en", "train[:90%]")]
    # TRL's vision preference rows: PIL images in an "images" column
    image = Image.new("RGB", (8, 8), (255, 0, 0))
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: [
        {"prompt": "<image> what color ?", "chosen": "red", "rejected": "blue",
         "images": [image]}])
    examples, report = load_dataset("someone/vl-prefs")
    assert report.loaded == 1 and examples[0].images == (image,)


# --------------------------------------------------------------------------- trackers


def test_tensorboard_events_hold_the_loss_and_wandb_gets_the_records(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    import importlib.machinery
    import sys
    import types

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mpo_fast.train.loop import train

    logged, inits = [], []
    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.init = lambda **k: inits.append(k) or types.SimpleNamespace(
        id="run1", log=lambda values, step: logged.append((step, values)), finish=lambda: None)
    monkeypatch.setitem(sys.modules, "wandb", fake)  # wandb's API, without the package
    held = prefs(tmp_path / "h.jsonl", ROWS[:2], 1)
    result = train(resolve({"data": prefs(tmp_path / "p.jsonl"), "eval_data": held,
                            "output_dir": str(tmp_path / "run"), "max_steps": 3,
                            "pairs_per_step": 4, "log_every": 1, "progress": False,
                            "report_to": "tensorboard,wandb"}), log=lambda *a: None)
    events = EventAccumulator(str(tmp_path / "run" / "runs"))
    events.Reload()
    assert {"train/loss", "train/rewards/accuracies", "train/lr", "eval/loss"} <= set(
        events.Tags()["scalars"])
    losses = [(e.step, e.value) for e in events.Scalars("train/loss")]
    want = [(h["step"], h["loss"]) for h in result.history if "loss" in h]
    assert [s for s, _ in losses] == [s for s, _ in want] == [1, 2, 3]
    assert all(abs(a - b) < 1e-6 * max(1, abs(b)) for (_, a), (_, b) in zip(losses, want,
                                                                             strict=True))
    assert inits[0]["config"]["report_to"] == ["tensorboard", "wandb"]
    assert [s for s, v in logged if "train/loss" in v] == [1, 2, 3]
    assert any("eval/loss" in v for _, v in logged)
    assert (tmp_path / "run" / "wandb_run_id").read_text() == "run1"
    with pytest.raises(ValueError, match="report_to must be one of"):
        resolve({"report_to": "tensorbord"})


# --------------------------------------------------------------------------- TRL's names


def test_config_accepts_trls_names(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    (tmp_path / "trl.yaml").write_text(
        "model_name_or_path: org/model\nlearning_rate: 1.0e-5\nnum_train_epochs: 2\n"
        "lr_scheduler_type: constant_with_warmup\nadam_beta1: 0.8\nadam_beta2: 0.99\n"
        "per_device_train_batch_size: 4\ngradient_accumulation_steps: 8\n"
        "loss_type: [sigmoid, sft]\nloss_weights: [1.0, 0.5]\nlogging_steps: 5\n"
        "save_steps: 50\nsave_total_limit: 3\neval_steps: 25\nmetric_for_best_model: eval_loss\n"
        "greater_is_better: false\nbf16: true\nuse_peft: true\nlora_alpha: 16\n"
        "dataset_name: org/prefs\ndataset_train_split: train\ndataset_test_split: test\n"
        "eval_data: org/prefs\npadding_free: false\nprecompute_ref_log_probs: true\n"
        "beta: 0.2\nmax_length: 2048\nreport_to: [tensorboard]\n")
    cfg = resolve({}, str(tmp_path / "trl.yaml"))
    assert (cfg.model, cfg.lr, cfg.epochs, cfg.lr_schedule, cfg.adam_betas) == (
        "org/model", 1e-5, 2.0, "constant", (0.8, 0.99))
    assert cfg.pairs_per_step == 4 * 8 * 2  # per device x accumulation x processes
    assert (cfg.loss_types, cfg.loss_weights, cfg.log_every, cfg.save_every,
            cfg.keep_checkpoints, cfg.eval_every) == (("sigmoid", "sft"), (1.0, 0.5), 5, 50,
                                                      3, 25)
    assert (cfg.best_metric, cfg.greater_is_better, cfg.dtype, cfg.lora_r, cfg.lora_alpha,
            cfg.reference) == ("eval/loss", False, "bf16", 16, 16.0, "cached")
    assert (cfg.data, cfg.data_split, cfg.eval_split, cfg.packing, cfg.beta, cfg.max_length,
            cfg.report_to) == ("org/prefs", "train", "test", False, 0.2, 2048,
                               ("tensorboard",))
    (tmp_path / "both.yaml").write_text("learning_rate: 1.0e-5\nlr: 2.0e-5\n")
    with pytest.raises(ValueError, match="learning_rate and lr both set lr"):
        resolve({}, str(tmp_path / "both.yaml"))
    (tmp_path / "poly.yaml").write_text("lr_scheduler_type: polynomial\n")
    with pytest.raises(ValueError, match="polynomial"):
        resolve({}, str(tmp_path / "poly.yaml"))


def test_lora_run_resumes_exactly(tmp_path):
    pytest.importorskip("peft")
    from mpo_fast.train.loop import train

    common = {"data": prefs(tmp_path / "p.jsonl"), "max_steps": 4, "pairs_per_step": 4,
              "progress": False, "lora_r": 4, "log_every": 1, "save_every": 2,
              "lora_dropout": 0.0}
    straight = train(resolve({**common, "output_dir": str(tmp_path / "a")}), log=lambda *a: None)
    # a run stopped after step 2: its folder with the step-2 checkpoint only
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step-00000002",
                    tmp_path / "b" / "checkpoints" / "step-00000002")
    resumed = train(resolve({**common, "output_dir": str(tmp_path / "b"), "resume": "auto"}),
                    log=lambda *a: None)
    losses = lambda r: {h["step"]: h["loss"] for h in r.history if "loss" in h}
    assert losses(resumed) == {k: v for k, v in losses(straight).items() if k > 2}
    for (n, a), b in zip(resumed.model.named_parameters(), straight.model.parameters(),
                         strict=True):
        assert torch.equal(a, b), n


NEW_FLAGS = ["--preset", "--eval-data", "--eval-split", "--eval-every", "--eval-pairs",
             "--best-metric", "--greater-is-better", "--lora-r", "--lora-alpha",
             "--lora-dropout", "--lora-target-modules", "--lora-save", "--trust-remote-code",
             "--revision", "--torch-dtype", "--attn-implementation", "--chat-template",
             "--data-split", "--data-config", "--report-to"]


def test_help_shows_every_new_flag_with_its_default():
    parser = cli.build_parser()
    helps = {opt: action.help for action in parser._actions for opt in action.option_strings}
    for flag in NEW_FLAGS:
        assert flag in helps and "(default: " in helps[flag], flag


# --------------------------------------------------------------------------- two processes

EVAL_WORKER = """
import json, os, sys, torch
from mpo_fast.data import tiny
from mpo_fast.train.config import TrainConfig
from mpo_fast.train.loop import train

def run(out, mode):
    torch.set_num_threads(1)
    tok = tiny.tiny_tokenizer()
    model = tiny.tiny_lm(tok, hidden=32, layers=2, heads=2, seed=0)
    cfg = TrainConfig(model="given", data="given", output_dir=out, max_steps=2,
                      pairs_per_step=8, max_tokens=4096, max_length=32, lr=3e-3,
                      warmup_ratio=0.0, log_every=1, progress=False, distributed=mode,
                      eval_data="tiny", eval_pairs=7, eval_every=1)
    r = train(cfg, model=model, tokenizer=tok, examples=tiny.make_task(40, seed=1),
              log=lambda *a: None)
    return [h for h in r.history if "eval/loss" in h], r.final

if __name__ == "__main__":
    evals, final = run(sys.argv[2], sys.argv[1])
    with open(f"{sys.argv[2]}/rank-{os.environ['RANK']}.json", "w") as f:
        json.dump({"evals": evals, "final": final}, f)
"""


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_evaluate_like_one_and_export_final(mode, tmp_path):
    import os
    import socket
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM

    namespace: dict = {}
    exec(EVAL_WORKER, namespace)
    threads = torch.get_num_threads()
    one, _ = namespace["run"](str(tmp_path / "one"), "none")
    torch.set_num_threads(threads)
    script = tmp_path / "worker.py"
    script.write_text(EVAL_WORKER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / mode
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--master-addr", "127.0.0.1", "--master-port", str(port), str(script), mode, str(out)],
        env={**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"},
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for rank in range(2):
        got = json.loads((out / f"rank-{rank}.json").read_text())["evals"]
        assert [h["step"] for h in got] == [1, 2] and got[0]["eval/pairs"] == 7
        for a, b in zip(got, one, strict=True):  # 4 + 3 pairs on two ranks = 7 on one
            assert a["eval/loss"] == pytest.approx(b["eval/loss"], rel=1e-4)
            assert a["eval/rewards/margins"] == pytest.approx(b["eval/rewards/margins"],
                                                              rel=1e-3, abs=1e-6)
    AutoModelForCausalLM.from_pretrained(out / "final")  # full weights, whatever the sharding


def test_wandb_offline_run_holds_the_loss(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from mpo_fast.train.loop import train

    monkeypatch.setenv("WANDB_MODE", "offline")  # no account, no network
    monkeypatch.setenv("WANDB_SILENT", "true")
    result = train(resolve({"data": prefs(tmp_path / "p.jsonl"), "max_steps": 2,
                            "output_dir": str(tmp_path / "run"), "pairs_per_step": 4,
                            "log_every": 1, "progress": False, "report_to": "wandb"}),
                   log=lambda *a: None)
    run_id = (tmp_path / "run" / "wandb_run_id").read_text()
    [events] = (tmp_path / "run" / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    raw = events.read_bytes()  # protobuf records: keys and values (as JSON text) readable
    assert b"train/loss" in raw
    assert all(json.dumps(h["loss"]).encode() in raw for h in result.history)


def test_backend_reaches_the_policys_and_the_references_head(tmp_path, monkeypatch):
    """TrainConfig.backend picks the fused head's implementation for the policy's loss and the
    reference's log-probs alike; Triton (here under the interpreter) and the torch twin train
    the same steps."""
    import mpo_fast.logprobs as logprobs
    import mpo_fast.mpo as mpo
    from mpo_fast.train.loop import train

    pytest.importorskip("triton")
    asked = []
    real = logprobs.resolve_backend

    def spy(where):
        def resolve(backend, device, dtype):
            asked.append((where, backend))
            return real(backend, device, dtype)
        return resolve

    monkeypatch.setattr(logprobs, "resolve_backend", spy("reference"))
    monkeypatch.setattr(mpo, "resolve_backend", spy("policy"))
    data = prefs(tmp_path / "p.jsonl", times=2)
    losses = {}
    for backend in ("torch", "triton"):
        asked.clear()
        cfg = resolve({"data": data, "output_dir": str(tmp_path / backend), "max_steps": 2,
                       "pairs_per_step": 4, "progress": False, "backend": backend,
                       "max_length": 32})
        losses[backend] = [r["loss"] for r in train(cfg, log=lambda *a: None).history]
        assert set(asked) == {("reference", backend), ("policy", backend)}, asked
    assert losses["triton"] == pytest.approx(losses["torch"], rel=1e-5)
    with pytest.raises(ValueError, match="backend must be one of"):
        TrainConfig(backend="cuda")
