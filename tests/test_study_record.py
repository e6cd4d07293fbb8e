"""Study v2 continues from its committed record (cells.json) on a checkout without runs/:
recorded cells count as finished, and the report tables them beside this machine's runs."""

import json
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import study_v2  # noqa: E402
from study_v2_cells import load_part, read_record  # noqa: E402
from study_v2_report import report  # noqa: E402

GRID = {"clients": [5, 20], "lr": [0.05, 0.2, 0.8]}
RECORD = Path(__file__).resolve().parents[1] / "docs/results/study-v2/cells.json"


def finish(out, sweep, cell):
    (out / sweep / "runs" / cell).mkdir(parents=True)
    (out / sweep / "runs" / cell / "summary.json").write_text("{}")


def test_recorded_cells_leave_the_grid_and_cells_finished_here_stay_in_it(tmp_path):
    recorded = {("budget", f"clients-5_lr-{lr}") for lr in GRID["lr"]}
    todo = study_v2._todo(("budget", ["x=1"], GRID), tmp_path, recorded)
    assert todo == ("budget", ["x=1"], {"clients": [20], "lr": [0.05, 0.2, 0.8]})
    # A cell finished here stays in the grid (the sweep skips it; its stored grid only narrows
    # or widens), so a study stopped in any order resumes, with or without a record.
    finish(tmp_path, "budget", "clients-20_lr-0.05")
    todo = study_v2._todo(("budget", [], GRID), tmp_path, recorded)
    assert todo[2] == {"clients": [20], "lr": [0.05, 0.2, 0.8]}
    assert len(study_v2._unfinished(todo, tmp_path)) == 2
    finish(tmp_path, "budget", "clients-5_lr-0.2")
    assert study_v2._todo(("budget", [], GRID), tmp_path, set())[2] == GRID
    assert len(study_v2._unfinished(("budget", [], GRID), tmp_path)) == 4
    # A widened grid (a second seed) keeps the seed that ran here.
    finish(tmp_path, "pair", "seed-0")
    assert study_v2._todo(("pair", [], {"seed": [0, 1]}), tmp_path, set())[2] == {"seed": [0, 1]}
    # What is left must be a grid: a sweep runs the product of its axes.
    with pytest.raises(SystemExit, match="^error: the cells of budget left to run form no grid"):
        study_v2._todo(("budget", [], GRID), tmp_path, {("budget", "clients-5_lr-0.8")})


def test_a_run_directory_here_wins_over_its_recorded_row(tmp_path):
    run = tmp_path / "runs/main-sfed-lora/runs/seed-0_clients-5_rank-8"
    run.mkdir(parents=True)
    config = {
        "method": "sfed-lora",
        "seed": 0,
        "lora": {"scaling": "sfed", "rank": 8},
        "federation": {"n_clients": 5, "rounds": 2, "local_head": False, "head_probe_rounds": 1},
        "train": {"lr": 0.2, "optimizer": "sgd"},
        "partition": {"kind": "dirichlet"},
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    rounds = [{"round": 1}, {"round": 2, "client_test_accuracy_mean": 0.95}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rounds))
    summary = {"metric": "personal_accuracy_mean", "wall_seconds": 3.0, "client_test_majority_accuracy": 0.9}
    (run / "summary.json").write_text(json.dumps(summary))
    record = [
        {"sweep": "main-sfed-lora", "cell": "seed-0_clients-5_rank-8", "client_test": 0.5},
        {"sweep": "main-fedsa-lora", "cell": "seed-0_clients-5_rank-8", "client_test": 0.8},
        {"sweep": "tune", "cell": "method-sfed-lora_lr-0.2", "client_test": 0.7},
    ]
    (tmp_path / "cells.json").write_text(json.dumps(record))
    rows = load_part(tmp_path / "runs", "main-", read_record(tmp_path / "cells.json"))
    assert [(r["sweep"], r["client_test"]) for r in rows] == [
        ("main-fedsa-lora", 0.8),
        ("main-sfed-lora", 0.95),
    ]
    assert rows[1]["over_majority"] == pytest.approx(0.05)
    assert read_record(tmp_path / "none.json") == []


def test_a_report_from_the_record_alone_writes_the_record_back_unchanged(tmp_path):
    (tmp_path / "cells.json").write_bytes(RECORD.read_bytes())
    report(tmp_path / "no-runs", tmp_path)
    assert json.loads((tmp_path / "cells.json").read_text()) == json.loads(RECORD.read_text())
    tables = (tmp_path / "tables.md").read_text()
    assert "## Main grid" in tables and "## Exponents at r = 512, N = 20" in tables
    assert (tmp_path / "accuracy_vs_rank.png").stat().st_size > 0


def test_the_committed_record_names_every_cell_once():
    rows = read_record(RECORD)
    keys = [(r["sweep"], r["cell"]) for r in rows]
    assert len(rows) >= 76 and len(set(keys)) == len(keys)
    assert {r["sweep"].split("-")[0] for r in rows} >= {"budget", "probe", "tune", "main", "side"}


@pytest.mark.parametrize(
    "content", [b'[{"sweep": "main-x", "cell"', b'{"rows": []}', b'[{"sweep": "main-x"}]']
)
def test_a_damaged_or_foreign_record_ends_the_script_in_one_error_line(
    tmp_path, monkeypatch, capsys, content
):
    """Cut short, of another shape, or rows of another version: one line, exit 2, the record untouched."""
    (tmp_path / "cells.json").write_bytes(content)
    monkeypatch.setattr(
        sys, "argv", ["study_v2.py", "run", "--to", str(tmp_path), "--out", str(tmp_path / "o")]
    )
    with pytest.raises(SystemExit) as stop:
        study_v2.main()
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error: record ")
    assert str(tmp_path / "cells.json") in err and "restore it" in err
    assert (tmp_path / "cells.json").read_bytes() == content and not (tmp_path / "o").exists()
