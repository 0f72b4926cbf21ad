"""DropoutNTP pairs (the MMPR pipeline for instructions without a ground truth).

    chosen   = the model's own response to (image, question)   (given, or sampled here)
    prefix   = chosen up to the end of its first floor(ratio * words) words (ratio 0.5): an
               exact prefix of chosen, its own whitespace kept
    rejected = prefix + the model's continuation of the prefilled assistant turn with the image
               DROPPED: no image placeholder or image tokens in the prompt, no pixel values

Without the image the model can only guess the rest, so the continuation hallucinates where
the chosen one looked: the rejected response can differ from the chosen only after the prefix.
The continuation keeps the whitespace the model produced (see
`mpo_fast.pairs.generate.continuation_text`); an empty continuation leaves the prefix alone as
the rejected response. Skipped items (counted, no pair): an empty or whitespace-only chosen
response ("empty"), one with fewer than 1/ratio words ("too_short": the prefix would be no word),
and a rejected response equal to the chosen one up to leading and trailing whitespace
("identical"). So neither side of a pair is ever empty: the rejected one starts with at least
one word of the chosen.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from .generate import Generator, Prompt
from .io import PairWriter, image_list, load_images, question_with_images

__all__ = ["DropoutNTPConfig", "run_dropout_ntp", "truncate_words"]

_WORD = re.compile(r"\S+")


@dataclass(frozen=True)
class DropoutNTPConfig:
    ratio: float = 0.5  # fraction of the chosen response's words kept as the prefix

    def __post_init__(self):
        if not 0.0 < self.ratio < 1.0:
            raise ValueError(f"ratio must be in (0, 1), got {self.ratio}")


def truncate_words(text: str, ratio: float = 0.5) -> str | None:
    """`text` cut after its first floor(ratio * n_words) words (whitespace-separated), or None
    when that is no word at all."""
    words = list(_WORD.finditer(text))
    keep = int(len(words) * ratio)
    if keep == 0:
        return None
    return text[:words[keep - 1].end()]


STREAMS = {"pairs": ".jsonl"}


def run_dropout_ntp(items: Sequence[dict], generator: Generator, out_dir, name: str, *,
                    config: DropoutNTPConfig = DropoutNTPConfig(), image_root=None,
                    repeat_time: float = 1, log=print) -> dict:
    """Make one DropoutNTP pair per item not done yet; returns the run's summary.

    Items: {"id", "question", "image"?: path | [paths], "chosen"?: the model's response}. Items
    without "chosen" get one sampled here, with the image, under the generator's sampling
    config. Writes `name`.jsonl and meta.json in `out_dir`; resumable.
    """
    with PairWriter(out_dir, name, STREAMS) as writer:
        todo = [it for it in items if it["id"] not in writer.done]
        if len(todo) < len(items):
            log(f"[pairs] resuming: {len(items) - len(todo)} of {len(items)} items done")
        bar = _bar(len(todo), f"dropout-ntp {name}", generator.progress)
        for start in range(0, len(todo), generator.batch_size):
            chunk = todo[start:start + generator.batch_size]
            chosen = _chosen(chunk, generator, image_root)
            prefixes = [truncate_words(c, config.ratio) for c in chosen]
            asks = [(i, Prompt(it["question"], (), p))  # the image dropped
                    for i, (it, p) in enumerate(zip(chunk, prefixes, strict=True)) if p]
            conts = dict(zip([i for i, _ in asks],
                             generator([p for _, p in asks], desc="continuing without image"),
                             strict=True)) if asks else {}
            for i, it in enumerate(chunk):
                _commit_item(writer, it, chosen[i], prefixes[i], conts.get(i), config)
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
        writer.write_meta({"pairs": name}, image_root, repeat_time)
        summary = {k: int(v) for k, v in writer.totals().items()}
    log(f"[pairs] {name}: {summary.get('items', 0)} items, {summary.get('pairs', 0)} pairs "
        f"({summary.get('empty', 0)} empty, {summary.get('too_short', 0)} too short, "
        f"{summary.get('identical', 0)} continued "
        f"identically; {summary.get('sampled_chosen', 0)} chosen responses sampled)")
    return summary


def _chosen(chunk: Sequence[dict], generator: Generator, image_root) -> list[str]:
    """The chosen responses: given, or sampled with the image."""
    out = [it.get("chosen") for it in chunk]
    missing = [i for i, c in enumerate(out) if c is None]
    if missing:
        prompts = [Prompt(chunk[i]["question"], load_images(chunk[i].get("image"), image_root))
                   for i in missing]
        for i, text in zip(missing, generator(prompts, desc="sampling chosen"), strict=True):
            out[i] = text
    return [str(c) for c in out]


def _commit_item(writer: PairWriter, item: dict, chosen: str, prefix: str | None,
                 continuation: str | None, config: DropoutNTPConfig) -> None:
    empty = not chosen.strip()
    stats = {"pairs": 0, "empty": int(empty), "too_short": int(prefix is None and not empty),
             "identical": 0, "sampled_chosen": int(item.get("chosen") is None)}
    records = []
    if prefix is not None and not empty:
        rejected = prefix + (continuation or "")
        if rejected.strip() == chosen.strip():
            stats["identical"] = 1
        else:
            stats["pairs"] = 1
            n_images = len(image_list(item.get("image")))
            records.append({
                "id": item["id"], **({"image": item["image"]} if item.get("image") else {}),
                "question": question_with_images(item["question"], n_images),
                "chosen": chosen, "rejected": rejected,
                "meta": {"source_id": item["id"], "pipeline": "dropout_ntp",
                         "ratio": config.ratio, "prefix_chars": len(prefix)}})
    writer.commit(item["id"], {"pairs": records}, stats)


def _bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="item")
