"""Study v2 continues from its committed record (cells.json) on a checkout without runs/:
recorded cells count as finished, and the report tables them beside this machine's runs."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import study_v2  # noqa: E402
from study_v2_cells import load_part, read_record  # noqa: E402

GRID = {"clients": [5, 20], "lr": [0.05, 0.2, 0.8]}
RECORD = Path(__file__).resolve().parents[1] / "docs/results/study-v2/cells.json"


def test_only_the_cells_neither_recorded_nor_finished_here_run(tmp_path):
    recorded = {("budget", f"clients-5_lr-{lr}") for lr in GRID["lr"]}
    assert study_v2._todo(("budget", ["x=1"], GRID), tmp_path, recorded) == (
        "budget",
        ["x=1"],
        {"clients": [20], "lr": [0.05, 0.2, 0.8]},
    )
    # A cell finished on this machine counts as much as a recorded one.
    done = tmp_path / "budget/runs/clients-20_lr-0.05"
    done.mkdir(parents=True)
    (done / "summary.json").write_text("{}")
    assert study_v2._todo(("budget", [], GRID), tmp_path, recorded)[2] == {"clients": [20], "lr": [0.2, 0.8]}
    # What is left must be a grid: a sweep runs the product of its axes.
    with pytest.raises(SystemExit, match="^error: the cells of budget still to run form no grid"):
        study_v2._todo(("budget", [], GRID), tmp_path, recorded - {("budget", "clients-5_lr-0.8")})
    recorded |= {("budget", f"clients-20_lr-{lr}") for lr in (0.2, 0.8)}
    assert study_v2._todo(("budget", [], GRID), tmp_path, recorded)[2] == {}


def test_recorded_rows_fill_in_for_missing_run_directories(tmp_path):
    record = [
        {"sweep": "main-sfed-lora", "cell": "seed-0_clients-5_rank-8", "client_test": 0.9},
        {"sweep": "main-fedsa-lora", "cell": "seed-0_clients-5_rank-8", "client_test": 0.8},
        {"sweep": "tune", "cell": "method-sfed-lora_lr-0.2", "client_test": 0.7},
    ]
    (tmp_path / "cells.json").write_text(json.dumps(record))
    rows = load_part(tmp_path / "no-runs", "main-", read_record(tmp_path / "cells.json"))
    assert [r["sweep"] for r in rows] == ["main-fedsa-lora", "main-sfed-lora"]
    assert read_record(tmp_path / "none.json") == []


def test_the_committed_record_names_every_cell_once():
    rows = read_record(RECORD)
    keys = [(r["sweep"], r["cell"]) for r in rows]
    assert len(rows) >= 76 and len(set(keys)) == len(keys)
    assert {r["sweep"].split("-")[0] for r in rows} >= {"budget", "probe", "tune", "main", "side"}
