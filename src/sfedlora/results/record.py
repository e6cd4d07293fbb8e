"""A study's results as one compact file: the record a report regenerates its tables and figures from.

A sweep directory holds a run directory per cell (config.yaml, metrics.jsonl, summary.json,
partition.json, checkpoints); a finished study keeps only its record, a JSON file (gzipped
when named ``*.json.gz``) of every finished cell:

- ``sweep``, ``spec`` (the sweep's name and its sweep.yaml: base, grid, target);
- ``config``: the resolved config every run shares;
- ``runs``: per finished cell, in grid order, its ``cell`` (grid values), ``config`` (the dotted
  keys in which its resolved config differs from the shared one, its name among them),
  ``summary`` (summary.json), ``metrics`` (metrics.jsonl's rows) and ``partition``.

Nothing a report reads is lost: the runs read back from a record equal those read from their
directories. The same reader and writer serve study v2's record (scripts/study_v2_cells.py).
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..driver.rundir import RESTORE, read_json, read_metrics, read_summary
from ..errors import SfedloraError, reading
from .grid import cell_name, grid_cells


@dataclass(frozen=True)
class Run:
    """A finished run as a report reads it."""

    cell: dict  # the run's grid values ({} for a run outside a sweep)
    config: dict  # the resolved config (config.yaml)
    summary: dict
    metrics: list[dict]  # metrics.jsonl's rows, one per round
    partition: dict | None = None


@dataclass(frozen=True)
class Sweep:
    """A sweep's finished runs, from its directory or its record."""

    name: str
    spec: dict  # sweep.yaml: base, grid, target
    runs: list[Run]

    @property
    def grid(self) -> dict:
        return self.spec["grid"]

    @property
    def target(self) -> float | None:
        return self.spec.get("target")


def read_run(run_dir: str | Path, cell: dict | None = None) -> Run:
    run_dir = Path(run_dir)
    partition = run_dir / "partition.json"
    config = run_dir / "config.yaml"
    with reading(config, "run config", RESTORE):
        tree = yaml.safe_load(config.read_text(encoding="utf-8"))
        if not isinstance(tree, dict):
            raise ValueError("not a mapping")
    return Run(
        cell=cell or {},
        config=tree,
        summary=read_summary(run_dir),
        metrics=read_metrics(run_dir),
        partition=read_json(partition, "partition") if partition.is_file() else None,
    )


def read_sweep_spec(path: Path) -> dict:
    """A sweep's sweep.yaml (its base config, grid and target), as `sfedlora sweep` wrote it."""
    with reading(path, "sweep spec", "restore it from a copy, or start the sweep again under a new --name"):
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
        if not isinstance(spec, dict) or not isinstance(spec["grid"], dict):
            raise ValueError("no grid")
    return spec


def read_sweep(sweep_dir: str | Path) -> Sweep:
    """A sweep directory's finished cells (summary.json written), in grid order."""
    sweep_dir = Path(sweep_dir)
    spec = read_sweep_spec(sweep_dir / "sweep.yaml")
    runs = [
        read_run(sweep_dir / "runs" / cell_name(cell), cell)
        for cell in grid_cells(spec["grid"])
        if (sweep_dir / "runs" / cell_name(cell) / "summary.json").is_file()
    ]
    return Sweep(sweep_dir.name, spec, runs)


def write_record(path: str | Path, obj) -> Path:
    """``obj`` as JSON at ``path``, gzipped for a ``.gz`` name (byte for byte the same on a rewrite)."""
    path = Path(path)
    text = json.dumps(obj, indent=1) + "\n"
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.encode(), compresslevel=9, mtime=0))
    else:
        path.write_text(text)
    return path


def read_record(path: str | Path):
    """What :func:`write_record` wrote."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        return json.loads(gzip.decompress(raw) if path.suffix == ".gz" else raw)
    except FileNotFoundError:
        raise SfedloraError(f"record {path} not found: give the path of a record file") from None
    except (OSError, EOFError, ValueError) as err:
        raise SfedloraError(
            f"record {path} is damaged ({type(err).__name__}): restore it (git checkout -- {path}) "
            "or write it again with sfedlora report SWEEP --record"
        ) from None


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _nest(flat: dict) -> dict:
    tree: dict = {}
    for dotted, value in flat.items():
        *parents, leaf = dotted.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def sweep_record(sweep: Sweep) -> dict:
    """The record of ``sweep`` (see the module's docstring)."""
    flat = [_flatten(run.config) for run in sweep.runs]
    shared = {k: v for k, v in flat[0].items() if all(k in f and f[k] == v for f in flat)} if flat else {}
    return {
        "sweep": sweep.name,
        "spec": sweep.spec,
        "config": _nest(shared),
        "runs": [
            {
                "cell": run.cell,
                "config": {k: v for k, v in f.items() if k not in shared},
                "summary": run.summary,
                "metrics": run.metrics,
                "partition": run.partition,
            }
            for run, f in zip(sweep.runs, flat)
        ],
    }


def sweep_of_record(path: str | Path) -> Sweep:
    """The sweep a record file holds."""
    record = read_record(path)
    fields = ("sweep", "spec", "config", "runs")
    missing = [k for k in fields if not isinstance(record, dict) or k not in record]
    if missing:
        raise SfedloraError(
            f"{path} is not a sweep's record (no {', '.join(missing)}): give a record written by "
            "sfedlora report SWEEP --record FILE"
        )
    shared = _flatten(record["config"])
    try:
        runs = [
            Run(r["cell"], _nest(shared | r["config"]), r["summary"], r["metrics"], r.get("partition"))
            for r in record["runs"]
        ]
    except (KeyError, TypeError) as err:
        raise SfedloraError(
            f"record {path} is damaged (a run without {err}): restore it (git checkout -- {path}) "
            "or write it again with sfedlora report SWEEP --record"
        ) from None
    return Sweep(record["sweep"], record["spec"], runs)


def open_sweep(path: str | Path) -> Sweep:
    """A sweep from its directory (holding sweep.yaml) or its record file."""
    path = Path(path)
    return read_sweep(path) if (path / "sweep.yaml").is_file() else sweep_of_record(path)
