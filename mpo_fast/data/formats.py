"""Preference data formats -> `Example`s, with bad lines reported by file and line.

Two formats, and the second as a `datasets` dataset (DESIGN.md §5):

    MMPR           meta.json: {name: {"root": image dir, "annotation": .jsonl, "repeat_time": r}}
                   (relative paths are taken from meta.json's folder); each annotation line is
                   {"image": path | [paths] | absent, "question", "chosen", "rejected"}, image
                   paths relative to "root". repeat_time r as InternVL reads it: r < 1 keeps a
                   seeded random int(n * r) of the lines, r > 1 repeats them int(r) times.
    HF preference  a .jsonl (or a .json list) of {"prompt", "chosen", "rejected", "images"}:
                   prompt a string or chat messages ([{"role", "content"}], content a string
                   or parts [{"type": "text", "text"} | {"type": "image"}]); chosen/rejected a
                   string or assistant messages; images a list of paths relative to the file.
    datasets       the HF preference format as a `datasets` dataset: a folder written by
                   ``save_to_disk``, or a dataset name (``split``, ``config``); images may be
                   PIL images (`load_hf_dataset`).

Images are referenced in the text by the placeholder "<image>" (MMPR's own); a prompt without
any gets one per image in front (`mpo_fast.data.collate` turns them into the model's image
tokens). Bad data — a malformed line, a missing field, an empty chosen or rejected, a missing
image file, an image path that leaves the dataset root, placeholders that do not match the
images, a line that is not UTF-8 or nests JSON too deeply — is a `DataError` naming the file
and line: ``on_error="skip"`` counts it in the `LoadReport` and goes on, ``"raise"`` stops there.
A UTF-8 byte-order mark at the start of a file is ignored. A bad MMPR meta.json entry is always
an error (it names the entry and the field): skipping it would silently drop a whole dataset.

Image paths must resolve (symlinks followed) inside the dataset root — MMPR's "root", the HF
file's folder — unless ``allow_outside_root=True``: data from someone else cannot make the
trainer read any file on the machine.
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass, field

__all__ = ["IMAGE_PLACEHOLDER", "DataError", "Example", "LoadReport", "load_dataset",
           "load_hf_dataset", "load_mmpr", "load_preference"]

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


def load_dataset(path: str, *, on_error: str = "skip", seed: int = 0, check_images: bool = True,
                 allow_outside_root: bool = False, split: str = "train",
                 config: str | None = None) -> tuple[list[Example], LoadReport]:
    """Load MMPR (a meta.json of annotation files) or the HF preference format (.jsonl/.json),
    chosen by the file: a .json holding a JSON object is an MMPR meta file (a preference .json
    holds a list). A folder written by `datasets`' ``save_to_disk``, or a name that is no
    file (a `datasets` dataset on the Hub, with ``config`` and ``split``), is read with the
    `datasets` library: rows in the HF preference format (`load_hf_dataset`)."""
    _check_on_error(on_error)
    if os.path.isdir(path) or not (os.path.exists(path) or path.endswith((".json", ".jsonl"))):
        return load_hf_dataset(path, split=split, config=config, on_error=on_error,
                               check_images=check_images, allow_outside_root=allow_outside_root)
    opts = dict(on_error=on_error, check_images=check_images,
                allow_outside_root=allow_outside_root)
    if path.endswith(".json") and isinstance(_read_json(path), dict):
        return load_mmpr(path, seed=seed, **opts)
    return load_preference(path, **opts)


def load_hf_dataset(name: str, *, split: str = "train", config: str | None = None,
                    on_error: str = "skip", check_images: bool = True,
                    allow_outside_root: bool = False) -> tuple[list[Example], LoadReport]:
    """A `datasets` dataset in the HF preference format (TRL's: "prompt", "chosen",
    "rejected", optional "images" as PIL images or paths): a folder written by
    ``save_to_disk`` (a Dataset, or a DatasetDict whose ``split`` is taken), or a dataset
    name ``datasets.load_dataset(name, config, split=split)`` reads (the Hub, its cache).
    Rows are checked as a .jsonl file's, named ``name[split][i]``."""
    _check_on_error(on_error)
    try:
        import datasets
    except ImportError as err:
        raise DataError(name, "not a file; reading it as a `datasets` dataset needs the "
                        "datasets package (pip install datasets)") from err
    if os.path.isdir(path := name):
        if not any(os.path.exists(os.path.join(path, f)) for f in (
                "dataset_info.json", "dataset_dict.json", "state.json")):
            raise DataError(path, "a folder, but not one written by datasets' save_to_disk "
                            "(no dataset_info.json / dataset_dict.json)")
        data = datasets.load_from_disk(path)
        if isinstance(data, datasets.DatasetDict):
            if split not in data:
                raise DataError(path, f"no split {split!r} (it has {sorted(data)}); choose one "
                                "with --data-split / --eval-split")
            data = data[split]
        root = os.path.abspath(path)
    else:
        try:
            data = datasets.load_dataset(name, config or None, split=split)
        except Exception as err:  # offline, no such dataset, no such split / config
            first = (str(err).strip().splitlines() or [""])[0][:300]
            raise DataError(name, "no such file or folder here, and datasets.load_dataset "
                            f"could not read it as a dataset name: {type(err).__name__}: "
                            f"{first}") from err
        root = os.getcwd()
    parse = lambda obj, src: _hf_row(obj, src, root, check_images, allow_outside_root)
    rows, report = [], LoadReport()
    for i, obj in enumerate(data):
        _parse_into(rows, report, parse, dict(obj), f"{name}[{split}][{i}]", on_error)
    report.loaded = len(rows)
    return rows, report


def load_mmpr(meta_path: str, *, on_error: str = "skip", seed: int = 0,
              check_images: bool = True, allow_outside_root: bool = False
              ) -> tuple[list[Example], LoadReport]:
    """MMPR: every dataset of ``meta_path``, repeated or sampled by its repeat_time. Every
    entry is checked before any is read; a bad one is an error whatever ``on_error``."""
    _check_on_error(on_error)
    meta = _read_json(meta_path)
    if not isinstance(meta, dict) or not meta:
        raise DataError(meta_path, "meta file must be a non-empty JSON object {name: {root, "
                        "annotation, repeat_time}}")
    entries = [_meta_entry(meta_path, name, entry) for name, entry in meta.items()]
    examples: list[Example] = []
    report = LoadReport()
    rng = random.Random(seed)
    for annotation, root, repeat in entries:
        parse = lambda obj, src, root=root: _mmpr_row(obj, src, root, check_images,
                                                       allow_outside_root)
        rows, part = _read_lines(annotation, parse, on_error)
        report.skipped.extend(part.skipped)
        if repeat < 1:
            rows = rng.sample(rows, k=int(len(rows) * repeat))
        elif repeat > 1:
            rows = rows * int(repeat)
        examples.extend(rows)
    report.loaded = len(examples)
    return examples, report


def load_preference(path: str, *, on_error: str = "skip", check_images: bool = True,
                    allow_outside_root: bool = False) -> tuple[list[Example], LoadReport]:
    """The HF preference format: a .jsonl file, or a .json file holding a list of rows."""
    _check_on_error(on_error)
    root = os.path.dirname(os.path.abspath(path))
    parse = lambda obj, src: _hf_row(obj, src, root, check_images, allow_outside_root)
    if path.endswith(".json"):
        data = _read_json(path)
        if not isinstance(data, list):
            raise DataError(path, "a .json preference file must hold a list of rows")
        rows, report = [], LoadReport()
        for i, obj in enumerate(data):
            _parse_into(rows, report, parse, obj, f"{path}[{i}]", on_error)
    else:
        rows, report = _read_lines(path, parse, on_error)
    report.loaded = len(rows)
    return rows, report


# --------------------------------------------------------------------------- files


def _read_json(path: str):
    """A whole .json file (a BOM allowed); undecodable bytes, malformed or too deeply nested
    JSON are a `DataError` with the line."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}", f"not UTF-8 ({exc.reason} at byte {exc.start})"
                        ) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}", f"malformed JSON ({exc.msg})") from None
    except RecursionError:
        raise DataError(path, "JSON nested too deeply") from None


def _meta_entry(meta_path: str, name: str, entry) -> tuple[str, str, float]:
    """(annotation path, image root, repeat_time) of one meta.json entry, relative paths taken
    from meta.json's folder; anything wrong is a `DataError` naming the entry and the field."""
    where = f"{meta_path}[{name!r}]"
    if not isinstance(entry, dict):
        raise DataError(where, "an entry must be an object {root, annotation, repeat_time}, "
                        f"got {type(entry).__name__}")
    for key in ("annotation", "root"):
        if not isinstance(entry.get(key, ""), str):
            raise DataError(where, f"{key!r} must be a path (a string), got {entry[key]!r}")
    if not entry.get("annotation"):
        raise DataError(where, "missing 'annotation' (the .jsonl file of pairs)")
    base = os.path.dirname(os.path.abspath(meta_path))
    annotation = os.path.join(base, entry["annotation"])
    if not os.path.isfile(annotation):
        raise DataError(where, f"'annotation' file {annotation} does not exist")
    repeat = entry.get("repeat_time", 1)
    try:  # a number, or a string of one, as float() reads it; never a bool
        value = math.nan if isinstance(repeat, bool) else float(repeat)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise DataError(where, f"'repeat_time' must be a number > 0, got {repeat!r}")
    return annotation, os.path.join(base, entry.get("root", "")), value


def _read_lines(path: str, parse, on_error: str) -> tuple[list[Example], LoadReport]:
    """Each non-blank line of a .jsonl file, decoded on its own: a line that is not UTF-8 is a
    bad line (with its number), not the end of the file; a BOM on line 1 is dropped."""
    rows, report = [], LoadReport()
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            src = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                _bad(DataError(src, f"not UTF-8 ({exc.reason} at byte {exc.start + 1} of the "
                               "line)"), on_error, report)
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                _bad(DataError(src, f"malformed JSON ({exc.msg})"), on_error, report)
                continue
            except RecursionError:
                _bad(DataError(src, "JSON nested too deeply"), on_error, report)
                continue
            _parse_into(rows, report, parse, obj, src, on_error)
    return rows, report


# --------------------------------------------------------------------------- rows


def _parse_into(rows, report, parse, obj, src, on_error) -> None:
    try:
        if not isinstance(obj, dict):
            raise DataError(src, f"expected a JSON object, got {type(obj).__name__}")
        rows.append(parse(obj, src))
    except DataError as err:
        _bad(err, on_error, report)
    except RecursionError:  # a nested field that text conversion recurses into
        _bad(DataError(src, "JSON nested too deeply"), on_error, report)


def _mmpr_row(obj: dict, src: str, root: str, check_images: bool, outside: bool) -> Example:
    image = obj.get("image")
    paths = [] if image is None else [image] if isinstance(image, str) else image
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise DataError(src, "'image' must be a path, a list of paths, or absent")
    question = _text(obj, "question", src)
    return _example(question, obj, src, _image_paths(paths, root, src, outside), check_images)


def _hf_row(obj: dict, src: str, root: str, check_images: bool, outside: bool) -> Example:
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
    if images and all(hasattr(p, "convert") for p in images):  # PIL images (`datasets`)
        return _example(prompt, obj, src, [], check_images, tuple(images))
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise DataError(src, "'images' must be a list of paths (or absent)")
    return _example(prompt, obj, src, _image_paths(images, root, src, outside), check_images)


def _image_paths(paths: list[str], root: str, src: str, outside: bool) -> list[str]:
    """The image paths joined to the dataset root; unless ``outside`` (allow_outside_root),
    one that resolves outside the root (``..``, an absolute path, a symlink) is bad data."""
    joined = [os.path.join(root, p) for p in paths]
    if outside:
        return joined
    base = os.path.realpath(root)
    for p in joined:
        real = os.path.realpath(p)
        if os.path.commonpath([base, real]) != base:
            raise DataError(src, f"image {p} resolves to {real}, outside the dataset root "
                            f"{base} (allow_outside_root / --allow-outside-root permits it)")
    return joined


def _example(prompt, obj: dict, src: str, images: list[str], check_images: bool,
             in_memory: tuple = ()) -> Example:
    """The pair; ``in_memory``: PIL images (no file to check) in place of ``images``."""
    chosen, rejected = _answer(obj, "chosen", src), _answer(obj, "rejected", src)
    if chosen == rejected:
        raise DataError(src, "'chosen' and 'rejected' are identical (the pair teaches nothing)")
    text = prompt if isinstance(prompt, str) else "".join(m["content"] for m in prompt)
    n = text.count(IMAGE_PLACEHOLDER)
    if in_memory:
        if n and n != len(in_memory):
            raise DataError(src, f"the prompt has {n} {IMAGE_PLACEHOLDER} placeholders but "
                            f"{len(in_memory)} images")
        return Example(prompt, chosen, rejected, in_memory, src)
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
            if kind == "text" and isinstance(part.get("text", ""), str):
                parts.append(part.get("text", ""))
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
