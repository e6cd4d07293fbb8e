"""Grids of runs: one run directory per cell, worker processes, finished cells skipped.

    <sweep>/sweep.yaml          the base config and the grid
    <sweep>/runs/<cell>/        an ordinary run directory per cell
    <sweep>/summary.csv         one row per cell
    <sweep>/summary.md          cells grouped over seeds: mean ± std

Re-running the same sweep skips cells that finished, resumes cells that have a checkpoint
and starts the rest, so a stopped sweep continues where it was.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from functools import partial
from multiprocessing import get_context
from pathlib import Path

import yaml

from ..config import apply_overrides, build_config, read_yaml_mapping
from ..driver.rundir import RunLock
from ..errors import SfedloraError
from .grid import cell_name, cell_overrides, grid_cells, hashable, parse_grid
from .record import read_sweep, read_sweep_spec
from .sweep_summary import write_summary

log = logging.getLogger("sfedlora")


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


def cell_finished(runs_dir: str | Path, cell: dict) -> bool:
    """A cell is finished once its run wrote ``summary.json``, a run's last act."""
    return (Path(runs_dir) / cell_name(cell) / "summary.json").is_file()


def threads_per_job(jobs: int) -> int:
    """Each of ``jobs`` side-by-side cells' torch threads: the machine's cores shared among them."""
    return max(1, (os.cpu_count() or 1) // jobs)


def _run_cell(base: dict, cell: dict, runs_dir: str, threads: int) -> str:
    """Run (or resume, or skip) one cell; returns its run directory. Runs in a worker."""
    import torch

    from ..driver.experiment import run
    from ..logs import quiet_libraries

    quiet_libraries()
    torch.set_num_threads(threads)
    run_dir = Path(runs_dir) / cell_name(cell)
    if cell_finished(runs_dir, cell):
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
    threads: int | None = None,
) -> list[Path]:
    """Run every cell of the grid (``jobs`` at a time); returns the run directories.

    ``target`` is the metric value whose first-reaching round the summary reports;
    ``threads`` each cell's torch threads (default: the cores shared among the jobs; fewer
    where several sweeps run side by side).
    """
    sweep_dir = Path(sweep_dir)
    spec_path = sweep_dir / "sweep.yaml"
    # A sweep may be run part by part: a grid that narrows the stored one (or widens it)
    # shares its cells; the summary always covers the widest grid seen.
    summary_grid = grid
    if spec_path.is_file():
        old = read_sweep_spec(spec_path)
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
    threads = threads or threads_per_job(jobs)
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
            skipped = cell_finished(runs_dir, cell)
            finished(cell, partial(_run_cell, base, cell, str(runs_dir), threads), skipped)
    else:
        with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(_run_cell, base, cell, str(runs_dir), threads): cell for cell in cells}
            for future in as_completed(futures):
                finished(futures[future], future.result, False)
    # sweep.yaml, written above, holds summary_grid and target.
    write_summary(read_sweep(sweep_dir), sweep_dir)
    if failed:
        raise SfedloraError(
            f"{len(failed)} of {len(cells)} cells failed (the others finished and are summarised), "
            f"first {failed[0]}; fix them and run the sweep again"
        )
    return done
