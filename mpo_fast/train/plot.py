"""Training curves from metrics.jsonl: `python -m mpo_fast.train.plot RUN_DIR [RUN_DIR ...]`.

One PNG with four panels against the optimizer step: the loss, the reward accuracy, the reward
margin and the SFT term's NLL. Several runs are overlaid on the same step axis, each in its own
colour, to compare them; `--after` draws them one after the other instead (a run that continues
another, like the demo's SFT warm-up, then MPO). The PNG goes into the (first) run folder as
curves.png, or where `--out` says. Needs matplotlib; without it `plot_curves` returns None and
says why, so a training run never fails for want of a plot.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

__all__ = ["PANELS", "plot_curves", "read_metrics"]

PANELS = (("loss", "loss"), ("rewards/accuracies", "reward accuracy"),
          ("rewards/margins", "reward margin"), ("nll_loss", "NLL of the chosen (SFT term)"))


def read_metrics(run_dir: str) -> list[dict]:
    """The records of ``run_dir/metrics.jsonl`` (a missing file: none)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_curves(runs: dict[str, str], path: str, title: str = "",
                after: bool = False) -> str | None:
    """Draw ``{label: run_dir}`` into the PNG ``path``, overlaid (or, with ``after``, in order
    on one step axis); returns the path, or None when matplotlib is missing or no run has
    records."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no curves: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
        return None
    records = {label: read_metrics(d) for label, d in runs.items()}
    if not any(records.values()):
        return None
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.0 * len(PANELS), 3.2))
    offset = 0
    for label, rows in records.items():
        steps = [offset + r["step"] for r in rows]
        for ax, (key, _) in zip(axes, PANELS, strict=True):
            points = [(s, r[key]) for s, r in zip(steps, rows, strict=True) if key in r]
            if points:
                ax.plot(*zip(*points, strict=True), marker=".", label=label)
        offset = steps[-1] if steps and after else offset
    for ax, (_, name) in zip(axes, PANELS, strict=True):
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mpo_fast.train.plot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="folders holding a metrics.jsonl")
    p.add_argument("--out", default=None,
                   help="the PNG to write (default: curves.png in the first run folder)")
    p.add_argument("--after", action="store_true",
                   help="draw the runs one after the other on one step axis (a run that "
                   "continues the previous one) instead of overlaid")
    args = p.parse_args(argv)
    missing = [d for d in args.runs if not read_metrics(d)]
    if missing:
        print(f"no metrics.jsonl records in {', '.join(missing)}", file=sys.stderr)
        return 2
    out = args.out or os.path.join(args.runs[0], "curves.png")
    labels = {_label(d, args.runs): d for d in args.runs}
    path = plot_curves(labels, out, after=args.after)
    if path is None:
        return 1
    print(f"wrote {path}")
    return 0


def _label(run_dir: str, runs: Sequence[str]) -> str:
    """The folder's name, or its path where two runs share a name (run-a/mpo, run-b/mpo)."""
    name = os.path.basename(os.path.normpath(run_dir))
    same = [d for d in runs if os.path.basename(os.path.normpath(d)) == name]
    return name if len(same) == 1 else os.path.normpath(run_dir)


if __name__ == "__main__":
    sys.exit(main())
