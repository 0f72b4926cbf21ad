"""The bundled tiny world: a word-level tokenizer, tiny model configs and a synthetic
preference task with a checkable answer. Everything is built in code (no download).

Tokenizer: one token per whitespace-separated word — the numbers "0".."63" first (so id 0 is
the real token "0", as id 0 is "!" in Qwen tokenizers: a mask made as ``input_ids != 0`` would
be wrong), then the chat and image tokens and the task's words. Its chat template:

    <|user|> largest of 12 7 45 3 <|end|> <|assistant|> 45 <|end|>

Task ("which number is largest / smallest"): a list of 3..8 numbers and an instruction; the
chosen answer is the right number, the rejected one another number of the list. The answer is
one token, so greedy decoding is checked exactly (`answer_of`).

Models: `tiny_lm` (a Llama with tied embeddings) and `tiny_internvl` (InternVL as implemented
in transformers, with `TinyVLProcessor`, a stand-in for InternVLProcessor that expands
"<IMG_CONTEXT>" into "<img> <IMG_CONTEXT>*k </img>" and turns images into pixel_values).
"""

from __future__ import annotations

import random

import torch

from .formats import Example

__all__ = ["HELD_OUT_PAIRS", "NUM_VALUES", "TRAIN_PAIRS", "TinyVLProcessor", "answer_of",
           "make_task", "tiny_internvl", "tiny_lm", "tiny_tokenizer"]

NUM_VALUES = 64
TRAIN_PAIRS = 8000  # the demo's training set (distinct prompts)
HELD_OUT_PAIRS = 256  # its held-out set (prompts never seen in training)
SPECIAL = ["<pad>", "<unk>", "<s>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>",
           "<img>", "</img>", "<IMG_CONTEXT>"]
WORDS = ["largest", "smallest", "of", "which", "is", "the", "what", "color", "image", "?",
         "red", "green", "blue", "a", "an", "and", "yes", "no", "it", "this"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}")
TASKS = ("largest", "smallest")


def tiny_tokenizer():
    """The bundled word-level tokenizer (a `PreTrainedTokenizerFast` with a chat template)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [str(i) for i in range(NUM_VALUES)] + SPECIAL + WORDS
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>",
                                  bos_token="<s>", eos_token="<|end|>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_lm(tokenizer, *, hidden: int = 64, layers: int = 2, heads: int = 4,
            vocab_size: int | None = None, seed: int = 0):
    """A random-init Llama causal LM with tied input/output embeddings."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size or _round_up(len(tokenizer), 8),
                      hidden_size=hidden, intermediate_size=4 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=max(1, heads // 2), max_position_embeddings=512,
                      tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(cfg)


def tiny_internvl(tokenizer, *, image_size: int = 28, seed: int = 0):
    """A random-init InternVL (transformers' InternVLForConditionalGeneration) and its
    `TinyVLProcessor`: 14-pixel patches, pixel shuffle 0.5, so (image_size/28)^2 tokens."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    cfg = InternVLConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, image_size=[image_size] * 2,
                           patch_size=[14, 14]),
        text_config=dict(model_type="qwen2", hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         vocab_size=_round_up(len(tokenizer), 8), max_position_embeddings=512,
                         pad_token_id=tokenizer.pad_token_id),
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=(image_size // 28) ** 2)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = InternVLForConditionalGeneration(cfg)
    return model, TinyVLProcessor(tokenizer, image_size, cfg.image_seq_length)


class TinyVLProcessor:
    """What InternVLProcessor does, for the tiny tokenizer: each "<IMG_CONTEXT>" of the text
    becomes "<img> <IMG_CONTEXT>*k </img>" and each image one 3 x S x S tile of pixel_values
    (resized, scaled to [-1, 1])."""

    image_token = "<IMG_CONTEXT>"
    chat_template = None

    def __init__(self, tokenizer, image_size: int, image_seq_length: int):
        self.tokenizer, self.image_size, self.image_seq_length = (tokenizer, image_size,
                                                                  image_seq_length)
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.image_token_ids = [self.image_token_id,
                                *tokenizer.convert_tokens_to_ids(["<img>", "</img>"])]

    def __call__(self, text, images, return_tensors="pt", add_special_tokens=True):
        import numpy as np

        (text,), (images,) = text, images
        if text.count(self.image_token) != len(images):
            raise ValueError(f"{text.count(self.image_token)} image tokens for {len(images)} "
                             "images")
        tile = f" <img> {' '.join([self.image_token] * self.image_seq_length)} </img> "
        ids = self.tokenizer(text.replace(self.image_token, tile),
                             add_special_tokens=add_special_tokens)["input_ids"]
        size = (self.image_size, self.image_size)
        pixels = [torch.from_numpy(np.asarray(im.convert("RGB").resize(size), dtype=np.float32))
                  for im in images]
        pixels = torch.stack(pixels).permute(0, 3, 1, 2) / 127.5 - 1.0
        return {"input_ids": torch.tensor([ids]), "pixel_values": pixels}


def make_task(n: int, seed: int, *, exclude: frozenset = frozenset(),
              min_len: int = 3, max_len: int = 8) -> list[Example]:
    """``n`` distinct "largest/smallest of ..." pairs (none of whose prompts is in
    ``exclude``): chosen = the right number, rejected = another number of the list."""
    rng = random.Random(seed)
    seen, out = set(exclude), []
    while len(out) < n:
        task = rng.choice(TASKS)
        values = rng.sample(range(NUM_VALUES), rng.randint(min_len, max_len))
        prompt = f"{task} of {' '.join(map(str, values))}"
        if prompt in seen:
            continue
        seen.add(prompt)
        right = max(values) if task == "largest" else min(values)
        wrong = rng.choice([v for v in values if v != right])
        out.append(Example(prompt, str(right), str(wrong), source=f"tiny-task[{len(out)}]"))
    return out


def answer_of(example: Example) -> str:
    """The right answer of a task prompt (what a greedy decode should produce)."""
    task, _, *values = example.prompt.split()
    pick = max if task == "largest" else min
    return str(pick(int(v) for v in values))


def _round_up(n: int, k: int) -> int:
    return (n + k - 1) // k * k
