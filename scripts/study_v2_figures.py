"""Study v2's figures (see scripts/study_v2.py): the paper's accuracy-against-rank shape,
evaluation curves and the exponent ablation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from study_v2_cells import group


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def rank_figure(
    rows: list[dict],
    key: str,
    ylabel: str,
    path: Path,
    probe=None,
    log=False,
    panel: str = "clients",
    line: str = "method",
) -> None:
    """The paper's shape: a final score (or the gradient norms) against r, one line per
    ``line`` value (mean over seeds, their range shaded), a panel per ``panel`` value (N by
    default); ``probe``: the head-only line per N."""
    plt = _plt()
    ns = sorted({r[panel] for r in rows})
    fig, axes = plt.subplots(1, len(ns), figsize=(5 * len(ns), 4), squeeze=False)
    for ax, n in zip(axes[0], ns):
        for method, cells in group([r for r in rows if r[panel] == n], line).items():
            by_rank = group(cells, "rank")
            ranks = sorted(k[0] for k in by_rank)
            values = [[c[key] for c in by_rank[(k,)]] for k in ranks]
            ax.plot(ranks, [np.mean(v) for v in values], marker="o", label=method[0])
            ax.fill_between(ranks, [min(v) for v in values], [max(v) for v in values], alpha=0.15)
        if probe and n in probe:
            ax.axhline(probe[n], color="grey", linestyle="--", label="head only (linear probe)")
        ax.set_xscale("log", base=2)
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("rank r")
        ax.set_title(f"N = {n}" if panel == "clients" else f"{n}, N = {rows[0]['clients']}")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def curve_figure(
    rows: list[dict], label_keys: tuple[str, ...], path: Path, title: str, target: float
) -> None:
    """Client-test accuracy and dev AUROC by round, one line per cell."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, column, name in zip(axes, (1, 2), ("client-test accuracy", "dev AUROC")):
        for row in rows:
            rounds, scores = [c[0] for c in row["curve"]], [c[column] for c in row["curve"]]
            ax.plot(rounds, scores, label=" ".join(f"{k}={row[k]}" for k in label_keys))
        ax.axhline(target, color="grey", linestyle=":")
        ax.set_xlabel("round")
        ax.set_ylabel(name)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def exponent_figure(rows: list[dict], path: Path, title: str) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, (vary, fixed) in zip(axes, (("a", "b"), ("b", "a"))):
        cells = group([r for r in rows if r[fixed] == 0.5], vary)
        xs = sorted(k[0] for k in cells)
        ax.plot(xs, [np.mean([c["client_test"] for c in cells[(x,)]]) for x in xs], marker="o")
        ax.axvline(0.5, color="grey", linestyle=":")
        ax.set_xlabel(f"{vary} ({fixed} = ½)")
        ax.set_ylabel("client-test accuracy (final)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
