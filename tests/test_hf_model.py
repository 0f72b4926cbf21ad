"""The one model seam (mpo_fast/hf_model.py): every model family's log-probs through the
trainer's `MPOModel` and through `FusedDPOTrainer`'s head (`_head.install`, what TRL's
`add_fused_lm_head` becomes) equal the model's own ``log_softmax(logits)``, in float64.

Each tiny random-init model is built so that its head rule matters: Gemma 2 with a soft-cap
the logits reach, Cohere with a ``logit_scale``, Granite with ``logits_scaling`` (divides) and
an LM-head bias (scaled with the weight), InternVL with images (encoded once).
"""

from __future__ import annotations

import pytest
import torch

from mpo_fast import MPOLoss, hf_model
from mpo_fast.data import Example, PairTokenizer, collate, tiny
from mpo_fast.data.collate import TokenizedPair
from mpo_fast.integrations import _head
from mpo_fast.train.model import MPOModel, logit_softcap, set_attention

V = 96
F64_TOL = 1e-9
# Gemma 2's own (eager) attention takes its softmax in fp32 even for a float64 model: the
# reference itself carries ~1e-7 relative rounding where the trainer's packed attention does not
TOL = {"gemma2": 1e-6}
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=V)


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**SMALL))


def qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(**SMALL))


def gemma2():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(**{**SMALL, "num_key_value_heads": 1}, head_dim=8,
                       query_pre_attn_scalar=8, final_logit_softcapping=0.5,
                       sliding_window=32)  # past every sequence here: HF's eager attention
    # gives a padded float64 row NaN where a pad query sees no key (the packed sliding window
    # is checked against the model in test_train.py)
    return Gemma2ForCausalLM(cfg)


def cohere():
    from transformers import CohereConfig, CohereForCausalLM

    return CohereForCausalLM(CohereConfig(**SMALL, logit_scale=3.0))


def granite():
    from transformers import GraniteConfig, GraniteForCausalLM

    model = GraniteForCausalLM(GraniteConfig(**SMALL, logits_scaling=0.25,
                                             tie_word_embeddings=False))
    model.lm_head = torch.nn.Linear(32, V, bias=True)  # a bias: scaled with the weight
    return model


MODELS = {"llama": llama, "qwen2": qwen2, "gemma2": gemma2, "cohere": cohere,
          "granite": granite, "internvl": None}


def text_pairs(n: int) -> list[TokenizedPair]:
    ids = lambda k: torch.randint(0, V, (k,)).tolist()
    return [TokenizedPair(ids(int(torch.randint(2, 7, ()))), ids(int(torch.randint(1, 6, ()))),
                          ids(int(torch.randint(1, 6, ()))), index=i) for i in range(n)]


def vision_pairs(n: int):
    from PIL import Image

    tok = tiny.tiny_tokenizer()
    model, processor = tiny.tiny_internvl(tok)
    image = lambda: Image.fromarray(torch.randint(0, 256, (28, 28, 3), dtype=torch.uint8)
                                    .numpy())
    tokenize = PairTokenizer(tok, processor)
    words = ["red", "green", "blue", "yes", "no"]
    pairs = [tokenize(Example(f"what color is <image> {i} ?", words[i % 5],
                              words[(i + 1) % 5], (image(),)), i) for i in range(n)]
    return model, pairs


def own_logps(model, padded) -> torch.Tensor:
    """[2B] float64 sums of log_softmax(model(...).logits) at the targets: the reference."""
    kwargs = {}
    if padded.pixel_values is not None:  # the model's own way: every sequence its images
        kwargs["pixel_values"] = hf_model.twice(padded.pixel_values)
    with torch.no_grad():
        logits = model(input_ids=padded.input_ids,
                       attention_mask=padded.attention_mask.long(), **kwargs).logits
    token = logits.double().log_softmax(-1).gather(-1, padded.targets.clamp(min=0)[..., None])
    return (token[..., 0] * (padded.targets != -100)).sum(-1)


def trainer_logps(model, packed) -> torch.Tensor:
    """[2B] through the trainer: `MPOModel` on a packed batch (images encoded once)."""
    set_attention(model, True)
    policy = MPOModel(model, MPOLoss(loss_types=("sft",), softcap=logit_softcap(model)))
    with torch.no_grad():
        out = policy(packed)
    set_attention(model, False)
    return torch.cat([out.chosen_logps, out.rejected_logps])


def dropin_logps(model, padded) -> torch.Tensor:
    """[2B] through FusedDPOTrainer's head: the fused forward TRL calls (images repeated by
    the collator, encoded once by the head)."""
    _head.install(model, _head.FusedHead(encode_images_once=True))
    kwargs = {}
    if padded.pixel_values is not None:
        kwargs["pixel_values"] = hf_model.twice(padded.pixel_values)
    try:
        with torch.no_grad():
            out = model(input_ids=padded.input_ids, attention_mask=padded.attention_mask.long(),
                        shift_labels=padded.targets, fused_lm_head=True, **kwargs)
    finally:
        _head.uninstall(model)
    return out.log_probs.sum(-1)


@pytest.mark.parametrize("family", list(MODELS))
def test_trainer_and_dropin_give_each_models_own_logprobs(family):
    if family == "internvl":
        model, pairs = vision_pairs(3)
        pad = 0
    else:
        model, pairs, pad = MODELS[family](), text_pairs(3), 0
    model = model.double().eval()
    set_attention(model, False)
    padded = collate(pairs, pad_id=pad, packed=False)
    packed = collate(pairs, pad_id=pad, packed=True)
    expected = own_logps(model, padded)
    got = {"trainer": trainer_logps(model, packed), "drop-in": dropin_logps(model, padded)}
    errors = {k: ((v - expected).norm() / expected.norm()).item() for k, v in got.items()}
    assert all(e <= TOL.get(family, F64_TOL) for e in errors.values()), errors


def test_one_logit_rule():
    """The scale / soft-cap rule TRL 1.16 reads, one place: Cohere multiplies, Granite divides
    (HyperCLOVA X multiplies by logits_scaling), Gemma 2 soft-caps."""
    from types import SimpleNamespace as NS

    shape = lambda **cfg: hf_model.logit_shape(NS(config=NS(**cfg)))
    assert shape() == hf_model.LogitShape(1.0, None)
    assert shape(logit_scale=0.0625).scale == 0.0625
    assert shape(logits_scaling=8.0).scale == 1 / 8
    assert shape(logits_scaling=8.0, model_type="hyperclovax").scale == 8.0
    assert shape(lm_head_multiplier=2.0).scale == 2.0
    assert shape(final_logit_softcapping=30.0).softcap == 30.0
    assert shape(text_config=NS(logit_scale=2.0)).scale == 2.0  # a VLM's language model


def test_mrope_refusal_is_one_check_with_each_callers_remedy():
    from types import SimpleNamespace as NS

    from mpo_fast.train.model import check_packable

    model = NS(config=NS(rope_parameters={"mrope_section": [1, 1, 2]}))
    assert hf_model.uses_mrope(model)
    with pytest.raises(NotImplementedError, match=r"M-RoPE.*keep padding"):
        hf_model.check_packable(model)
    with pytest.raises(ValueError, match=r"M-RoPE.*--no-packing"):
        check_packable(model)
