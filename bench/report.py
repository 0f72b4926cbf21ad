"""Where results go and how they are written: markdown tables and CSV.

A run writes to ./runs/<device>-<date>/ (ignored by git) unless it is given a folder. The
committed results in bench/results/<device>-<date>/ are written only by naming that folder:
`python -m bench mpo --out bench/results/cpu-2026-11-26`.
"""

from __future__ import annotations

import csv
import datetime
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from mpo_fast.measure import device_name

RESULTS = Path(__file__).resolve().parent / "results"  # committed results, one folder per run
RUNS = Path("runs")  # default output, relative to the working directory; /runs/ is git-ignored


def device_slug(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    name = device_name(device).lower().replace("nvidia", "")
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "cuda"


def default_dir(device: torch.device) -> Path:
    """./runs/<device>-<date>/ (the folder name bench/results/ uses too)."""
    return RUNS / f"{device_slug(device)}-{datetime.date.today()}"


def results_dir(device: torch.device, out: str | Path | None = None) -> Path:
    """The output folder, created: `out` if given, else `default_dir(device)`."""
    path = Path(out) if out else default_dir(device)
    path.mkdir(parents=True, exist_ok=True)
    return path


def fmt(value, spec: str) -> str:
    if value is None or value == "":
        return "—"
    if isinstance(value, float) and spec:
        return format(value, spec)
    return str(value)


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> str:
    """columns: (key, header, format spec) triples."""
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(k), f) for k, _, f in columns) + " |")
    return "\n".join(lines)


def write_csv(rows: Sequence[dict], path: Path) -> None:
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
