"""From an `Example` to token ids (`PairTokenizer`), and from whole pairs to a `Batch` (`collate`).

    PairTokenizer(tokenizer, processor)(example) -> TokenizedPair
        text      `mpo_fast.pair_tokens`, the one way to tokenize a pair (the drop-ins'
                  collator uses it too): the chat template with the generation prompt, the
                  completions as the rest of the templated conversation (or text + eos),
                  truncation to max_length (completions first, then the prompt's start, never
                  through an image token)
        images    expanded to the model's image tokens by the processor (the images' pixels
                  are kept, once per pair)
        bad data  (a `DataError` naming the pair's file:line): images for a model without a
                  processor, an image PIL cannot read or larger than MAX_IMAGE_PIXELS (a
                  decompression bomb), a chat template or processor that rejects the pair,
                  chosen and rejected that are the same tokens once tokenized and truncated

    collate(pairs, packed=True) -> Batch
        sequences: the B chosen (prompt + chosen) in pair order, then the B rejected, as
        `mpo_fast.MPOLoss` expects; packed with `mpo_fast.packing.pack` into one row of N tokens
        (`Segments` for attention and the loss), or padded to [2B, T] with an attention mask
        made from the lengths (never from ``input_ids != pad``: id 0 is a real token in many
        tokenizers). Targets are shifted by `mpo_fast.packing.shift_targets`: completion tokens
        only, never across a sequence boundary.

The pair's pixels appear once in the batch (``pixel_values``, pair order): the trainer encodes
them once and reuses the features for the chosen and the rejected sequence.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field

import torch

from .. import pair_tokens
from ..layout import Segments
from ..packing import pack, plan, shift_targets
from .formats import IMAGE_PLACEHOLDER, DataError, Example

__all__ = ["Batch", "PairTokenizer", "TokenizedPair", "collate", "micro_batches", "step_pairs"]

_TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")
# Most pixels of one image (8192^2, 200 MB as RGB): far above any VLM's input size, below PIL's
# own bomb limit, and kept where a library has switched PIL's off (Image.MAX_IMAGE_PIXELS=None).
MAX_IMAGE_PIXELS = 8192 * 8192


@dataclass
class TokenizedPair:
    """One pair as token ids: ``prompt`` (image tokens expanded), ``chosen``, ``rejected``;
    the prompt's images as the processor made them (``pixel_values`` plus per-image extras such
    as ``image_grid_thw``), or None; ``index`` in the dataset; ``source`` for messages."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    pixel_values: torch.Tensor | None = None
    image_kwargs: dict = field(default_factory=dict)
    index: int = -1
    source: str = "<memory>"

    @property
    def num_tokens(self) -> int:
        """Tokens of the pair once packed: chosen and rejected each with the prompt."""
        return 2 * len(self.prompt) + len(self.chosen) + len(self.rejected)


class PairTokenizer:
    """Chat template + tokenization + image tokens for `Example`s (see the module docstring).

    Args:
        tokenizer: a Hugging Face tokenizer (its chat template is used when it has one).
        processor: for vision-language models, the model's processor (called as
            ``processor(text=[str], images=[[PIL images]], return_tensors="pt")``; it expands
            its image token into the model's image tokens and returns ``pixel_values``).
        max_length: most tokens of one sequence (prompt + completion).
    """

    def __init__(self, tokenizer, processor=None, *, max_length: int = 2048):
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        self.tokenizer, self.processor, self.max_length = tokenizer, processor, max_length
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        if self.pad_id is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token")
        self.image_token = getattr(processor, "image_token", None) or IMAGE_PLACEHOLDER
        ids = getattr(processor, "image_token_ids", None) or [
            getattr(processor, "image_token_id", None)]
        self.image_ids = frozenset(i for i in ids if i is not None)

    def __call__(self, ex: Example, index: int = -1) -> TokenizedPair:
        images = list(ex.images)
        if images and self.processor is None:
            raise DataError(ex.source, "the pair has images but the model has no processor "
                            "(a text-only model?)")
        messages = self._messages(ex, len(images))
        try:
            prompt_text = pair_tokens.render(self.tokenizer, messages)
            prompt, pixels, extras = self._encode_prompt(prompt_text, images, ex.source)
            chosen, rejected = (pair_tokens.completion_ids(self.tokenizer, messages, prompt_text,
                                                           answer)
                                for answer in (ex.chosen, ex.rejected))
            prompt, chosen, rejected = pair_tokens.truncate(prompt, chosen, rejected,
                                                            self.max_length, self.image_ids)
        except DataError:
            raise
        except ValueError as err:  # what is wrong with the pair; here, where it came from
            raise DataError(ex.source, str(err)) from err
        if chosen == rejected:  # e.g. both cut to the same first tokens, or both unknown words
            raise DataError(ex.source, "'chosen' and 'rejected' are the same tokens once "
                            f"tokenized and truncated to max_length={self.max_length} (the "
                            "pair teaches nothing)")
        return TokenizedPair(prompt, chosen, rejected, pixels, extras, index, ex.source)

    # ------------------------------------------------------------------ text

    def _messages(self, ex: Example, n_images: int) -> list[dict]:
        messages = pair_tokens.messages_of(ex.prompt)
        if n_images:
            users = [m for m in messages if m["role"] == "user"] or messages
            text = "".join(m["content"] for m in messages)
            if IMAGE_PLACEHOLDER not in text:  # none given: the images go first
                users[0]["content"] = (IMAGE_PLACEHOLDER + "\n") * n_images + users[0]["content"]
            for m in messages:
                m["content"] = m["content"].replace(IMAGE_PLACEHOLDER, self.image_token)
        return messages

    def _encode_prompt(self, text: str, images: list, source: str):
        if not images:
            return pair_tokens.prompt_ids(self.tokenizer, text), None, {}
        special = not pair_tokens.templated(self.tokenizer)  # a template writes its own BOS
        pictures = [_open(p, source) for p in images]
        try:
            out = self.processor(text=[text], images=[pictures], return_tensors="pt",
                                 add_special_tokens=special)
        except Exception as exc:  # the processor's own checks (image count, size, mode)
            raise DataError(source, f"the processor rejects the pair ({exc})") from exc
        ids = out["input_ids"][0].tolist()
        extras = {k: v for k, v in out.items() if k not in _TEXT_KEYS and k != "pixel_values"
                  and isinstance(v, torch.Tensor)}
        return ids, out["pixel_values"], extras


def _open(image, source: str):
    """An image file as RGB; whatever PIL raises on a bad file, and a decompression bomb (PIL's
    warning included, or more than MAX_IMAGE_PIXELS), is a `DataError`."""
    if not isinstance(image, str):
        return image  # already an image
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(image) as im:  # reads the header only
                if im.width * im.height > MAX_IMAGE_PIXELS:
                    raise DataError(source, f"image {image} is {im.width} x {im.height}, more "
                                    f"than MAX_IMAGE_PIXELS={MAX_IMAGE_PIXELS} (a "
                                    "decompression bomb?)")
                return im.convert("RGB")
    except DataError:
        raise
    except Exception as exc:  # OSError, SyntaxError, DecompressionBombError/Warning, ...
        raise DataError(source, f"cannot read image {image} ({type(exc).__name__}: {exc})"
                        ) from exc


# --------------------------------------------------------------------------- batches


@dataclass
class Batch:
    """A micro-batch of B whole pairs as the model and `mpo_fast.MPOLoss` take it.

    Packed (``segments`` set): input_ids, position_ids, targets ``[N]``; attention_mask None.
    Padded (``segments`` None): input_ids, position_ids, targets, attention_mask ``[2B, T]``.
    Sequences: the B chosen in pair order, then the B rejected. ``pixel_values``: the pairs'
    images once, in pair order (``image_kwargs`` the processor's per-image extras). Counts
    (host ints): pairs, real tokens, tokens of the same pairs padded to [2B, T], and scored
    chosen tokens (the SFT term's denominator); ``index``: the pairs' dataset indices.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    targets: torch.Tensor
    segments: Segments | None
    attention_mask: torch.Tensor | None
    pixel_values: torch.Tensor | None
    image_kwargs: dict
    num_pairs: int
    num_tokens: int
    padded_tokens: int
    chosen_tokens: int
    index: list[int]

    @property
    def packed(self) -> bool:
        return self.segments is not None

    @property
    def padding_fraction(self) -> float:
        """Fraction of the tokens the model processes that are padding (0 when packed)."""
        return 0.0 if self.packed else 1.0 - self.num_tokens / max(self.padded_tokens, 1)

    def to(self, device: torch.device | str) -> Batch:
        """The same batch on ``device`` (no host read: the segments stay trusted)."""
        move = lambda t: None if t is None else t.to(device, non_blocking=True)
        segs = self.segments
        if segs is not None:
            segs = Segments(move(segs.cu_seqlens), segs.num_tokens, segs.max_seqlen)
        return Batch(move(self.input_ids), move(self.position_ids), move(self.targets), segs,
                     move(self.attention_mask), move(self.pixel_values),
                     {k: move(v) for k, v in self.image_kwargs.items()}, self.num_pairs,
                     self.num_tokens, self.padded_tokens, self.chosen_tokens, self.index)


def collate(pairs: list[TokenizedPair], *, pad_id: int, packed: bool = True,
            ignore_index: int = -100) -> Batch:
    """Lay out whole pairs as one `Batch` (see the module docstring); on the CPU."""
    if not pairs:
        raise ValueError("collate needs at least one pair")
    seqs = [p.prompt + p.chosen for p in pairs] + [p.prompt + p.rejected for p in pairs]
    prompt_lens = [len(p.prompt) for p in pairs] * 2
    lengths = torch.tensor([len(s) for s in seqs])
    S, T = len(seqs), int(lengths.max())
    ids = torch.full((S, T), pad_id, dtype=torch.long)
    completion = torch.zeros(S, T, dtype=torch.bool)
    for s, (seq, n) in enumerate(zip(seqs, prompt_lens, strict=True)):
        ids[s, :len(seq)] = torch.tensor(seq)
        completion[s, n:len(seq)] = True
    B, N = len(pairs), int(lengths.sum())
    if packed:
        p = pack(ids, lengths)
        targets = p.shift_targets(completion, ignore_index)
        input_ids, positions, segs, mask = p.tokens, p.position_ids, p.segments, None
        chosen_end = int(p.cu_seqlens[B])
    else:
        flat = Segments.padded(S, T)
        targets = shift_targets(ids.reshape(-1), flat.cu_seqlens, completion.reshape(-1),
                                ignore_index).view(S, T)
        input_ids, segs, chosen_end = ids, None, B * T
        positions = torch.arange(T).expand(S, T).contiguous()
        mask = torch.arange(T)[None, :] < lengths[:, None]  # from the lengths, never the ids
    chosen_tokens = int((targets.reshape(-1)[:chosen_end] != ignore_index).sum())
    pixels = [p.pixel_values for p in pairs if p.pixel_values is not None]
    extras = {k: torch.cat([p.image_kwargs[k] for p in pairs if k in p.image_kwargs])
              for k in pairs[0].image_kwargs}
    return Batch(input_ids, positions, targets, segs, mask, torch.cat(pixels) if pixels else None,
                 extras, B, N, S * T, chosen_tokens, [p.index for p in pairs])


# --------------------------------------------------------------------------- which pairs


def step_pairs(step: int, num_pairs: int, pairs_per_step: int, seed: int, rank: int = 0,
               world: int = 1) -> list[int]:
    """Dataset indices of the pairs optimizer step ``step`` trains on, this rank's share.

    Every epoch is a seeded permutation of the pairs cut into whole steps (the remainder is
    dropped); the global step's pairs are dealt round-robin to the ``world`` ranks. A pure
    function of its arguments: the data position of a checkpoint is its step.
    """
    per_epoch = num_pairs // pairs_per_step
    if per_epoch < 1:
        raise ValueError(f"{num_pairs} pairs are fewer than pairs_per_step={pairs_per_step}")
    if pairs_per_step % world:
        raise ValueError(f"pairs_per_step={pairs_per_step} must be a multiple of the number "
                         f"of processes ({world})")
    epoch, k = divmod(step, per_epoch)
    chunk = _epoch_order(num_pairs, seed, epoch)[k * pairs_per_step:(k + 1) * pairs_per_step]
    return chunk[rank::world]


@functools.lru_cache(maxsize=2)
def _epoch_order(num_pairs: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_pairs, generator=g).tolist()


def micro_batches(pairs: list[TokenizedPair], max_tokens: int,
                  count: int | None = None) -> list[list[int]]:
    """Positions in ``pairs`` grouped into micro-batches of whole pairs under ``max_tokens``
    (`mpo_fast.packing.plan`, best-fit decreasing), then split (largest group first) until
    there are ``count`` of them: every rank must run the same number per step."""
    sizes = [p.num_tokens for p in pairs]
    too_big = [i for i, n in enumerate(sizes) if n > max_tokens]
    if too_big:
        p = pairs[too_big[0]]
        raise ValueError(f"{p.source}: the pair has {p.num_tokens} tokens (prompt twice + "
                         f"chosen + rejected), more than max_tokens={max_tokens}: raise "
                         "max_tokens or lower max_length")
    groups = plan(sizes, max_tokens) if pairs else []
    if count is not None:
        if count > len(pairs):
            raise ValueError(f"cannot make {count} micro-batches of {len(pairs)} pairs")
        while len(groups) < count:
            big = max(range(len(groups)), key=lambda g: len(groups[g]))
            group = groups.pop(big)
            half = len(group) // 2
            groups[big:big] = [group[:half], group[half:]]
    return groups
