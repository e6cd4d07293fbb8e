"""A sweep's grid: its axes, its cells and the names of their run directories."""

from __future__ import annotations

import itertools
import json

import yaml

from ..errors import SfedloraError

# Short names for the axes a study varies most; any dotted config key works as well.
ALIASES = {
    "rank": "lora.rank",
    "r": "lora.rank",
    "alpha": "lora.alpha",
    "scaling": "lora.scaling",
    "a": "lora.n_exponent",  # γ = α·N^a/r^b under scaling=power
    "b": "lora.rank_exponent",
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
