"""Batched sampling from a Hugging Face causal LM or vision-language model.

    Prompt(question, images, prefix) --chat template--> text --processor--> input_ids (+ pixels)
        --model.generate (left padding, KV cache, model's device)--> new tokens --> text

`Generator` works with what `AutoProcessor` / `AutoTokenizer` return: a VLM processor (has an
``image_processor``; images go in as ``{"type": "image"}`` content items and come out as
``pixel_values``) or a plain tokenizer (text only). A prompt with a ``prefix`` prefills the
assistant turn (``continue_final_message=True``) and the model continues it; the text returned
is the continuation with its natural leading whitespace (see `continuation_text`).

Prompts are sorted by length into batches (less padding) and the answers returned in the
prompts' order. The model runs where it lives (`model.device`): on GPU when it was put there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from .io import strip_image_placeholders

__all__ = ["MAX_NEW_TOKENS", "Generator", "Prompt", "SamplingConfig", "continuation_text"]

ANCHOR_TOKENS = 8  # prompt tokens decoded with a continuation to recover its leading space
# new tokens per sampled response: the MPO authors' 2048 (InternVL's MMPR scripts use
# 2048-4096); a long chain of thought cut short has no "Final Answer:" and becomes a format
# failure
MAX_NEW_TOKENS = 2048


@dataclass(frozen=True)
class Prompt:
    question: str  # the user turn; "<image>" placeholders are removed (images go as content)
    images: Sequence[Any] = ()  # PIL images, in order; () for text
    prefix: str = ""  # assistant text to continue (prefilled); "" for a fresh answer


@dataclass(frozen=True)
class SamplingConfig:
    """`model.generate` options; the defaults are the paper's (temperature 0.7, top-k 50) and
    the authors' length limit (`MAX_NEW_TOKENS`)."""

    temperature: float = 0.7
    top_k: int = 50
    top_p: float = 1.0
    max_new_tokens: int = MAX_NEW_TOKENS
    do_sample: bool = True

    def generate_kwargs(self) -> dict:
        if not self.do_sample:
            return {"do_sample": False, "max_new_tokens": self.max_new_tokens}
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        return {"do_sample": True, "temperature": self.temperature, "top_k": self.top_k,
                "top_p": self.top_p, "max_new_tokens": self.max_new_tokens}


@dataclass
class Generator:
    """Samples answers to `Prompt`s with a model and its processor (or tokenizer).

    Args:
        model: a Hugging Face model with ``generate`` (causal LM or image-text-to-text).
        processor: its processor (VLM) or tokenizer (text); must have a chat template.
        batch_size: rows per ``generate`` call.
        sampling: the default `SamplingConfig`.
        progress: show a tqdm bar per call.
    """

    model: Any
    processor: Any
    batch_size: int = 16
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    progress: bool = True

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        self.is_vlm = hasattr(self.processor, "image_processor")
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    # ------------------------------------------------------------ prompts -> tensors
    def messages(self, prompt: Prompt) -> list[dict]:
        text = strip_image_placeholders(prompt.question)
        if prompt.images and not self.is_vlm:
            raise ValueError("this prompt has images but the processor is a text tokenizer: "
                             "load the model's AutoProcessor (a vision-language model)")
        if self.is_vlm:
            content = [{"type": "image"} for _ in prompt.images] + [{"type": "text", "text": text}]
        else:
            content = text
        msgs = [{"role": "user", "content": content}]
        if prompt.prefix:
            msgs.append({"role": "assistant", "content": prompt.prefix})
        return msgs

    def render(self, prompt: Prompt) -> str:
        """The prompt as text through the chat template (ending in the prefix, if any)."""
        if getattr(self.processor, "chat_template", None) is None and \
                getattr(self.tokenizer, "chat_template", None) is None:
            raise ValueError("the processor/tokenizer has no chat template; use an instruct "
                             "(chat) model or set processor.chat_template")
        return self.processor.apply_chat_template(
            self.messages(prompt), tokenize=False, add_generation_prompt=not prompt.prefix,
            continue_final_message=bool(prompt.prefix))

    def encode(self, prompts: Sequence[Prompt]) -> dict[str, torch.Tensor]:
        """Left-padded model inputs for a batch, on the model's device."""
        texts = [self.render(p) for p in prompts]
        images = [im for p in prompts for im in p.images]
        old_side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "left"
        try:
            if self.is_vlm:
                batch = self.processor(text=texts, images=images or None, padding=True,
                                       return_tensors="pt")
            else:
                batch = self.tokenizer(texts, padding=True, return_tensors="pt",
                                       add_special_tokens=False)
        finally:
            self.tokenizer.padding_side = old_side
        device = self.model.device
        dtype = getattr(self.model, "dtype", None)
        out = {}
        for k, v in batch.items():
            if not isinstance(v, torch.Tensor):
                continue
            v = v.to(device)
            out[k] = v.to(dtype) if v.is_floating_point() and dtype is not None else v
        return out

    # ------------------------------------------------------------ sampling
    @torch.no_grad()
    def __call__(self, prompts: Sequence[Prompt], *, desc: str = "generate",
                 sampling: SamplingConfig | None = None, **overrides) -> list[str]:
        """One answer per prompt (the continuation for prefilled prompts), in order.
        `overrides` replace fields of the sampling config (e.g. ``do_sample=False``)."""
        cfg = replace(sampling or self.sampling, **overrides)
        order = sorted(range(len(prompts)),
                       key=lambda i: (len(prompts[i].images), len(prompts[i].question)
                                      + len(prompts[i].prefix)))
        out: list[str] = [""] * len(prompts)
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        for idx in _progress(batches, desc, self.progress):
            texts = self._generate([prompts[i] for i in idx], cfg)
            for i, t in zip(idx, texts, strict=True):
                out[i] = t
        return out

    def _generate(self, prompts: Sequence[Prompt], cfg: SamplingConfig) -> list[str]:
        inputs = self.encode(prompts)
        seqs = self.model.generate(**inputs, **cfg.generate_kwargs(),
                                   pad_token_id=self.tokenizer.pad_token_id)
        L = inputs["input_ids"].shape[1]
        texts = []
        for row, p in enumerate(prompts):
            new = _strip_pad(seqs[row, L:].tolist(), self.tokenizer.pad_token_id)
            if p.prefix:
                anchor = inputs["input_ids"][row, -ANCHOR_TOKENS:].tolist()
                texts.append(continuation_text(self.tokenizer, anchor, new, p.prefix))
            else:
                texts.append(self.tokenizer.decode(new, skip_special_tokens=True).strip())
        return texts


def continuation_text(tokenizer, anchor_ids: list[int], new_ids: list[int], prefix: str) -> str:
    """The text the model added after `prefix`, with the whitespace it really produced.

    Decoding the new tokens alone can lose a leading space (SentencePiece's "▁word" decodes to
    "word" at the start of a string), so they are decoded after the last prompt tokens (the
    anchor) and the anchor's own text is cut off. If that fails (a tokenizer whose decode is not
    prefix-stable), a space is put between two word characters."""
    anchor = tokenizer.decode(anchor_ids, skip_special_tokens=True)
    full = tokenizer.decode(list(anchor_ids) + list(new_ids), skip_special_tokens=True)
    if full.startswith(anchor):
        cont = full[len(anchor):]
    else:
        cont = tokenizer.decode(new_ids, skip_special_tokens=True)
        if cont and prefix and not cont[0].isspace() and not prefix[-1].isspace() \
                and cont[0].isalnum() and prefix[-1].isalnum():
            cont = " " + cont
    return cont.rstrip()


def _strip_pad(ids: list[int], pad_id: int | None) -> list[int]:
    while ids and ids[-1] == pad_id:
        ids.pop()
    return ids


def _progress(it, desc: str, enabled: bool):
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, unit="batch", leave=False)
