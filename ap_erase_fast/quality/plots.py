"""The report's figures: PSR against ESR per method over the erasure strengths, PSR-near and
PSR-far against ESR, and the grid of sample images."""
from __future__ import annotations

import statistics
from pathlib import Path

import torch

from .statistics import MATCHED_ESR


def _mean_curve(rows, method: str, points, metric: str = "psr") -> list[tuple[float, float, str]]:
    """(ESR, ``metric``, label) of ``method`` at each (lr, steps) point, averaged over ``rows``."""
    out = []
    for lr, st in points:
        rs = [r for r in rows if r["method"] == method and metric in r and r["lr"] == lr and r["steps"] == st]
        if rs:
            out.append((statistics.fmean(r["esr"] for r in rs), statistics.fmean(r[metric] for r in rs),
                        f"{lr:g}×{st}"))
    return out


def _plot_curves(ax, rows, args, points, metric: str, labels: bool) -> None:
    base = [r for r in rows if r["method"] == "base" and metric in r]
    if base:
        ax.scatter([statistics.fmean(r["esr"] for r in base)], [statistics.fmean(r[metric] for r in base)],
                   marker="*", s=120, color="black", label="base")
    for m in args.methods:
        pts = _mean_curve(rows, m, points, metric) if m != "base" else []
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
            for x, y, text in pts if labels else ():
                ax.annotate(text, (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")


def _plot_sweep(rows, args, points, path: Path) -> None:
    """PSR against ESR: one curve per method over the (lr, steps) points (mean over ``rows``),
    each point labelled lr×steps, the base model as a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    _plot_curves(ax, rows, args, points, "psr", labels=True)
    ax.set_xlabel("ESR (erased concept no longer recognised)")
    ax.set_ylabel("PSR (other concepts still recognised)")
    targets = sorted({r["target"] for r in rows})
    ax.set_title(f"{args.model}, targets {', '.join(targets) if len(targets) <= 4 else len(targets)}: "
                 "erasure strength (lr×steps)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def _plot_near_far(rows, args, points, path: Path) -> None:
    """Two panels, PSR-near and PSR-far against ESR: one curve per method over the (lr, steps)
    points (mean over ``rows``), the base model as a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharex=True, sharey=True)
    for ax, metric, title in zip(axes, ("psr_near", "psr_far"), ("PSR-near", "PSR-far")):
        _plot_curves(ax, rows, args, points, metric, labels=False)
        for lv in MATCHED_ESR:
            ax.axvline(lv, color="grey", lw=0.6, ls="--")
        ax.set_xlabel("ESR (erased concept no longer recognised)")
        ax.set_ylabel(f"{title} (held-out prompts)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def _save_grid(grid_images: dict, path: Path, per_prompt: int = 2) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(grid_images)
    fig, axes = plt.subplots(len(names), 1, figsize=(6 * per_prompt, 1.1 * len(names) + 0.3))
    axes = np.atleast_1d(axes)
    for ax, name in zip(axes, names):
        imgs, n = grid_images[name]
        pick = torch.cat([imgs[i * n: i * n + per_prompt] for i in range(len(imgs) // n)])
        strip = pick.permute(2, 0, 3, 1).reshape(pick.shape[2], -1, 3).numpy()
        ax.imshow(strip, interpolation="nearest")
        ax.set_yticks([])
        ax.set_xticks([])
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
