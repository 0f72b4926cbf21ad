"""A synthetic visual task whose chain of thought determines the answer and can be checked step
by step: score the coloured shapes in a small image.

    image     32 x 32, white, a 4 x 4 grid of 8 x 8 cells; 1..max_total cells hold a square or
              disc of random size and offset, in one of n_colors colours (red, blue, green)
    question  "Red shapes score 1 point, blue 2, green 3. What is the total score of the shapes
              in the image?"
    answer    the score, sum of count x points, e.g. "11" for 2 red, 3 blue, 1 green
    CoT       "red: 2, blue: 3, green: 1. 2 x 1 = 2. 3 x 2 = 6. 1 x 3 = 3. 2 + 6 = 8.
              8 + 3 = 11.\\nFinal Answer: 11"
              step 1: the count of every colour, in a fixed order, zeros included
              step 2: each count times its colour's points
              step 3: a running sum of those products, one addition at a time
              step 4: the final answer, the last sum

Why a score and not the number of shapes: a model can count the shapes without seeing their
colours, and then writes per-colour counts that merely add up to the total it already knows (a
tiny model trained on "red: 2, blue: 3. 2 + 3 = 5" does exactly that: right totals, made-up
counts). The score depends on the colours, so the answer cannot be had without them; and the
answer is a function of the steps: a response whose counts are right, whose products and
additions are right (each on the numbers the step before wrote) and whose final answer is the
last sum cannot be wrong. `check_steps` reads a response with this grammar and says which steps
hold, so a right answer reached by right steps is told apart from a lucky one (wrong counts or
false arithmetic that happen to end on the right number).

One cell is one image token of the tiny InternVL (`mpo_fast.pairs.tiny`), so the vision side is
easy and the counting and adding happen in the language model.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["COLORS", "DIRECT_SUFFIX", "POINTS", "QUESTION", "Example", "StepCheck",
           "check_steps", "cot_text", "make_example", "score", "task_corpus", "write_split"]

COLORS = {"red": (220, 40, 40), "blue": (40, 90, 230), "green": (30, 160, 60)}
POINTS = {"red": 1, "blue": 2, "green": 3}
GRID, CELL = 4, 8
QUESTION = ("Red shapes score 1 point, blue 2, green 3. What is the total score of the shapes "
            "in the image?")
DIRECT_SUFFIX = "Answer the question using a single word or phrase."


@dataclass
class Example:
    image: object  # PIL.Image
    counts: dict[str, int]  # colour -> number of shapes

    @property
    def total(self) -> int:
        """The number of shapes."""
        return sum(self.counts.values())

    @property
    def score(self) -> int:
        """The answer: `score` of the counts."""
        return score(self.counts)


def score(counts: dict[str, int]) -> int:
    """Sum over colours of count x the colour's `POINTS`."""
    return sum(n * POINTS[c] for c, n in counts.items())


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
    """The reference chain of thought: every colour's count, each times its points, a running
    sum one addition at a time, the final answer (see the module docstring)."""
    parts = ", ".join(f"{c}: {n}" for c, n in counts.items())
    values = [n * POINTS[c] for c, n in counts.items()]
    steps = [f" {n} x {POINTS[c]} = {n * POINTS[c]}." for c, n in counts.items()]
    acc = values[0]
    for v in values[1:]:
        steps.append(f" {acc} + {v} = {acc + v}.")
        acc += v
    return f"{parts}.{''.join(steps)}\nFinal Answer: {acc}"


# ---------------------------------------------------------------- the step checker

_COT = re.compile(r"\s*(?P<counts>[a-z]+: \d+(?:, [a-z]+: \d+)*)\."
                  r"(?P<products>(?: \d+ x \d+ = \d+\.)*)"
                  r"(?P<sums>(?: \d+ \+ \d+ = \d+\.)*)\s*\n\s*Final Answer: (?P<answer>\d+)\s*")
_COUNT = re.compile(r"([a-z]+): (\d+)")
_PRODUCT = re.compile(r"(\d+) x (\d+) = (\d+)")
_SUM = re.compile(r"(\d+) \+ (\d+) = (\d+)")


@dataclass(frozen=True)
class StepCheck:
    """What `check_steps` found in one response."""

    parsed: bool  # the response follows the CoT grammar
    counts_ok: bool  # every colour listed, in order, with its true count
    arithmetic_ok: bool  # one product per listed colour (its listed count x its points), each
    #                      addition adds the next product to the previous sum, every step is
    #                      true, and the final answer is the last sum
    answer_ok: bool  # the final answer is the true total

    @property
    def steps_ok(self) -> bool:
        """A right answer reached by right steps."""
        return self.parsed and self.counts_ok and self.arithmetic_ok and self.answer_ok

    @property
    def lucky(self) -> bool:
        """A right answer with a wrong step (or no readable steps)."""
        return self.answer_ok and not self.steps_ok


def check_steps(response: str, counts: dict[str, int]) -> StepCheck:
    """Check a CoT response against the image's true per-colour `counts` (in palette order).

    ``answer_ok`` is whether the final answer equals the true total (read as the grader reads
    it, `answers.extract_answer`, so it agrees with the accuracy); the steps are checked only
    when the response follows the grammar of `cot_text` exactly."""
    from .answers import extract_answer, match_answer

    answer = extract_answer(response)
    answer_ok = answer is not None and match_answer(answer, str(score(counts)))
    m = _COT.fullmatch(response)
    if m is None:
        return StepCheck(False, False, False, answer_ok)
    listed = [(c, int(n)) for c, n in _COUNT.findall(m["counts"])]
    counts_ok = listed == [(c, int(n)) for c, n in counts.items()]
    products = [tuple(int(x) for x in s) for s in _PRODUCT.findall(m["products"])]
    sums = [tuple(int(x) for x in s) for s in _SUM.findall(m["sums"])]
    ok = len(products) == len(listed) and len(sums) == len(listed) - 1 and all(
        c in POINTS for c, _ in listed)
    values = []
    for (c, n), (a, w, p) in zip(listed, products, strict=False):
        ok &= a == n and w == POINTS.get(c) and p == a * w
        values.append(p)
    acc = values[0] if values else None
    for (a, b, s), v in zip(sums, values[1:], strict=False):
        ok &= a == acc and b == v and s == a + b
        acc = s
    ok &= int(m["answer"]) == acc
    return StepCheck(True, counts_ok, bool(ok), answer_ok)


# ---------------------------------------------------------------- splits and the tokenizer corpus

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
                      "answer": str(ex.score), "counts": ex.counts})
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
