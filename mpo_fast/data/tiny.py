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
in transformers, with `TinyVLProcessor`, the package's one stand-in for InternVLProcessor,
which expands "<IMG_CONTEXT>" into "<img> <IMG_CONTEXT>*k </img>" and turns images into
pixel_values; the pair pipeline's tiny model uses it too).
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
            vocab_size: int | None = None, tied: bool = True, seed: int = 0):
    """A random-init Llama causal LM, its input/output embeddings tied unless ``tied=False``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size or _round_up(len(tokenizer), 8),
                      hidden_size=hidden, intermediate_size=4 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=max(1, heads // 2), max_position_embeddings=512,
                      tie_word_embeddings=tied, pad_token_id=tokenizer.pad_token_id,
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
    return model, TinyVLProcessor(tokenizer, image_size, cfg.image_seq_length, sep=" ")


IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"


class TinyVLProcessor:
    """InternVL's processor conventions for a tiny tokenizer, without torchvision: the one
    stand-in for InternVLProcessor, used by the trainer's bundled InternVL (`tiny_internvl`)
    and the pair pipeline's miniature (`mpo_fast.pairs.tiny`).

    Text: each "<IMG_CONTEXT>" becomes "<img>" + "<IMG_CONTEXT>" * ``image_seq_length`` +
    "</img>", the pieces joined by ``sep`` (" " for a word-level tokenizer that splits on
    spaces, "" for one whose image tokens are special tokens). Images: one 3 x S x S tile each
    (resized, scaled to [-1, 1]) in ``pixel_values`` [num_images, 3, S, S] float32.

    It has the interface `mpo_fast.data.collate.PairTokenizer` uses (``image_token``,
    ``image_token_ids``: every token of an expanded image, which truncation must never cut;
    one image list per text) and the pair pipeline's `Generator` uses (``image_processor``,
    ``tokenizer``, ``chat_template``, ``apply_chat_template``, batched ``__call__``).
    """

    image_token = IMG_CONTEXT  # the placeholder in the text, as InternVLProcessor's

    def __init__(self, tokenizer, image_size: int = 32, image_seq_length: int = 16,
                 sep: str = ""):
        self.tokenizer, self.image_size, self.image_seq_length = (tokenizer, image_size,
                                                                  image_seq_length)
        self.sep = sep
        self.image_processor = self  # marks a vision-language processor for `Generator`
        self.chat_template = getattr(tokenizer, "chat_template", None)
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT)
        self.image_token_ids = tokenizer.convert_tokens_to_ids([IMG_START, IMG_CONTEXT, IMG_END])

    def apply_chat_template(self, messages, **kwargs):
        return self.tokenizer.apply_chat_template(messages, **kwargs)

    CONFIG = "tiny_vl_processor.json"  # its settings; the tokenizer's own files beside it

    def save_pretrained(self, folder: str) -> None:
        """The tokenizer's files (`AutoTokenizer.from_pretrained(folder)` loads it) and this
        processor's settings, for `from_pretrained`."""
        import json
        import os

        self.tokenizer.save_pretrained(folder)
        settings = {"image_size": self.image_size, "image_seq_length": self.image_seq_length,
                    "sep": self.sep}
        with open(os.path.join(folder, self.CONFIG), "w", encoding="utf-8") as f:
            json.dump(settings, f, indent=1)

    @classmethod
    def from_pretrained(cls, folder: str) -> TinyVLProcessor:
        """The processor `save_pretrained` wrote into ``folder``."""
        import json
        import os

        from transformers import AutoTokenizer

        with open(os.path.join(folder, cls.CONFIG), encoding="utf-8") as f:
            settings = json.load(f)
        return cls(AutoTokenizer.from_pretrained(folder), **settings)

    def expand(self, text: str) -> str:
        """``text`` with every image placeholder expanded to the image's tokens."""
        tile = self.sep.join([IMG_START, *[IMG_CONTEXT] * self.image_seq_length, IMG_END])
        return text.replace(IMG_CONTEXT, f"{self.sep}{tile}{self.sep}")

    def pixel_values(self, images) -> torch.Tensor:
        """[num_images, 3, S, S] float32 in [-1, 1]."""
        tiles = []
        for im in images:
            im = im.convert("RGB")
            if im.size != (self.image_size, self.image_size):
                im = im.resize((self.image_size, self.image_size))
            t = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
            tiles.append(t.view(self.image_size, self.image_size, 3).permute(2, 0, 1))
        return torch.stack(tiles).float() / 127.5 - 1.0

    def __call__(self, text, images=None, padding=True, return_tensors: str = "pt",
                 add_special_tokens: bool = False, **kwargs):
        """Token ids (placeholders expanded) and pixel_values; ``text`` a string or a list,
        ``images`` flat in text order or one list per text (as `PairTokenizer` passes them)."""
        texts = [text] if isinstance(text, str) else list(text)
        images = [im for x in images or () for im in (x if isinstance(x, (list, tuple)) else [x])]
        placeholders = sum(t.count(IMG_CONTEXT) for t in texts)
        if placeholders != len(images):
            raise ValueError(f"{placeholders} {IMG_CONTEXT} placeholders but {len(images)} "
                             "images")
        out = dict(self.tokenizer([self.expand(t) for t in texts], padding=padding,
                                  return_tensors=return_tensors,
                                  add_special_tokens=add_special_tokens))
        if images:
            out["pixel_values"] = self.pixel_values(images)
        return out


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
