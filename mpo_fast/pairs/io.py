"""Reading prompts and writing MMPR pairs, resumable exactly once.

A run named NAME writes into its output folder:

    NAME.jsonl           the pairs, one per line, in the MMPR format the trainer reads:
                         {"id", "image": path | [paths] (absent for text), "question",
                          "chosen", "rejected", "meta": {...}}
    NAME_format.jsonl    format negatives (correctness pipeline): chosen = a correct response,
                         rejected = an unparseable one
    NAME.samples.jsonl   every sampled response with its extracted answer and verdict
    NAME.progress.jsonl  the ledger: one line per finished input item, written last
    meta.json            {NAME: {"root", "annotation", "repeat_time", "length"}, ...}; merged
                         with the entries already there (other runs keep theirs)

Exactly once. Every input item has an id (its "id" field, else a hash of image, question and
answer). The records of one item are appended and fsynced first, then its ledger line, which
holds the size of every output file after that item. On (re)start, each file is cut back to the
sizes of the last complete ledger line: whatever an interrupted item had written is dropped, and
that item is done again. Items in the ledger are skipped. So an interrupted run, run again,
produces every pair once: no duplicates and no losses.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["IMAGE_PLACEHOLDER", "PairWriter", "image_list", "item_id", "load_images",
           "question_with_images", "read_items", "read_jsonl", "strip_image_placeholders"]

IMAGE_PLACEHOLDER = "<image>"


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """All records of a jsonl file (blank lines skipped); a bad line is a ValueError naming it."""
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not a JSON object ({e})") from None
    return out


def item_id(item: dict) -> str:
    """The item's "id" (as a string), else a stable hash of its image, question and answer."""
    if item.get("id") is not None:
        return str(item["id"])
    key = json.dumps([item.get("image"), item.get("question"), item.get("answer")],
                     sort_keys=True, ensure_ascii=False)
    return hashlib.sha1(key.encode()).hexdigest()[:16]


def read_items(path: str | os.PathLike, *, limit: int | None = None,
               require: Sequence[str] = ("question",)) -> list[dict]:
    """Input items with an "id" each; repeated ids are kept once; `require`d fields checked."""
    items, seen = [], set()
    for n, item in enumerate(read_jsonl(path), 1):
        missing = [k for k in require if k not in item]
        if missing:
            raise ValueError(f"{path}: record {n} has no {missing} field(s)")
        iid = item_id(item)
        if iid in seen:
            continue
        seen.add(iid)
        items.append({**item, "id": iid})
        if limit is not None and len(items) >= limit:
            break
    return items


def image_list(image: str | Sequence[str] | None) -> list[str]:
    """The MMPR "image" field as a list of paths ([] when absent)."""
    if not image:
        return []
    return [image] if isinstance(image, str) else list(image)


def load_images(image: str | Sequence[str] | None, root: str | os.PathLike | None = None):
    """PIL RGB images of an item's "image" field, paths relative to `root`."""
    from PIL import Image

    out = []
    for p in image_list(image):
        path = Path(root) / p if root else Path(p)
        with Image.open(path) as im:
            out.append(im.convert("RGB"))
    return out


def strip_image_placeholders(question: str) -> str:
    """The question without "<image>" placeholders (and the newline after each)."""
    return question.replace(IMAGE_PLACEHOLDER + "\n", "").replace(IMAGE_PLACEHOLDER, "").strip()


def question_with_images(question: str, n_images: int) -> str:
    """The question as MMPR stores it: one "<image>\\n" placeholder per image up front, unless
    the question already places them."""
    if n_images == 0 or IMAGE_PLACEHOLDER in question:
        return question
    return (IMAGE_PLACEHOLDER + "\n") * n_images + question


class PairWriter:
    """Appends records of finished items to named streams, exactly once across restarts.

    Args:
        out_dir: the output folder (created).
        name: the run's name (file stem and meta.json key).
        streams: stream key -> file suffix, e.g. {"pairs": ".jsonl", "format": "_format.jsonl"}.
    """

    def __init__(self, out_dir: str | os.PathLike, name: str, streams: dict[str, str]):
        if not name or "/" in name:
            raise ValueError(f"name must be a plain file stem, got {name!r}")
        self.out_dir = Path(out_dir).resolve()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.paths = {k: self.out_dir / f"{name}{suffix}" for k, suffix in streams.items()}
        self.ledger_path = self.out_dir / f"{name}.progress.jsonl"
        self.entries = self._recover()
        self.done = {e["id"] for e in self.entries}
        self._files = {k: open(p, "a", encoding="utf-8") for k, p in self.paths.items()}
        self._ledger = open(self.ledger_path, "a", encoding="utf-8")

    def _recover(self) -> list[dict]:
        """Complete ledger entries; every file cut back to the sizes of the last one."""
        entries, good_bytes = [], 0
        if self.ledger_path.exists():
            with open(self.ledger_path, "rb") as f:
                for line in f:
                    try:
                        entry = json.loads(line)
                    except (json.JSONDecodeError, UnicodeDecodeError):
                        break  # a torn last line: the item it recorded is not done
                    if not line.endswith(b"\n"):
                        break
                    entries.append(entry)
                    good_bytes += len(line)
            _truncate(self.ledger_path, good_bytes)
        sizes = entries[-1]["sizes"] if entries else {}
        for key, path in self.paths.items():
            size = sizes.get(key, 0)
            have = path.stat().st_size if path.exists() else 0
            if have < size:
                raise RuntimeError(f"{path} has {have} bytes but the ledger {self.ledger_path} "
                                   f"recorded {size}: the output was changed by hand; move it "
                                   "away or delete the ledger to start over")
            if path.exists():
                _truncate(path, size)
        return entries

    def commit(self, iid: str, records: dict[str, Iterable[dict]], stats: dict[str, Any]) -> None:
        """Append one finished item's records, then its ledger line (the commit point)."""
        if iid in self.done:
            raise ValueError(f"item {iid!r} was already committed")
        for key, recs in records.items():
            f = self._files[key]
            for rec in recs:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        sizes = {}
        for key, f in self._files.items():
            f.flush()
            os.fsync(f.fileno())
            sizes[key] = f.tell()
        entry = {"id": iid, "sizes": sizes, "stats": stats}
        self._ledger.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self._ledger.flush()
        os.fsync(self._ledger.fileno())
        self.entries.append(entry)
        self.done.add(iid)

    def totals(self) -> dict[str, float]:
        """The sum of every numeric stat over all committed items (this run and earlier ones)."""
        out: dict[str, float] = {"items": len(self.entries)}
        for e in self.entries:
            for k, v in e["stats"].items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    out[k] = out.get(k, 0) + v
        return out

    def count_lines(self, key: str) -> int:
        with open(self.paths[key], encoding="utf-8") as f:
            return sum(1 for line in f if line.strip())

    def write_meta(self, keys_to_names: dict[str, str], root: str | os.PathLike | None,
                   repeat_time: float = 1) -> Path:
        """Merge {run name: {"root", "annotation", "repeat_time", "length"}} entries for the
        non-empty pair streams into out_dir/meta.json (atomically)."""
        meta_path = self.out_dir / "meta.json"
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        for key, entry_name in keys_to_names.items():
            n = self.count_lines(key)
            if n == 0:
                meta.pop(entry_name, None)
                continue
            meta[entry_name] = {"root": str(Path(root).resolve()) if root else "",
                                "annotation": str(self.paths[key]),
                                "repeat_time": repeat_time, "length": n}
        tmp = meta_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
        os.replace(tmp, meta_path)
        return meta_path

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._ledger.close()

    def __enter__(self) -> PairWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)
