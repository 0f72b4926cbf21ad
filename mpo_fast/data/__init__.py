"""Preference data for the trainer: files in, packed micro-batches out.

    formats   MMPR (meta.json -> annotation .jsonl) and the HF preference format
              ({"prompt", "chosen", "rejected", "images"}) -> `Example`s; bad lines are
              reported with file and line, then skipped (counted) or fatal
    collate   chat template + tokenize + image tokens (`PairTokenizer`), then whole pairs ->
              one packed (or padded) `Batch`: tokens, positions, `Segments`, shifted targets
    tiny      the bundled tiny tokenizer, model configs and synthetic task (no download)

Layering: data imports the core (mpo_fast.packing, mpo_fast.layout) and transformers, never
mpo_fast.train.
"""

from .collate import Batch, PairTokenizer, TokenizedPair, collate
from .formats import DataError, Example, LoadReport, load_dataset, load_mmpr, load_preference

__all__ = ["Batch", "DataError", "Example", "LoadReport", "PairTokenizer", "TokenizedPair",
           "collate", "load_dataset", "load_mmpr", "load_preference"]
