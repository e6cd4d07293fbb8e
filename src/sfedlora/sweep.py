"""Grids of runs: one run directory per cell, worker processes, finished cells skipped.

    <sweep>/sweep.yaml          the base config and the grid
    <sweep>/runs/<cell>/        an ordinary run directory per cell
    <sweep>/summary.csv         one row per cell
    <sweep>/summary.md          cells grouped over seeds: mean ± std

Re-running the same sweep skips cells that finished, resumes cells that have a checkpoint
and starts the rest, so a stopped sweep continues where it was.
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
import math
import os
import shutil
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import yaml

from .collapse import detect
from .config import apply_overrides, build_config, read_yaml_mapping
from .errors import SfedloraError
from .evaluation import higher_is_better
from .rundir import RunLock, read_metrics

log = logging.getLogger("sfedlora")

# Short names for the axes a study varies most; any dotted config key works as well.
ALIASES = {
    "rank": "lora.rank",
    "r": "lora.rank",
    "alpha": "lora.alpha",
    "scaling": "lora.scaling",
    "client_ranks": "lora.client_ranks",
    "clients": "federation.n_clients",
    "n": "federation.n_clients",
    "rounds": "federation.rounds",
    "lr": "train.lr",
    "optimizer": "train.optimizer",
    "momentum": "train.momentum",
    "beta": "partition.beta",
}


def parse_grid(text: str) -> dict[str, list]:
    """``"method=a,b rank=4,8"`` → ``{"method": ["a", "b"], "rank": [4, 8]}`` (values typed by YAML)."""
    grid: dict[str, list] = {}
    for item in text.split():
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise SfedloraError(f"bad grid axis {item!r}: write it as key=v1,v2, e.g. rank=4,8,32")
        if key in grid:
            raise SfedloraError(f"grid axis {key!r} appears twice")
        try:
            grid[key] = [yaml.safe_load(v) for v in raw.split(",") if v != ""]
        except yaml.YAMLError:
            raise SfedloraError(f"grid axis {key!r}: values {raw!r} are not valid YAML scalars") from None
        if not grid[key]:
            raise SfedloraError(f"grid axis {key!r} has no values: write {key}=v1,v2")
    return grid


def grid_cells(grid: dict[str, list]) -> list[dict]:
    """Every combination of the grid's values, the first axis varying slowest."""
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


def value_text(value) -> str:
    """A grid value as it appears in names: lists (say per-client ranks) as ``2+8+32``."""
    return "+".join(str(v) for v in value) if isinstance(value, list) else str(value)


def hashable(value):
    """A grid value usable as a dict key or set member (lists become tuples)."""
    return tuple(value) if isinstance(value, list) else value


def cell_name(cell: dict) -> str:
    """Directory name of a cell: ``rank-8_seed-0``; a key's last part, unless two keys share it."""
    last = [k.split(".")[-1] for k in cell]
    return "_".join(
        f"{s if last.count(s) == 1 else k}-{value_text(v)}" for k, s, v in zip(cell, last, cell.values())
    )


def cell_overrides(cell: dict) -> list[str]:
    # Strings as they are; anything else as JSON, which YAML reads back to the same value
    # (None → null, True → true, lists).
    return [f"{ALIASES.get(k, k)}={v if isinstance(v, str) else json.dumps(v)}" for k, v in cell.items()]


def load_sweep(
    path: str | Path | None, grid_text: str | None, overrides: list[str] | tuple[str, ...] = ()
) -> tuple[dict, dict]:
    """The base config tree (raw, unresolved) and the grid: from a YAML file with an
    optional ``grid:`` section, overridden by ``--grid`` text and ``--set`` overrides."""
    tree = read_yaml_mapping(path) if path is not None else {}
    grid_tree = tree.pop("grid", None) or {}
    if not isinstance(grid_tree, dict):
        raise SfedloraError(
            f"the grid: section of {path} must map axes to lists of values, e.g. rank: [4, 8]"
        )
    grid = {k: list(v) if isinstance(v, list) else [v] for k, v in grid_tree.items()}
    if grid_text:
        grid.update(parse_grid(grid_text))
    if not grid:
        raise SfedloraError(
            'the sweep has no grid: pass --grid "method=... rank=..." or a grid: section in the YAML'
        )
    # The base stays a raw tree: resolving it would pin a preset's scaling rule (say
    # sfed-lora's sfed) and carry it into cells of another method.
    base = apply_overrides(tree, overrides)
    build_config(base)
    for cell in grid_cells(grid):  # every cell must be a valid config before any runs
        try:
            build_config(base, cell_overrides(cell))
        except SfedloraError as err:
            raise SfedloraError(f"grid cell {cell_name(cell)}: {err}") from None
    return base, grid


def _run_cell(base: dict, cell: dict, runs_dir: str, threads: int) -> str:
    """Run (or resume, or skip) one cell; returns its run directory. Runs in a worker."""
    import torch

    from .experiment import run
    from .logs import quiet_libraries

    quiet_libraries()
    torch.set_num_threads(threads)
    run_dir = Path(runs_dir) / cell_name(cell)
    if (run_dir / "summary.json").is_file():
        return str(run_dir)
    # Cells running side by side write to one terminal: each warning names its cell.
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(f"{cell_name(cell)}: %(message)s"))
    log.addHandler(handler)
    try:
        if (run_dir / "checkpoint.pt").is_file():
            run(None, resume=run_dir)
        else:
            if run_dir.exists():  # started but not one round checkpointed: nothing to keep
                with RunLock(run_dir):  # unless another sweep process is running it right now
                    pass
                shutil.rmtree(run_dir)
            run(
                build_config(
                    base, [*cell_overrides(cell), f"output_dir={runs_dir}", f"name={cell_name(cell)}"]
                )
            )
    finally:
        log.removeHandler(handler)
    return str(run_dir)


def _within(part: dict, whole: dict) -> bool:
    """Same axes in the same order, each with a subset of ``whole``'s values."""
    return list(part) == list(whole) and all(
        {hashable(v) for v in part[k]} <= {hashable(v) for v in whole[k]} for k in part
    )


def run_sweep(
    base: dict,
    grid: dict,
    sweep_dir: str | Path,
    jobs: int = 1,
    on_cell: Callable[[dict, Path, bool], None] | None = None,
    target: float | None = None,
) -> list[Path]:
    """Run every cell of the grid (``jobs`` at a time); returns the run directories.

    ``target`` is the metric value whose first-reaching round the summary reports.
    """
    sweep_dir = Path(sweep_dir)
    spec_path = sweep_dir / "sweep.yaml"
    # A sweep may be run part by part: a grid that narrows the stored one (or widens it)
    # shares its cells; the summary always covers the widest grid seen.
    summary_grid = grid
    if spec_path.is_file():
        old = yaml.safe_load(spec_path.read_text())
        stored = old.get("grid") or {}
        if old.get("base") != base or not (_within(grid, stored) or _within(stored, grid)):
            raise SfedloraError(
                f"{sweep_dir} holds a different sweep (its sweep.yaml differs): choose another --name, "
                "or narrow its grid with --grid using its own axes and values"
            )
        if _within(grid, stored):
            summary_grid = stored
    sweep_dir.mkdir(parents=True, exist_ok=True)
    spec_path.write_text(
        yaml.safe_dump({"base": base, "grid": summary_grid, "target": target}, sort_keys=False)
    )
    runs_dir = sweep_dir / "runs"
    cells = grid_cells(grid)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    done, failed = [], []

    def finished(cell: dict, result: Callable[[], str], skipped: bool) -> None:
        # A cell that fails is reported at once and the others go on: one bad cell must
        # not stop (or, with a pool, silence) a sweep of hours.
        try:
            done.append(Path(result()))
        except Exception as err:  # noqa: BLE001 - any failure of one cell, reported with its kind
            reason = str(err) if isinstance(err, SfedloraError) else f"{type(err).__name__}: {err}"
            failed.append(f"{cell_name(cell)}: {reason}")
            log.error("cell %s failed: %s", cell_name(cell), reason)
            return
        if on_cell:
            on_cell(cell, done[-1], skipped)

    if jobs == 1:
        for cell in cells:
            skipped = (runs_dir / cell_name(cell) / "summary.json").is_file()
            finished(cell, lambda: _run_cell(base, cell, str(runs_dir), threads), skipped)
    else:
        with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(_run_cell, base, cell, str(runs_dir), threads): cell for cell in cells}
            for future in as_completed(futures):
                finished(futures[future], future.result, False)
    write_summary(sweep_dir, summary_grid, target)
    if failed:
        raise SfedloraError(
            f"{len(failed)} of {len(cells)} cells failed (the others finished and are summarised), "
            f"first {failed[0]}; fix them and run the sweep again"
        )
    return done


def last_value(records: list[dict], key: str):
    """The last recorded (not None) value of ``key``."""
    return next((r[key] for r in reversed(records) if r.get(key) is not None), None)


def cell_row(cell: dict, run_dir: Path, target: float | None = None) -> dict:
    """One summary row: the cell's values and what its run reached."""
    summary = json.loads((run_dir / "summary.json").read_text())
    records = read_metrics(run_dir)
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
    collapse = detect(
        records, summary["collapse_metric"], summary.get("majority_baseline"), summary["rounds"]
    )
    return {
        **cell,
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
        "collapsed": collapse is not None,
        "collapse_reason": collapse.reason if collapse else "",
        "wall_seconds": summary["wall_seconds"],
    }


def _mean_std(values: list) -> str:
    xs = [float(v) for v in values if v is not None and v != "" and math.isfinite(float(v))]
    if not xs:
        return "–"
    return f"{np.mean(xs):.4f}" if len(xs) == 1 else f"{np.mean(xs):.4f} ± {np.std(xs, ddof=1):.4f}"


def write_summary(sweep_dir: Path, grid: dict, target: float | None = None) -> list[dict]:
    """``summary.csv`` (a row per finished cell) and ``summary.md`` (mean ± std over seeds)."""
    rows = []
    for cell in grid_cells(grid):
        run_dir = sweep_dir / "runs" / cell_name(cell)
        if (run_dir / "summary.json").is_file():
            rows.append(cell_row(cell, run_dir, target))
    if not rows:
        return rows
    with (sweep_dir / "summary.csv").open("w", newline="") as f:
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
        f"# Sweep summary: {sweep_dir.name}",
        "",
        f"{len(rows)} finished runs; mean ± std over seeds (n = runs per row).",
        "",
        "| " + " | ".join(group_keys + ["n"] + stats + ["collapsed"]) + " |",
        "|" + "---|" * (len(group_keys) + len(stats) + 2),
    ]
    for key, members in groups.items():
        collapsed = sum(m["collapsed"] for m in members)
        cells = (
            [value_text(list(v) if isinstance(v, tuple) else v) for v in key]
            + [str(len(members))]
            + [_mean_std([m[s] for m in members]) for s in stats]
        )
        lines.append("| " + " | ".join(cells + [f"{collapsed}/{len(members)}"]) + " |")
    lines += _learning_rate_views(rows, grid)
    (sweep_dir / "summary.md").write_text("\n".join(lines) + "\n")
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
