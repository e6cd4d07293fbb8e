"""Plots and a markdown report for a run or a sweep (``sfedlora report DIR``).

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
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import yaml
from matplotlib.ticker import MaxNLocator

from ..config import build_config
from ..driver.rundir import read_metrics
from ..errors import SfedloraError
from ..federated.evaluation import higher_is_better
from .grid import ALIASES, cell_name, grid_cells, value_text
from .sweep_summary import last_value

PANEL_KEYS = ("method", "rank", "client_ranks", "clients", "seed")


def _canonical(key: str) -> str:
    """Grid key → the panel role it plays (``lora.rank`` and ``r`` are both ``rank``)."""
    dotted = ALIASES.get(key, key)
    return {"lora.rank": "rank", "lora.client_ranks": "client_ranks", "federation.n_clients": "clients"}.get(
        dotted, key
    )


def _rank_setting(by_role: dict, base: dict) -> str:
    """A cell's ranks as a line label: ``8``, or ``2+8+32`` when clients have their own."""
    listed = by_role.get("client_ranks", base["lora"]["client_ranks"])
    return value_text(listed) if listed is not None else str(by_role.get("rank", base["lora"]["rank"]))


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


def _save(fig, out_dir: Path, stem: str) -> list[Path]:
    paths = [out_dir / f"{stem}.png", out_dir / f"{stem}.pdf"]
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
    metric = json.loads((run_dir / "summary.json").read_text())["metric"]
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


def plot_sweep(sweep_dir: Path, out_dir: Path) -> list[Path]:
    plt = _plt()
    spec = yaml.safe_load((sweep_dir / "sweep.yaml").read_text())
    base, grid = build_config(spec["base"]).model_dump(mode="json"), spec["grid"]
    role = {k: _canonical(k) for k in grid}
    extra = [k for k in grid if role[k] not in PANEL_KEYS]
    finished = []
    for cell in grid_cells(grid):
        run_dir = sweep_dir / "runs" / cell_name(cell)
        if (run_dir / "summary.json").is_file():
            by_role = {role[k]: v for k, v in cell.items()}
            finished.append(
                (cell, by_role, read_metrics(run_dir), json.loads((run_dir / "summary.json").read_text()))
            )
    if not finished:
        raise SfedloraError(f"{sweep_dir} has no finished runs to report")
    metric = finished[0][3]["metric"]
    paths = []
    for combo in itertools.product(*(grid[k] for k in extra)):
        chosen = [f for f in finished if all(f[0][k] == v for k, v in zip(extra, combo))]
        if not chosen:  # a partial sweep: nothing finished at this combination yet
            continue
        suffix = "".join(f"_{k.split('.')[-1]}-{value_text(v)}" for k, v in zip(extra, combo))
        methods = list(dict.fromkeys(f[1].get("method", base["method"]) for f in chosen))
        clients = list(dict.fromkeys(f[1].get("clients", base["federation"]["n_clients"]) for f in chosen))
        ranks = sorted({_rank_setting(f[1], base) for f in chosen}, key=_rank_order)
        runs_by_cell: dict[tuple, list] = {}
        finals: dict[tuple, list] = {}
        for _, by_role, records, summary in chosen:
            key = (
                by_role.get("method", base["method"]),
                by_role.get("clients", base["federation"]["n_clients"]),
                _rank_setting(by_role, base),
            )
            runs_by_cell.setdefault(key, []).append(records)
            finals.setdefault(key, []).append(summary["final"])
        for key, title, log_y in [
            (metric, f"{metric} vs round", False),
            ("train_loss", "training loss vs round", False),
            ("grad_norm_A", "A-gradient norm vs round", True),
            ("grad_norm_B", "B-gradient norm vs round", True),
        ]:
            fig = _grid_figure(
                plt, runs_by_cell, methods, clients, ranks, key, title + suffix.replace("_", " "), log_y
            )
            stem = "metric_vs_round" if key == metric else key.replace("train_loss", "train_loss_vs_round")
            paths += _save(fig, out_dir, stem + suffix)
            plt.close(fig)
        losses = {
            key: [last_value(recs, "train_loss") for recs in runs] for key, runs in runs_by_cell.items()
        }
        for key, values, stem in [(metric, finals, "heatmap"), ("train_loss", losses, "heatmap_train_loss")]:
            fig = _heatmap(plt, values, methods, clients, ranks, key)
            paths += _save(fig, out_dir, stem + suffix)
            plt.close(fig)
    return paths


def report(path: str | Path) -> Path:
    """Render the plots and ``report.md`` for a run directory or a sweep directory."""
    path = Path(path)
    if (path / "sweep.yaml").is_file():
        from .sweep_summary import write_summary

        spec = yaml.safe_load((path / "sweep.yaml").read_text())
        write_summary(path, spec["grid"], spec.get("target"))
        out_dir = path / "plots"
        out_dir.mkdir(exist_ok=True)
        pngs = [p for p in plot_sweep(path, out_dir) if p.suffix == ".png"]
        body = (path / "summary.md").read_text()
    elif (path / "summary.json").is_file():
        out_dir = path / "plots"
        out_dir.mkdir(exist_ok=True)
        pngs = [p for p in plot_run(path, out_dir) if p.suffix == ".png"]
        summary = json.loads((path / "summary.json").read_text())
        body = f"# Run {path.name}\n\n" + "\n".join(f"- **{k}**: {v}" for k, v in summary.items()) + "\n"
    else:
        raise SfedloraError(f"{path} is neither a finished run (summary.json) nor a sweep (sweep.yaml)")
    figures = "\n".join(f"![{p.stem}](plots/{p.name})" for p in pngs)
    out = path / "report.md"
    out.write_text(body + "\n## Figures\n\n" + figures + "\n")
    return out
