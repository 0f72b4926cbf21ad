"""A tiny vision-language model built in code (no downloads): tests and the miniature.

    TinyVLProcessor  `mpo_fast.data.tiny.TinyVLProcessor` (the package's one): each
                     "<IMG_CONTEXT>" of the text (the chat template writes one per image item)
                     becomes "<img>" + "<IMG_CONTEXT>" * image_seq_length + "</img>", images
                     become pixel_values [num_images, 3, S, S] (scaled to [-1, 1])
    build_tokenizer  a byte-level BPE trained on a corpus in a second, with a ChatML template
                     whose conversation ending in an answer ends at "<|im_end|>" (the newline
                     of ChatML goes before the next "<|im_start|>"), so the trainer's
                     completion tokens (`mpo_fast.data.collate`) are exactly what generation
                     produces: the answer, then eos
    build_tiny_vlm   a random-init `transformers.InternVLForConditionalGeneration` (a small
                     InternViT + Qwen2) and its processor

With the defaults (32 x 32 images, 4 x 4 patches, pixel-shuffle 0.5) an image is 16 tokens, one
per 8 x 8 cell. The processor has the interface `Generator` and the trainer's
`mpo_fast.data.collate.PairTokenizer` use, so the pair pipelines and the trainer run on it
exactly as on a real model's `AutoProcessor`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..data.tiny import IMG_CONTEXT, IMG_END, IMG_START, TinyVLProcessor

__all__ = ["CHAT_TEMPLATE", "TinyVLProcessor", "build_tiny_vlm", "build_tokenizer"]

SPECIAL_TOKENS = ["<pad>", "<|im_start|>", "<|im_end|>", IMG_START, IMG_END, IMG_CONTEXT]

# ChatML, string or list content; "<IMG_CONTEXT>\n" per image item (InternVL's placeholder);
# continue_final_message honoured; "\n" before each later turn, none after the last one
# (written {{ '\n' }}: transformers renders templates with trim_blocks, which drops a newline
# right after a block tag)
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if not loop.first %}{{ '\\n' }}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<IMG_CONTEXT>\n{% elif c['type'] == 'text' %}{{ c['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "{% if not (loop.last and continue_final_message) %}<|im_end|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\n' }}<|im_start|>assistant\n{% endif %}")

_BASE_CORPUS = ["The quick brown fox jumps over the lazy dog. Final Answer: 42",
                "Question: How many? Reason step by step. 1 + 2 = 3, 0123456789."]


def build_tokenizer(corpus: Iterable[str] = (), vocab_size: int = 384):
    """A byte-level BPE tokenizer (any text encodes) trained on `corpus`, with the special
    tokens above, pad "<pad>", eos "<|im_end|>" and the ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(list(_BASE_CORPUS) + list(corpus), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                                   eos_token="<|im_end|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_vlm(tokenizer, *, image_size: int = 32, patch_size: int = 4, vision_hidden: int = 64,
                   vision_layers: int = 2, hidden: int = 128, layers: int = 2, heads: int = 4,
                   max_positions: int = 512, seed: int | None = 0):
    """(model, processor): a random-init InternVL (InternViT + Qwen2) sized for a CPU."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration, Qwen2Config
    from transformers.models.internvl import InternVLVisionConfig

    if image_size % (2 * patch_size):
        raise ValueError("image_size must be a multiple of 2 * patch_size (pixel shuffle 0.5)")
    image_seq_length = (image_size // patch_size // 2) ** 2
    vision = InternVLVisionConfig(hidden_size=vision_hidden, num_hidden_layers=vision_layers,
                                  num_attention_heads=2, intermediate_size=2 * vision_hidden,
                                  image_size=[image_size, image_size],
                                  patch_size=[patch_size, patch_size])
    text = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden,
                       intermediate_size=2 * hidden, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                       max_position_embeddings=max_positions, tie_word_embeddings=False,
                       pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    processor = TinyVLProcessor(tokenizer, image_size, image_seq_length)
    config = InternVLConfig(vision_config=vision, text_config=text,
                            image_token_id=processor.image_token_id,
                            image_seq_length=image_seq_length, downsample_ratio=0.5,
                            tie_word_embeddings=False)
    with torch.random.fork_rng():  # the caller's random stream is left as it was
        if seed is not None:
            torch.manual_seed(seed)
        model = InternVLForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    return model, processor
