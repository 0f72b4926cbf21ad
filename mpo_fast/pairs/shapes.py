"""A synthetic visual task with a checkable answer: count the shapes in a small image.

    image     32 x 32, white, a 4 x 4 grid of 8 x 8 cells; 1..max_total cells hold a square or
              disc of random size and offset, in one of n_colors colours (red, blue, green)
    question  "How many shapes are in the image?"
    answer    the number of shapes, e.g. "5"
    CoT       "red: 2, blue: 3. 2 + 3 = 5.\\nFinal Answer: 5" (count per colour, then add)

One cell is one image token of the tiny InternVL (`mpo_fast.pairs.tiny`), so the vision side is
easy and the counting and adding happen in the language model. The chain of thought splits the
count into two smaller counts and a sum: the step-by-step route the miniature's CoT takes.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

__all__ = ["COLORS", "DIRECT_SUFFIX", "QUESTION", "Example", "cot_text", "make_example",
           "task_corpus", "write_split"]

COLORS = {"red": (220, 40, 40), "blue": (40, 90, 230), "green": (30, 160, 60)}
GRID, CELL = 4, 8
QUESTION = "How many shapes are in the image?"
DIRECT_SUFFIX = "Answer the question using a single word or phrase."


@dataclass
class Example:
    image: object  # PIL.Image
    counts: dict[str, int]  # colour -> number of shapes

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def make_example(rng: random.Random, max_total: int = 6, n_colors: int = 2) -> Example:
    """1..max_total shapes, each of one of the first `n_colors` colours."""
    from PIL import Image, ImageDraw

    if not 1 <= max_total <= GRID * GRID or not 1 <= n_colors <= len(COLORS):
        raise ValueError(f"max_total must be in [1, {GRID * GRID}] and n_colors in "
                         f"[1, {len(COLORS)}], got {max_total} and {n_colors}")
    palette = list(COLORS)[:n_colors]
    total = rng.randint(1, max_total)
    im = Image.new("RGB", (GRID * CELL, GRID * CELL), (250, 250, 250))
    draw = ImageDraw.Draw(im)
    counts = dict.fromkeys(palette, 0)
    for cell in rng.sample(range(GRID * GRID), total):
        color = rng.choice(palette)
        counts[color] += 1
        size = rng.randint(4, 7)
        x = (cell % GRID) * CELL + rng.randint(0, CELL - size)
        y = (cell // GRID) * CELL + rng.randint(0, CELL - size)
        box = [x, y, x + size - 1, y + size - 1]
        if rng.random() < 0.5:
            draw.rectangle(box, fill=COLORS[color])
        else:
            draw.ellipse(box, fill=COLORS[color])
    return Example(im, counts)


def cot_text(counts: dict[str, int]) -> str:
    """The reference chain of thought: per-colour counts, their sum, the final answer."""
    parts = ", ".join(f"{c}: {n}" for c, n in counts.items())
    nums = " + ".join(str(n) for n in counts.values())
    total = sum(counts.values())
    return f"{parts}. {nums} = {total}.\nFinal Answer: {total}"


def write_split(folder: str | Path, name: str, n: int, rng: random.Random,
                max_total: int = 6, n_colors: int = 2) -> list[dict]:
    """n examples as PNGs under folder/name/ and items {"id", "image", "question", "answer",
    "counts"} (image paths relative to `folder`), also written to folder/name.jsonl."""
    folder = Path(folder)
    (folder / name).mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(n):
        ex = make_example(rng, max_total, n_colors)
        rel = f"{name}/{i:05d}.png"
        ex.image.save(folder / rel)
        items.append({"id": f"{name}-{i:05d}", "image": rel, "question": QUESTION,
                      "answer": str(ex.total), "counts": ex.counts})
    with open(folder / f"{name}.jsonl", "w") as f:
        for it in items:
            f.write(json.dumps(it) + "\n")
    return items


def task_corpus(instructions: list[str], max_total: int = 6, n_colors: int = 2) -> list[str]:
    """Texts the tiny tokenizer is trained on: the prompts and every reference answer."""
    import itertools

    texts = [*instructions, QUESTION, DIRECT_SUFFIX]
    palette = list(COLORS)[:n_colors]
    for combo in itertools.product(range(max_total + 1), repeat=n_colors):
        if sum(combo) <= max_total:
            texts.append(cot_text(dict(zip(palette, combo, strict=True))))
    return texts * 4
