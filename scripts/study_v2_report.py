"""Study v2's tables and figures from its run directories (see scripts/study_v2.py).

Scores: ``client_test`` is the mean over clients of each personalised model's accuracy on
its own client's held-out share (FedSA-LoRA's protocol); under the Dirichlet(0.5) label skew
each client's own majority label already scores high there (``majority``). ``dev_auroc``
is the mean over a fixed sample of 3 clients (5 in the budget part) of their personalised models' AUROC on 300
balanced SST-2 dev sentences: it ranks sentences by the model's margin, so a model's bias
toward its client's label does not move it; it scores what the model knows of sentiment.
``dev`` is their accuracy there. "Final" is the last evaluation.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import yaml

RATES = [0.05, 0.2, 0.8]
TARGET = 0.80  # the budget part's question: does dev AUROC reach it within 40 rounds?
# Convergence in the main grid: the first evaluated round at which a cell's client-test
# accuracy comes within this of answering each client's own majority label, i.e. the
# personal models have learned their clients' label mix (the score every working cell reaches
# at this budget; dev AUROC falls as they do, so it has no target to reach).
PRIOR_GAP = 0.02
# What learning rates and exponent pairs are chosen by: the client-local protocol, the one
# FedSA-LoRA is built for. Dev AUROC falls as a personalised model fits its client's skewed
# data (tune part), so choosing by it would favour the rate that changes the model least.
HEADLINE = "client_test"
CLIENT_TEST = "client_test_accuracy_mean"
DEV = "personal_accuracy_mean"
DEV_AUROC = "personal_auroc_mean"


def _row(run_dir: Path) -> dict:
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    evals = [r for r in records if r.get(CLIENT_TEST) is not None]
    summary = json.loads((run_dir / "summary.json").read_text())
    lora, fed = cfg["lora"], cfg["federation"]
    majority = summary.get("client_test_majority_accuracy")
    norms = {k: [r[k] for r in records if r.get(k) is not None] for k in ("grad_norm_A", "grad_norm_B")}
    return {
        "run": str(run_dir),
        "method": cfg["method"],
        "scaling": lora["scaling"],
        "a": lora.get("n_exponent"),
        "b": lora.get("rank_exponent"),
        "rank": lora["rank"],
        "clients": fed["n_clients"],
        "lr": cfg["train"]["lr"],
        "optimizer": cfg["train"]["optimizer"],
        "partition": cfg["partition"]["kind"],
        "seed": cfg["seed"],
        "rounds": fed["rounds"],
        "local_head": fed["local_head"],
        "head_only": fed["head_probe_rounds"] == fed["rounds"],
        "majority": majority,
        "curve": [(r["round"], r[CLIENT_TEST], r.get(DEV_AUROC, math.nan)) for r in evals],
        "client_test": evals[-1][CLIENT_TEST] if evals else math.nan,
        # Seeds draw different partitions, hence different label priors: the gain over the
        # prior compares cells across seeds and splits.
        "over_majority": evals[-1][CLIENT_TEST] - majority if evals and majority is not None else math.nan,
        "client_test_min": evals[-1].get("client_test_accuracy_min", math.nan) if evals else math.nan,
        "dev": evals[-1].get(DEV, math.nan) if evals else math.nan,
        "dev_auroc": evals[-1].get(DEV_AUROC, math.nan) if evals else math.nan,
        "rounds_to_target": next((r["round"] for r in evals if r.get(DEV_AUROC, 0) >= TARGET), None),
        "rounds_to_prior": next((r["round"] for r in evals if r[CLIENT_TEST] >= majority - PRIOR_GAP), None)
        if majority is not None
        else None,
        # The run's mean over rounds: one round's norm moves with its batches.
        "grad_norm_A": float(np.mean(norms["grad_norm_A"])) if norms["grad_norm_A"] else None,
        "grad_norm_B": float(np.mean(norms["grad_norm_B"])) if norms["grad_norm_B"] else None,
        "train_loss": records[-1].get("train_loss") if records else None,
        "wall_seconds": summary["wall_seconds"],
    }


def load_part(out: Path, prefix: str) -> list[dict]:
    """Every finished cell of the sweeps ``out/<prefix>*``."""
    return [
        _row(summary.parent)
        for sweep in sorted(Path(out).glob(f"{prefix}*"))
        for summary in sorted(sweep.glob("runs/*/summary.json"))
    ]


def score(row: dict) -> float:
    """The score learning rates and exponent pairs are chosen by (``HEADLINE``)."""
    value = row[HEADLINE]
    return -math.inf if value is None or math.isnan(value) else value


def best_lr(rows: list[dict]) -> float:
    return max(rows, key=score)["lr"]


def _ms(values: list[float]) -> str:
    """Mean ± half the range (two seeds: each seed is the mean ± this)."""
    xs = [v for v in values if v is not None and not math.isnan(v)]
    if not xs:
        return "—"
    if len(xs) == 1:
        return f"{xs[0]:.3f}"
    return f"{np.mean(xs):.3f} ± {(max(xs) - min(xs)) / 2:.3f}"


def _group(rows: list[dict], *keys: str) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for row in rows:
        out.setdefault(tuple(row[k] for k in keys), []).append(row)
    return out


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def rank_figure(rows: list[dict], key: str, ylabel: str, path: Path, probe=None, log=False) -> None:
    """The paper's shape: a final score (or the gradient norms) against r, one line per method
    (mean over seeds, their range shaded), a panel per N; ``probe``: the head-only line per N."""
    plt = _plt()
    ns = sorted({r["clients"] for r in rows})
    fig, axes = plt.subplots(1, len(ns), figsize=(5 * len(ns), 4), squeeze=False)
    for ax, n in zip(axes[0], ns):
        for method, cells in _group([r for r in rows if r["clients"] == n], "method").items():
            by_rank = _group(cells, "rank")
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
        ax.set_title(f"N = {n}")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def curve_figure(rows: list[dict], label_keys: tuple[str, ...], path: Path, title: str) -> None:
    """Client-test accuracy and dev AUROC by round, one line per cell."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, column, name in zip(axes, (1, 2), ("client-test accuracy", "dev AUROC")):
        for row in rows:
            rounds, scores = [c[0] for c in row["curve"]], [c[column] for c in row["curve"]]
            ax.plot(rounds, scores, label=" ".join(f"{k}={row[k]}" for k in label_keys))
        ax.axhline(TARGET, color="grey", linestyle=":")
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
        cells = _group([r for r in rows if r[fixed] == 0.5], vary)
        xs = sorted(k[0] for k in cells)
        ax.plot(xs, [np.mean([c["client_test"] for c in cells[(x,)]]) for x in xs], marker="o")
        ax.axvline(0.5, color="grey", linestyle=":")
        ax.set_xlabel(f"{vary} ({fixed} = ½)")
        ax.set_ylabel("client-test accuracy (final)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _table(header: list[str], lines: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(x) for x in line) + " |" for line in lines]
    return out


def _f(x) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def report(out: Path, to: Path) -> None:
    """Write ``to/tables.md`` (every part's tables), the figures and ``to/cells.json``."""
    to.mkdir(parents=True, exist_ok=True)
    prefixes = ("budget", "probe", "tune", "main-", "side-", "exponents-", "aggregate-")
    parts = {p: load_part(out, p) for p in prefixes}
    md = ["# Study v2: tables (generated by `python scripts/study_v2.py report`)", ""]
    # Each cell ran on one core, two at a time: the part's wall time is about half its sum.
    md += [
        "Time per part, summed over its cells (each on one core; two ran at a time): "
        + ", ".join(
            f"{p.rstrip('-')} {sum(r['wall_seconds'] for r in rows) / 60:.0f} min"
            for p, rows in parts.items()
            if rows
        ),
        "",
    ]
    # The head-only baseline of each N: the best learning rate of the averaged head's probe.
    probes = [r for r in parts["probe"] if not r["local_head"]]
    probe = {n: max(cells, key=score) for (n,), cells in _group(probes, "clients").items()}
    if parts["budget"]:
        md += ["## Budget: sfed-lora, r = 8; curves of client-test accuracy / dev AUROC", ""]
        md += _table(
            ["N", "lr", f"first round dev AUROC ≥ {TARGET}", "round: client-test / dev AUROC"],
            [
                [
                    r["clients"],
                    r["lr"],
                    r["rounds_to_target"],
                    ", ".join(f"{k}: {c:.2f}/{d:.2f}" for k, c, d in r["curve"][1::2]),
                ]
                for r in parts["budget"]
            ],
        )
        md.append("")
        curve_figure(parts["budget"], ("clients", "lr"), to / "budget_curves.png", "sfed-lora, r = 8")
    if parts["probe"]:
        md += ["## Head only (the adapter never trains)", ""]
        md += _table(
            ["N", "head", "lr", "client-test", "majority label", "dev AUROC", "dev"],
            [
                [
                    r["clients"],
                    "local" if r["local_head"] else "averaged",
                    r["lr"],
                    _f(r["client_test"]),
                    _f(r["majority"]),
                    _f(r["dev_auroc"]),
                    _f(r["dev"]),
                ]
                for r in sorted(parts["probe"], key=lambda r: (r["clients"], r["local_head"], r["lr"]))
            ],
        )
        md.append("")
    if parts["tune"]:
        md += [f"## Learning rate at r = 8, N = 20 (seed 0): final {HEADLINE}", ""]
        md += _table(
            ["method", *map(str, RATES), "chosen"],
            [
                [m, *(_f(score(c)) for c in sorted(cells, key=lambda c: c["lr"])), best_lr(cells)]
                for (m,), cells in _group(parts["tune"], "method").items()
            ],
        )
        md.append("")
    main = parts["main-"]
    if main:
        md += [
            "## Main grid: final scores, mean ± half-range over the seeds run (a single value: one seed)",
            "",
        ]
        lines = []
        for (m, n, r), cells in sorted(_group(main, "method", "clients", "rank").items()):
            base = probe.get(n)
            lines.append(
                [
                    m,
                    n,
                    r,
                    len(cells),
                    _ms([c["client_test"] for c in cells]),
                    _ms([c["over_majority"] for c in cells]),
                    _ms([c["client_test"] - base["client_test"] for c in cells]) if base else "—",
                    _ms([c["dev_auroc"] for c in cells]),
                    _ms([c["dev_auroc"] - base["dev_auroc"] for c in cells]) if base else "—",
                    _ms([c["dev"] for c in cells]),
                    "/".join(str(c["rounds_to_prior"] or "—") for c in cells),
                    _ms([c["grad_norm_A"] for c in cells]),
                    _ms([c["grad_norm_B"] for c in cells]),
                ]
            )
        md += _table(
            [
                "method",
                "N",
                "r",
                "seeds",
                "client-test",
                "− majority",
                "− head only",
                "dev AUROC",
                "− head only",
                "dev acc",
                f"rounds to prior (client-test ≥ majority − {PRIOR_GAP}), per seed",
                "‖∇A‖ (mean over rounds)",
                "‖∇B‖",
            ],
            lines,
        )
        md.append("")
        for key, ylabel, name, base in (
            (
                "client_test",
                "client-test accuracy (final)",
                "accuracy_vs_rank",
                {n: score(p) for n, p in probe.items()},
            ),
            (
                "dev_auroc",
                "dev AUROC (final)",
                "auroc_vs_rank",
                {n: p["dev_auroc"] for n, p in probe.items()},
            ),
        ):
            rank_figure(main, key, ylabel, to / f"{name}.png", base)
        for key in ("grad_norm_A", "grad_norm_B"):
            rank_figure(main, key, f"‖∇{key[-1]}‖ (mean over rounds)", to / f"{key}_vs_rank.png", log=True)
    for name, title, keys in (
        ("side-", "Side checks (N = 20, one seed)", ("method", "optimizer", "partition", "rank")),
        ("aggregate-", "Aggregating only A (N = 20, seed 0)", ("method", "scaling", "rank")),
    ):
        if parts[name]:
            md += [f"## {title}", ""]
            md += _table(
                [*keys, "lr", "client-test", "− majority", "dev AUROC", "dev"],
                [
                    [
                        *(r[k] for k in keys),
                        r["lr"],
                        _f(r["client_test"]),
                        _f(r["over_majority"]),
                        _f(r["dev_auroc"]),
                        _f(r["dev"]),
                    ]
                    for r in sorted(parts[name], key=lambda r: tuple(str(r[k]) for k in keys))
                ],
            )
            md.append("")
    for (r, n), cells in sorted(_group(parts["exponents-"], "rank", "clients").items()):
        md += [f"## Exponents at r = {r}, N = {n}", ""]
        md += _table(
            ["a", "b", "seeds", "client-test", "− majority", "dev AUROC", "dev"],
            [
                [
                    a,
                    b,
                    len(c),
                    _ms([x["client_test"] for x in c]),
                    _ms([x["over_majority"] for x in c]),
                    _ms([x["dev_auroc"] for x in c]),
                    _ms([x["dev"] for x in c]),
                ]
                for (a, b), c in sorted(_group(cells, "a", "b").items())
            ],
        )
        md.append("")
        exponent_figure(cells, to / f"exponents_r{r}_n{n}.png", f"γ = α·N^a/r^b, r = {r}, N = {n}")
    (to / "tables.md").write_text("\n".join(md) + "\n")
    flat = [{k: v for k, v in row.items() if k != "run"} for rows in parts.values() for row in rows]
    (to / "cells.json").write_text(json.dumps(flat, indent=1) + "\n")
