"""Preference data formats -> `Example`s, with bad lines reported by file and line.

Two formats (DESIGN.md §5):

    MMPR           meta.json: {name: {"root": image dir, "annotation": .jsonl, "repeat_time": r}}
                   (relative paths are taken from meta.json's folder); each annotation line is
                   {"image": path | [paths] | absent, "question", "chosen", "rejected"}, image
                   paths relative to "root". repeat_time r as InternVL reads it: r < 1 keeps a
                   seeded random int(n * r) of the lines, r > 1 repeats them int(r) times.
    HF preference  a .jsonl (or a .json list) of {"prompt", "chosen", "rejected", "images"}:
                   prompt a string or chat messages ([{"role", "content"}], content a string
                   or parts [{"type": "text", "text"} | {"type": "image"}]); chosen/rejected a
                   string or assistant messages; images a list of paths relative to the file.

Images are referenced in the text by the placeholder "<image>" (MMPR's own); a prompt without
any gets one per image in front (`mpo_fast.data.collate` turns them into the model's image
tokens). Bad data — a malformed line, a missing field, an empty chosen or rejected, a missing
image file, placeholders that do not match the images — is a `DataError` naming the file and
line: ``on_error="skip"`` counts it in the `LoadReport` and goes on, ``"raise"`` stops there.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field

__all__ = ["IMAGE_PLACEHOLDER", "DataError", "Example", "LoadReport", "load_dataset",
           "load_mmpr", "load_preference"]

IMAGE_PLACEHOLDER = "<image>"
ON_ERROR = ("skip", "raise")


@dataclass(frozen=True)
class Example:
    """One preference pair as text.

    prompt: the user's turn (a string with "<image>" placeholders) or chat messages
        [{"role", "content": str}] (placeholders in the contents).
    chosen, rejected: the two assistant answers (non-empty strings).
    images: absolute image paths (or PIL images), in placeholder order.
    source: "file:line", for messages about this pair.
    """

    prompt: str | tuple
    chosen: str
    rejected: str
    images: tuple = ()
    source: str = "<memory>"


class DataError(ValueError):
    """A bad preference pair, named by its source ("file:line")."""

    def __init__(self, source: str, reason: str):
        super().__init__(f"{source}: {reason}")
        self.source, self.reason = source, reason


@dataclass
class LoadReport:
    """What loading kept and what it skipped (with the reasons)."""

    loaded: int = 0
    skipped: list[DataError] = field(default_factory=list)

    def summary(self) -> str:
        text = f"{self.loaded} pairs loaded"
        if self.skipped:
            text += f", {len(self.skipped)} bad lines skipped (first: {self.skipped[0]})"
        return text

    def merge(self, other: LoadReport) -> None:
        self.loaded += other.loaded
        self.skipped.extend(other.skipped)


def load_dataset(path: str, *, on_error: str = "skip", seed: int = 0,
                 check_images: bool = True) -> tuple[list[Example], LoadReport]:
    """Load MMPR (a meta.json of annotation files) or the HF preference format (.jsonl/.json),
    chosen by the file: a JSON object whose values have "annotation" is an MMPR meta file."""
    _check_on_error(on_error)
    if path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            try:
                head = json.load(f)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{exc.lineno}", f"malformed JSON ({exc.msg})") from exc
        if isinstance(head, dict) and all(isinstance(v, dict) and "annotation" in v
                                          for v in head.values()):
            return load_mmpr(path, on_error=on_error, seed=seed, check_images=check_images)
    return load_preference(path, on_error=on_error, check_images=check_images)


def load_mmpr(meta_path: str, *, on_error: str = "skip", seed: int = 0,
              check_images: bool = True) -> tuple[list[Example], LoadReport]:
    """MMPR: every dataset of ``meta_path``, repeated or sampled by its repeat_time."""
    _check_on_error(on_error)
    base = os.path.dirname(os.path.abspath(meta_path))
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    if not isinstance(meta, dict):
        raise DataError(meta_path, "meta file must be a JSON object {name: {root, annotation, "
                        "repeat_time}}")
    examples: list[Example] = []
    report = LoadReport()
    rng = random.Random(seed)
    for name, entry in meta.items():
        where = f"{meta_path}[{name!r}]"
        if not isinstance(entry, dict) or "annotation" not in entry:
            _bad(DataError(where, "needs 'annotation' (and 'root', 'repeat_time')"), on_error,
                 report)
            continue
        annotation = os.path.join(base, entry["annotation"])
        root = os.path.join(base, entry.get("root", ""))
        repeat = float(entry.get("repeat_time", 1))
        if not repeat > 0:
            _bad(DataError(where, f"repeat_time must be > 0, got {repeat}"), on_error, report)
            continue
        rows, part = _read_lines(annotation, lambda obj, src, root=root: _mmpr_row(
            obj, src, root, check_images), on_error)
        report.skipped.extend(part.skipped)
        if repeat < 1:
            rows = rng.sample(rows, k=int(len(rows) * repeat))
        elif repeat > 1:
            rows = rows * int(repeat)
        examples.extend(rows)
    report.loaded = len(examples)
    return examples, report


def load_preference(path: str, *, on_error: str = "skip",
                    check_images: bool = True) -> tuple[list[Example], LoadReport]:
    """The HF preference format: a .jsonl file, or a .json file holding a list of rows."""
    _check_on_error(on_error)
    root = os.path.dirname(os.path.abspath(path))
    parse = lambda obj, src: _hf_row(obj, src, root, check_images)
    if path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, list):
            raise DataError(path, "a .json preference file must hold a list of rows")
        rows, report = [], LoadReport()
        for i, obj in enumerate(data):
            _parse_into(rows, report, parse, obj, f"{path}[{i}]", on_error)
    else:
        rows, report = _read_lines(path, parse, on_error)
    report.loaded = len(rows)
    return rows, report


# --------------------------------------------------------------------------- rows


def _read_lines(path: str, parse, on_error: str) -> tuple[list[Example], LoadReport]:
    rows, report = [], LoadReport()
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            src = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                _bad(DataError(src, f"malformed JSON ({exc.msg})"), on_error, report)
                continue
            _parse_into(rows, report, parse, obj, src, on_error)
    return rows, report


def _parse_into(rows, report, parse, obj, src, on_error) -> None:
    try:
        if not isinstance(obj, dict):
            raise DataError(src, f"expected a JSON object, got {type(obj).__name__}")
        rows.append(parse(obj, src))
    except DataError as err:
        _bad(err, on_error, report)


def _mmpr_row(obj: dict, src: str, root: str, check_images: bool) -> Example:
    image = obj.get("image")
    paths = [] if image is None else [image] if isinstance(image, str) else image
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise DataError(src, "'image' must be a path, a list of paths, or absent")
    question = _text(obj, "question", src)
    return _example(question, obj, src, [os.path.join(root, p) for p in paths], check_images)


def _hf_row(obj: dict, src: str, root: str, check_images: bool) -> Example:
    if "prompt" not in obj:
        raise DataError(src, "missing 'prompt'")
    prompt = obj["prompt"]
    if isinstance(prompt, list):
        prompt = tuple(_message(m, src) for m in prompt)
        if not prompt or not any(m["content"].strip() for m in prompt):
            raise DataError(src, "empty 'prompt'")
    else:
        prompt = _text(obj, "prompt", src)
    images = obj.get("images") or []
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise DataError(src, "'images' must be a list of paths (or absent)")
    return _example(prompt, obj, src, [os.path.join(root, p) for p in images], check_images)


def _example(prompt, obj: dict, src: str, images: list[str], check_images: bool) -> Example:
    chosen, rejected = _answer(obj, "chosen", src), _answer(obj, "rejected", src)
    if chosen == rejected:
        raise DataError(src, "'chosen' and 'rejected' are identical (the pair teaches nothing)")
    text = prompt if isinstance(prompt, str) else "".join(m["content"] for m in prompt)
    n = text.count(IMAGE_PLACEHOLDER)
    if n and n != len(images):
        raise DataError(src, f"the prompt has {n} {IMAGE_PLACEHOLDER} placeholders but "
                        f"{len(images)} images")
    if check_images:
        for p in images:
            if not os.path.isfile(p):
                raise DataError(src, f"missing image {p}")
    return Example(prompt, chosen, rejected, tuple(images), src)


def _text(obj: dict, key: str, src: str) -> str:
    if key not in obj:
        raise DataError(src, f"missing {key!r}")
    value = obj[key]
    if not isinstance(value, str):
        raise DataError(src, f"{key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(src, f"empty {key!r}")
    return value


def _answer(obj: dict, key: str, src: str) -> str:
    value = obj.get(key)
    if isinstance(value, list):  # conversational: the assistant turn(s)
        turns = [_message(m, src) for m in value]
        value = "".join(m["content"] for m in turns if m["role"] == "assistant")
        return _text({key: value}, key, src)
    return _text(obj, key, src)


def _message(m, src: str) -> dict:
    if not isinstance(m, dict) or "role" not in m or "content" not in m:
        raise DataError(src, "chat messages must be objects with 'role' and 'content'")
    content = m["content"]
    if isinstance(content, list):  # parts: text and image placeholders, in order
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                parts.append(str(part.get("text", "")))
            elif kind == "image":
                parts.append(IMAGE_PLACEHOLDER)
            else:
                raise DataError(src, f"unknown message part {part!r}")
        content = "".join(parts)
    if not isinstance(content, str):
        raise DataError(src, "message 'content' must be a string or a list of parts")
    return {"role": str(m["role"]), "content": content}


def _bad(err: DataError, on_error: str, report: LoadReport) -> None:
    if on_error == "raise":
        raise err
    report.skipped.append(err)


def _check_on_error(on_error: str) -> None:
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
