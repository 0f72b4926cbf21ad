"""PNG plots of benchmark rows: a metric against N, one line per implementation, one panel
per (V, H) shape family."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def metric_vs_n(rows: Sequence[dict], metric: str, ylabel: str, title: str, path: Path,
                roofline: float | None = None) -> Path | None:
    """Plot `metric` of measured rows (those with the key) against N; None if nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.get(metric) is not None]
    families = sorted({(r["V"], r["H"]) for r in rows})
    if not families:
        return None
    fig, axes = plt.subplots(1, len(families), figsize=(4.2 * len(families), 3.6), squeeze=False)
    for ax, (V, H) in zip(axes[0], families, strict=True):
        for impl in sorted({r["impl"] for r in rows}):
            pts = sorted((r["N"], r[metric]) for r in rows
                         if (r["V"], r["H"], r["impl"]) == (V, H, impl))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
        if roofline:
            ax.axhline(roofline, color="gray", linestyle="--", linewidth=1,
                       label="matmul rate")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("N (tokens)")
        ax.set_title(f"V={V:,}  H={H}", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
