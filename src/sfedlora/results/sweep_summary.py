"""A sweep's summary: one row per cell (summary.csv) and cells grouped over seeds (summary.md)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from ..driver.collapse import COLLAPSED, OVERFIT, judge
from ..federated.keys import higher_is_better
from ..tasks.sequence import Classification, label_prior_loss
from .grid import ALIASES, hashable, value_text
from .record import Run, Sweep


def last_value(records: list[dict], key: str):
    """The last recorded (not None) value of ``key``."""
    return next((r[key] for r in reversed(records) if r.get(key) is not None), None)


def _with_trivial_train_loss(summary: dict, partition: dict | None) -> dict:
    """A classification run's summary written before the trivial training loss was recorded,
    given it from the run's label histograms (the same number a run computes now), so that
    its verdict tells overfitting from not learning as a new run's does."""
    classification = (
        "majority_baseline" in summary or summary.get("trivial_predictor") == "the majority class"
    )
    if "trivial_train_loss" in summary or not classification or not partition:
        return summary
    return {
        **summary,
        "trivial_train_loss": label_prior_loss(partition["label_histograms"]),
        "trivial_train_predictor": Classification.trivial_train_name,
    }


def cell_row(run: Run, target: float | None = None) -> dict:
    """One summary row: the cell's values and what its run reached."""
    summary, records = run.summary, run.metrics
    metric = summary["metric"]
    evals = [r for r in records if r.get(metric) is not None]
    higher = higher_is_better(metric)
    reached = next(
        (
            r["round"]
            for r in evals
            if target is not None and (r[metric] >= target if higher else r[metric] <= target)
        ),
        None,
    )
    verdict = judge(records, _with_trivial_train_loss(summary, run.partition))
    return {
        **run.cell,
        "metric": metric,
        "final": summary["final"],
        "best": summary["best"],
        "rounds_to_target": reached,
        # Classification runs also report each client's accuracy under its own label mix.
        "final_local_accuracy": last_value(records, "personal_local_accuracy_mean"),
        "final_train_loss": last_value(records, "train_loss"),
        "grad_norm_A": last_value(records, "grad_norm_A"),
        "grad_norm_B": last_value(records, "grad_norm_B"),
        "final_epsilon": last_value(records, "epsilon_max"),  # the worst client's ε spent, for DP runs
        "collapsed": verdict is not None and verdict.kind == COLLAPSED,
        "overfit": verdict is not None and verdict.kind == OVERFIT,
        "collapse_reason": verdict.reason if verdict else "",
        "wall_seconds": summary["wall_seconds"],
    }


def _mean_std(values: list) -> str:
    xs = [float(v) for v in values if v is not None and v != "" and math.isfinite(float(v))]
    if not xs:
        return "–"
    return f"{np.mean(xs):.4f}" if len(xs) == 1 else f"{np.mean(xs):.4f} ± {np.std(xs, ddof=1):.4f}"


def write_summary(sweep: Sweep, out_dir: Path) -> list[dict]:
    """``out_dir/summary.csv`` (a row per finished cell) and ``summary.md`` (mean ± std over seeds)."""
    rows = [cell_row(run, sweep.target) for run in sweep.runs]
    grid = sweep.grid
    if not rows:
        return rows
    with (out_dir / "summary.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    group_keys = [k for k in grid if k != "seed"]
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(hashable(row[k]) for k in group_keys), []).append(row)
    stats = [
        "final",
        "best",
        "rounds_to_target",
        "final_local_accuracy",
        "final_train_loss",
        "grad_norm_A",
        "grad_norm_B",
        "final_epsilon",
        "wall_seconds",
    ]
    lines = [
        f"# Sweep summary: {sweep.name}",
        "",
        f"{len(rows)} finished runs; mean ± std over seeds (n = runs per row).",
        "",
        "| " + " | ".join(group_keys + ["n"] + stats + ["collapsed", "overfit"]) + " |",
        "|" + "---|" * (len(group_keys) + len(stats) + 3),
    ]
    for key, members in groups.items():
        collapsed = sum(m["collapsed"] for m in members)
        # Overfit: the adapter trained, held-out scores stayed trivial (sfedlora.driver.collapse).
        overfit = sum(m.get("overfit", False) for m in members)
        cells = (
            [value_text(list(v) if isinstance(v, tuple) else v) for v in key]
            + [str(len(members))]
            + [_mean_std([m[s] for m in members]) for s in stats]
        )
        tallies = [f"{collapsed}/{len(members)}", f"{overfit}/{len(members)}"]
        lines.append("| " + " | ".join(cells + tallies) + " |")
    lines += _learning_rate_views(rows, grid)
    (out_dir / "summary.md").write_text("\n".join(lines) + "\n")
    return rows


def _axis(grid: dict, dotted: str) -> str | None:
    return next((k for k in grid if ALIASES.get(k, k) == dotted), None)


def _cell_means(
    rows: list[dict], column: str, others: list[str], rank_key: str, lr_key: str
) -> dict[tuple, float]:
    """Mean over seeds of ``column``, keyed by (other axes' values, rank, learning rate)."""
    values: dict[tuple, list[float]] = {}
    for row in rows:
        if row.get(column) is not None:
            values.setdefault((tuple(row[k] for k in others), row[rank_key], row[lr_key]), []).append(
                row[column]
            )
    return {k: float(np.mean(v)) for k, v in values.items()}


def _learning_rate_views(rows: list[dict], grid: dict) -> list[str]:
    """With a learning-rate axis: the final metric and training loss at each fixed learning
    rate across ranks (does one setting work at every r?) and the final metric at the best
    learning rate of each cell (tuned). The training loss is there because on skewed
    personalised splits it can separate rules that the held-out metric does not."""
    lr_key, rank_key = _axis(grid, "train.lr"), _axis(grid, "lora.rank")
    if lr_key is None or rank_key is None or len(grid[lr_key]) < 2:
        return []
    others = [k for k in grid if k not in (lr_key, rank_key, "seed")]
    mean = _cell_means(rows, "final", others, rank_key, lr_key)
    # The best learning rate is the one with the best final metric: the lowest, for a perplexity.
    sign = 1.0 if all(higher_is_better(r.get("metric", "")) for r in rows) else -1.0
    groups = list(dict.fromkeys(k[0] for k in mean))
    ranks = grid[rank_key]
    header = "| " + " | ".join(others + [f"r={r}" for r in ranks]) + " |"
    rule = "|" + "---|" * (len(others) + len(ranks))
    out = []
    loss = _cell_means(rows, "final_train_loss", others, rank_key, lr_key)
    for title, what, means in (
        ("Fixed learning rate across ranks", "final metric", mean),
        ("Final training loss at a fixed learning rate across ranks", "final training loss", loss),
    ):
        out += ["", f"## {title}", "", f"Mean {what} over seeds; one table per learning rate.", ""]
        for lr in grid[lr_key]:
            out += [f"**lr = {lr}**", "", header, rule]
            for g in groups:
                out.append(
                    "| "
                    + " | ".join(
                        [str(v) for v in g]
                        + [f"{means[(g, r, lr)]:.4f}" if (g, r, lr) in means else "–" for r in ranks]
                    )
                    + " |"
                )
            out.append("")
    out += [
        "## Best learning rate per cell (tuned)",
        "",
        "Mean final metric over seeds at the cell's best learning rate (that rate in brackets).",
        "",
        header,
        rule,
    ]
    for g in groups:
        cells = []
        for r in ranks:
            tried = [(sign * mean[(g, r, lr)], lr) for lr in grid[lr_key] if (g, r, lr) in mean]
            cells.append(f"{sign * max(tried)[0]:.4f} ({max(tried)[1]})" if tried else "–")
        out.append("| " + " | ".join([str(v) for v in g] + cells) + " |")
    return out
