"""Plots and a markdown report for a run, a sweep or a sweep's record (``sfedlora report PATH``).

Sweep figures (PNG and PDF, mean ± std band over seeds):
- ``metric_vs_round``: one panel per method (columns) and client count (rows), a line per rank;
- ``train_loss_vs_round``, ``grad_norm_A`` / ``grad_norm_B`` (log scale): the same layout;
- ``heatmap``: final metric over clients × rank, a panel per method; ``heatmap_train_loss``:
  the same for the last round's training loss, which shows whether the adapter learns even
  where a dev metric cannot tell (a client fitting its own label mix, say).
With per-client ranks (``lora.client_ranks``) as an axis, a line (and a heatmap column) is
a rank setting: ``8`` for one rank, ``2+8+32`` for clients of ranks 2, 8 and 32.
Axes beyond method, rank, client ranks, clients and seed (learning rate, optimizer, ...) give one set of
figures per combination, named after it.
A sweep's record (:mod:`sfedlora.results.record`) gives the same tables and figures as its directory.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
from matplotlib.ticker import MaxNLocator

from ..driver.rundir import read_metrics, read_summary
from ..errors import SfedloraError
from ..federated.keys import higher_is_better
from .grid import ALIASES, value_text
from .record import Run, Sweep, open_sweep, sweep_record, write_record
from .sweep_summary import last_value, write_summary

PANEL_KEYS = ("method", "rank", "client_ranks", "clients", "seed")
FORMATS = ("png", "pdf")


def _canonical(key: str) -> str:
    """Grid key → the panel role it plays (``lora.rank`` and ``r`` are both ``rank``)."""
    dotted = ALIASES.get(key, key)
    return {"lora.rank": "rank", "lora.client_ranks": "client_ranks", "federation.n_clients": "clients"}.get(
        dotted, key
    )


def _panel(run: Run, role: dict) -> tuple:
    """Where a run goes in the figures: its method, client count and rank setting (a line
    label: ``8``, or ``2+8+32`` when clients have their own ranks)."""
    by_role = {role[k]: v for k, v in run.cell.items()}
    cfg = run.config
    listed = by_role.get("client_ranks", cfg["lora"].get("client_ranks"))
    ranks = value_text(listed) if listed is not None else str(by_role.get("rank", cfg["lora"]["rank"]))
    return (
        by_role.get("method", cfg["method"]),
        by_role.get("clients", cfg["federation"]["n_clients"]),
        ranks,
    )


def _rank_order(label: str) -> tuple:
    parts = [int(p) for p in label.split("+")]
    return (max(parts), len(parts), parts)


def _series(runs: list[list[dict]], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rounds, mean and std over runs of ``key`` at the rounds every run recorded it."""
    per_run = [{r["round"]: r[key] for r in recs if r.get(key) is not None} for recs in runs]
    rounds = sorted(set.intersection(*(set(p) for p in per_run))) if per_run else []
    values = np.array([[p[t] for t in rounds] for p in per_run], dtype=float).reshape(
        len(per_run), len(rounds)
    )
    return np.array(rounds), values.mean(0), values.std(0)


def _save(fig, out_dir: Path, stem: str, formats=FORMATS) -> list[Path]:
    paths = [out_dir / f"{stem}.{f}" for f in formats]
    for p in paths:
        fig.savefig(p, dpi=120 if p.suffix == ".png" else None, bbox_inches="tight")
    return paths


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def plot_run(run_dir: Path, out_dir: Path) -> list[Path]:
    plt = _plt()
    records = read_metrics(run_dir)
    metric = read_summary(run_dir)["metric"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, keys, title in zip(
        axes,
        [[metric], ["train_loss"], ["grad_norm_A", "grad_norm_B"]],
        ["dev metric", "training loss", "gradient norm"],
    ):
        for key in keys:
            t, m, _ = _series([records], key)
            ax.plot(t, m, marker="o" if len(t) < 30 else None, label=key)
        ax.set_title(title)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=8)
    axes[2].set_yscale("log")
    paths = _save(fig, out_dir, "run")
    plt.close(fig)
    return paths


def _grid_figure(plt, runs_by_cell, methods, clients, ranks, key, title, log_y=False):
    fig, axes = plt.subplots(
        len(clients),
        len(methods),
        figsize=(3.6 * len(methods), 2.8 * len(clients)),
        squeeze=False,
        sharex=True,
        sharey=not log_y,
    )
    colours = plt.cm.viridis(np.linspace(0, 0.9, max(1, len(ranks))))
    for (i, n), (j, method) in itertools.product(enumerate(clients), enumerate(methods)):
        ax = axes[i][j]
        for colour, r in zip(colours, ranks):
            runs = runs_by_cell.get((method, n, r))
            if not runs:
                continue
            t, m, s = _series(runs, key)
            if len(t) == 0:
                continue
            ax.plot(t, m, color=colour, label=f"r={r}")
            ax.fill_between(t, m - s, m + s, color=colour, alpha=0.2)
        ax.set_title(f"{method}" + (f", N={n}" if n is not None else ""), fontsize=9)
        if log_y:
            ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if i == len(clients) - 1:
            ax.set_xlabel("round")
    # One legend for the figure: in a partial sweep any panel may be empty.
    labelled = {label: h for ax in axes.flat for h, label in zip(*ax.get_legend_handles_labels())}
    fig.suptitle(title)
    fig.tight_layout()
    if labelled:
        fig.legend(
            list(labelled.values()), list(labelled), fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5)
        )
    return fig


def colour_scale(metric: str, values: list) -> dict:
    """Heatmap colours, green for good, one scale for every panel: accuracies on a fixed
    0.4-1; a loss or perplexity from its smallest to its largest value, colours reversed."""
    if higher_is_better(metric):
        return {"vmin": 0.4, "vmax": 1.0, "cmap": "RdYlGn"}
    finite = [v for v in values if v is not None and np.isfinite(v)]
    return {"vmin": min(finite, default=0.0), "vmax": max(finite, default=1.0), "cmap": "RdYlGn_r"}


def _heatmap(plt, values: dict[tuple, list], methods, clients, ranks, metric: str):
    """Mean over seeds of ``values[(method, clients, rank)]``: clients × rank, a panel per method."""
    fig, axes = plt.subplots(
        1, len(methods), figsize=(3.4 * len(methods), 0.6 * len(clients) + 2), squeeze=False
    )
    for j, (ax, method) in enumerate(zip(axes[0], methods)):
        table = np.array(
            [
                [
                    np.mean([v for v in values.get((method, n, r), []) if v is not None] or [np.nan])
                    for r in ranks
                ]
                for n in clients
            ]
        )
        im = ax.imshow(
            table, aspect="auto", **colour_scale(metric, [v for vs in values.values() for v in vs])
        )
        ax.set_xticks(range(len(ranks)), [str(r) for r in ranks])
        ax.set_yticks(range(len(clients)), [str(n) for n in clients])
        ax.set_xlabel("rank r")
        # The panels share their rows; a label on each would run into its left neighbour.
        if j == 0:
            ax.set_ylabel("clients N")
        ax.set_title(method, fontsize=9)
        for (a, b), v in np.ndenumerate(table):
            if np.isfinite(v):
                ax.text(b, a, f"{v:.2f}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label=f"final {metric}")
    return fig


def plot_sweep(sweep: Sweep, out_dir: Path, only: set[str] | None = None, formats=FORMATS) -> list[Path]:
    """The sweep's figures (see the module's docstring); ``only``: just the figures of these names."""
    plt = _plt()
    grid = sweep.grid
    role = {k: _canonical(k) for k in grid}
    extra = [k for k in grid if role[k] not in PANEL_KEYS]
    metric = sweep.runs[0].summary["metric"]
    paths = []

    def wanted(stem: str) -> bool:
        return only is None or stem in only

    def save(fig, stem: str) -> None:
        paths.extend(_save(fig, out_dir, stem, formats))
        plt.close(fig)

    for combo in itertools.product(*(grid[k] for k in extra)):
        chosen = [run for run in sweep.runs if all(run.cell[k] == v for k, v in zip(extra, combo))]
        if not chosen:  # a partial sweep: nothing finished at this combination yet
            continue
        suffix = "".join(f"_{k.split('.')[-1]}-{value_text(v)}" for k, v in zip(extra, combo))
        # A panel's method, client count and ranks: the cell's where the grid varies them, the
        # run's resolved config where it does not.
        panels = [(run, _panel(run, role)) for run in chosen]
        methods = list(dict.fromkeys(key[0] for _, key in panels))
        clients = list(dict.fromkeys(key[1] for _, key in panels))
        ranks = sorted({key[2] for _, key in panels}, key=_rank_order)
        runs_by_cell: dict[tuple, list] = {}
        finals: dict[tuple, list] = {}
        for run, key in panels:
            runs_by_cell.setdefault(key, []).append(run.metrics)
            finals.setdefault(key, []).append(run.summary["final"])
        for key, title, log_y in [
            (metric, f"{metric} vs round", False),
            ("train_loss", "training loss vs round", False),
            ("grad_norm_A", "A-gradient norm vs round", True),
            ("grad_norm_B", "B-gradient norm vs round", True),
        ]:
            stem = "metric_vs_round" if key == metric else key.replace("train_loss", "train_loss_vs_round")
            if wanted(stem + suffix):
                fig = _grid_figure(
                    plt, runs_by_cell, methods, clients, ranks, key, title + suffix.replace("_", " "), log_y
                )
                save(fig, stem + suffix)
        losses = {
            key: [last_value(recs, "train_loss") for recs in runs] for key, runs in runs_by_cell.items()
        }
        for key, values, stem in [(metric, finals, "heatmap"), ("train_loss", losses, "heatmap_train_loss")]:
            if wanted(stem + suffix):
                save(_heatmap(plt, values, methods, clients, ranks, key), stem + suffix)
    return paths


def report(path: str | Path, only: set[str] | None = None, record: str | Path | None = None) -> Path:
    """Render the tables and figures of a run directory, a sweep directory or a sweep's record.

    A run or a sweep directory gets ``plots/`` (PNG and PDF) and ``report.md``, a sweep its
    ``summary.csv`` and ``summary.md`` too. A record file gets ``summary.csv``, ``summary.md``
    and PNG figures beside it: the layout a study publishes in docs/results/. ``only``: just
    the figures of these names; ``record``: also write the sweep's record to that file.
    """
    path = Path(path)
    if path.is_file() or (path / "sweep.yaml").is_file():
        sweep = open_sweep(path)
        if not sweep.runs:
            raise SfedloraError(f"{path} has no finished runs to report")
        if record is not None:
            write_record(record, sweep_record(sweep))
        if path.is_file():
            write_summary(sweep, path.parent)
            plot_sweep(sweep, path.parent, only, formats=("png",))
            return path.parent / "summary.md"
        write_summary(sweep, path)
        out_dir = path / "plots"
        out_dir.mkdir(exist_ok=True)
        pngs = [p for p in plot_sweep(sweep, out_dir, only) if p.suffix == ".png"]
        body = (path / "summary.md").read_text()
    elif (path / "summary.json").is_file():
        if record is not None:
            raise SfedloraError(
                f"{path} is a single run, and --record writes a sweep's: give its sweep directory"
            )
        summary, _ = read_summary(path), read_metrics(path)  # both read back before anything is written
        out_dir = path / "plots"
        out_dir.mkdir(exist_ok=True)
        pngs = [p for p in plot_run(path, out_dir) if p.suffix == ".png"]
        body = f"# Run {path.name}\n\n" + "\n".join(f"- **{k}**: {v}" for k, v in summary.items()) + "\n"
    else:
        raise SfedloraError(
            f"{path} is neither a finished run (summary.json), a sweep (sweep.yaml) nor a sweep's record file"
        )
    figures = "\n".join(f"![{p.stem}](plots/{p.name})" for p in pngs)
    out = path / "report.md"
    out.write_text(body + "\n## Figures\n\n" + figures + "\n")
    return out
