"""PNG plots of benchmark rows: a metric against N, one line per implementation, one panel
per (V, H) shape family; grouped bars instead when no family has more than one N (the CPU
grid)."""

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
    if all(len({r["N"] for r in rows if (r["V"], r["H"]) == f}) == 1 for f in families):
        return _bars(plt, rows, metric, ylabel, title, path, roofline)
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


def _bars(plt, rows, metric, ylabel, title, path, roofline):
    shapes = sorted({(r["N"], r["H"], r["V"]) for r in rows})
    impls = sorted({r["impl"] for r in rows})
    width = 0.8 / len(impls)
    fig, ax = plt.subplots(figsize=(2.2 + 2.4 * len(shapes), 3.8))
    for i, impl in enumerate(impls):
        xs, ys = [], []
        for j, shape in enumerate(shapes):
            hit = [r[metric] for r in rows if (r["N"], r["H"], r["V"]) == shape
                   and r["impl"] == impl]
            if hit:
                xs.append(j + (i - (len(impls) - 1) / 2) * width)
                ys.append(hit[0])
        ax.bar(xs, ys, width, label=impl)
    if roofline:
        ax.axhline(roofline, color="gray", linestyle="--", linewidth=1, label="matmul rate")
    ax.set_xticks(range(len(shapes)))
    ax.set_xticklabels([f"N={n}\nH={h} V={v:,}" for n, h, v in shapes], fontsize=8)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
