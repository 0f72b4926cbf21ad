"""Test fixtures: tiny random-init models, a character tokenizer and a toy preference set, for
the integration tests and the README blocks' test (no download, seconds on a CPU).

    tokenizer()                 character-level PreTrainedTokenizerFast (printable ASCII + specials)
    causal_lm(tok, **config)    LlamaForCausalLM, hidden 32, 2 layers, the tokenizer's vocabulary
    internvl(tok, **config)     InternVLForConditionalGeneration (HF-native), 28x28 image: 1 token
    internvl_processor()        InternVLProcessor over the tokenizer (images only: no torchvision)
    pairs(n), image_pairs(n)    toy prompt / chosen / rejected rows (with random images)
"""

from __future__ import annotations

import random
import re
import string

import torch

IMAGE_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>",
                "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}
IMAGE_SIZE = 28


def tokenizer(vision: bool = False):
    """A character-level tokenizer: ids 0-3 are <pad>, <eos>, <bos>, <unk>, then the
    InternVL image tokens when ``vision``, then the 95 printable ASCII characters."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", *(IMAGE_TOKENS.values() if vision else ())]
    vocab = {t: i for i, t in enumerate(specials + list(string.printable[:95]))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    extra = {"extra_special_tokens": IMAGE_TOKENS} if vision else {}
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>",
                                   eos_token="<eos>", bos_token="<bos>", unk_token="<unk>",
                                   **extra)


def causal_lm(tok=None, *, vocab_size: int | None = None, hidden_size: int = 32, **config):
    """A random-init LlamaForCausalLM (2 layers, 4 heads, untied head)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if vocab_size is None:
        vocab_size = len(tok)
    ids = {} if tok is None else {"pad_token_id": tok.pad_token_id,
                                  "eos_token_id": tok.eos_token_id,
                                  "bos_token_id": tok.bos_token_id}
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size,
                      intermediate_size=2 * hidden_size, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, **ids, **config)
    return LlamaForCausalLM(cfg)


def internvl(tok, **text_config):
    """A random-init InternVLForConditionalGeneration: a 1-layer vision tower on 28x28 images
    (4 patches, pixel-shuffled to one image token) and a 2-layer Qwen2 text stack."""
    from transformers import (
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLVisionConfig,
        Qwen2Config,
    )

    vision = InternVLVisionConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, image_size=(IMAGE_SIZE, IMAGE_SIZE),
                                  patch_size=(14, 14))
    text = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                       bos_token_id=tok.bos_token_id, **text_config)
    cfg = InternVLConfig(vision_config=vision, text_config=text, image_seq_length=1,
                         image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"),
                         tie_word_embeddings=False)
    return InternVLForConditionalGeneration(cfg)


def internvl_processor(tok=None):
    """transformers' InternVLProcessor without its video processor (which needs
    torchvision): image processing and image-token expansion are InternVL's own."""
    from transformers import GotOcr2ImageProcessorPil, InternVLProcessor, ProcessorMixin

    class ImageOnlyInternVLProcessor(InternVLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, image_seq_length=1,
                     chat_template=None, **kwargs):
            ProcessorMixin.__init__(self, image_processor, tokenizer,
                                    chat_template=chat_template, **kwargs)
            self.image_seq_length = image_seq_length
            self.start_image_token = tokenizer.start_image_token
            self.end_image_token = tokenizer.end_image_token
            self.start_image_token_id = tokenizer.start_image_token_id
            self.end_image_token_id = tokenizer.end_image_token_id
            self.image_token = tokenizer.context_image_token
            self.video_token = tokenizer.video_token
            self.image_token_id = tokenizer.context_image_token_id
            self.multimodal_pattern = re.compile(f"(?P<image>{re.escape(self.image_token)})|"
                                                 f"(?P<video>{re.escape(self.video_token)})")

    images = GotOcr2ImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                      crop_to_patches=False)
    return ImageOnlyInternVLProcessor(images, tok or tokenizer(vision=True), image_seq_length=1)


_WORDS = ("cat", "dog", "red", "blue", "sky", "sea", "two", "four", "yes", "no", "tree", "sun")


def pairs(n: int, seed: int | None = None) -> list[dict]:
    """``n`` random text pairs {"prompt", "chosen", "rejected"} of different lengths."""
    rng = random.Random(seed)

    def words(k):
        return " ".join(rng.choice(_WORDS) for _ in range(k))

    return [{"prompt": words(rng.randint(2, 5)) + "?", "chosen": " " + words(rng.randint(1, 4)),
             "rejected": " " + words(rng.randint(1, 4))} for _ in range(n)]


def image_pairs(n: int, seed: int | None = None) -> list[dict]:
    """``n`` pairs with one random 28x28 RGB image each, the image token in the prompt."""
    from PIL import Image

    g = torch.Generator().manual_seed(random.Random(seed).randrange(2**31))
    rows = pairs(n, seed)
    for row in rows:
        pixels = torch.randint(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), generator=g,
                               dtype=torch.uint8)
        row["images"] = [Image.fromarray(pixels.numpy())]
        row["prompt"] = IMAGE_TOKENS["context_image_token"] + row["prompt"]
    return rows
