"""Every ```python block of README.md that loads a model by name (the integration sections) runs
as written, on the CPU, with the Hub downloads redirected to tiny random-init models: the same
architectures (a causal LM, an HF-native InternVL with its processor), loaded twice with the same
weights as `from_pretrained` would. The README's other blocks run in tests/test_readme.py."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("datasets")

import hf_tiny as _tiny
import transformers
from test_readme import README, needs_hub, python_blocks

HUB_BLOCKS = [(line, code) for line, code in python_blocks(README.read_text()) if needs_hub(code)]
BLOCKS = [code for _, code in HUB_BLOCKS]


@pytest.fixture
def tiny_hub(monkeypatch, tmp_path):
    """AutoX.from_pretrained(any name) -> a tiny model; a "vl"-ish name gives InternVL."""
    seed = int(torch.randint(0, 2**31, ()))
    text_tok, vision_tok = _tiny.tokenizer(), _tiny.tokenizer(vision=True)

    def causal_lm(cls, name, *args, **kwargs):
        torch.manual_seed(seed)  # the same weights every load, like a checkpoint
        return _tiny.causal_lm(text_tok)

    def vlm(cls, name, *args, **kwargs):
        torch.manual_seed(seed)
        return _tiny.internvl(vision_tok)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        classmethod(causal_lm))
    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained",
                        classmethod(vlm))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        classmethod(lambda cls, name, *a, **k: _tiny.tokenizer()))
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained",
                        classmethod(lambda cls, name, *a, **k: _tiny.internvl_processor(
                            _tiny.tokenizer(vision=True))))
    post_init = transformers.TrainingArguments.__post_init__

    def on_cpu(self):  # the blocks are written for a GPU (TRL's bf16 default): run them on CPU
        self.use_cpu = True
        post_init(self)

    monkeypatch.setattr(transformers.TrainingArguments, "__post_init__", on_cpu)
    monkeypatch.chdir(tmp_path)  # the blocks write output_dir and read cat.jpg here
    from PIL import Image

    pixels = torch.randint(0, 256, (64, 48, 3), dtype=torch.uint8).numpy()
    Image.fromarray(pixels).save(tmp_path / "cat.jpg")


def test_the_doc_has_the_expected_blocks():
    assert len(BLOCKS) == 6
    assert sum("FusedDPOTrainer" in b for b in BLOCKS) == 2
    assert sum("MPOTrainer(" in b for b in BLOCKS) == 1
    assert sum("patch_model(" in b for b in BLOCKS) == 1


@pytest.mark.parametrize("index", range(len(BLOCKS)),
                         ids=[f"README.md:{line}" for line, _ in HUB_BLOCKS])
def test_doc_block_runs(index, tiny_hub, capsys):
    block = BLOCKS[index]
    if "trl" in block:
        pytest.importorskip("trl")
    namespace = {"__name__": "__doc_block__"}
    exec(compile(block, f"README.md:{HUB_BLOCKS[index][0]}", "exec"), namespace)
    if "trainer" in namespace:  # a trainer block: it trained, and logged finite losses
        history = namespace["trainer"].state.log_history
        assert namespace["trainer"].state.global_step >= 1
        losses = [h["train_loss"] for h in history if "train_loss" in h]
        assert losses and all(torch.isfinite(torch.tensor(losses)))
    if "out" in namespace:
        assert torch.isfinite(namespace["out"].loss).all()
