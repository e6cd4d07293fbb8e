"""A study's record: the published tables regenerate from it, it holds every run losslessly, and
a damaged one is refused with one line."""

import gzip
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sfedlora.cli import app
from sfedlora.errors import SfedloraError
from sfedlora.results.record import open_sweep, read_sweep, sweep_record, write_record
from sfedlora.results.sweep_summary import write_summary

RESULTS = Path(__file__).resolve().parents[1] / "docs/results/cpu-study"
runner = CliRunner()


@pytest.mark.parametrize("study", ["", "adapter-only", "longer", "longer-n20"])
def test_the_published_tables_regenerate_from_the_record(tmp_path, study):
    published = RESULTS / study
    record = next(published.glob("record.json*"))
    assert record.stat().st_size < 1_000_000
    sweep = open_sweep(record)
    write_summary(sweep, tmp_path)
    for table in ("summary.md", "summary.csv"):
        assert (tmp_path / table).read_text() == (published / table).read_text(), f"{study}/{table}"


def _sweep_dir(root: Path) -> Path:
    """A two-cell sweep directory as `sfedlora sweep` leaves it (one cell unfinished)."""
    (root / "runs/rank-4").mkdir(parents=True)
    (root / "runs/rank-8").mkdir(parents=True)
    (root / "sweep.yaml").write_text("base: {method: sfed-lora}\ngrid: {rank: [4, 8, 32]}\ntarget: 0.6\n")
    for rank, final in ((4, 0.5), (8, 0.7)):
        run = root / f"runs/rank-{rank}"
        (run / "config.yaml").write_text(
            f"name: rank-{rank}\nmethod: sfed-lora\nlora: {{rank: {rank}, alpha: 16.0}}\n"
            "federation: {n_clients: 2}\nfaults: {bad_kinds: [nan]}\n"
        )
        records = [{"round": 1, "train_loss": 0.7, "grad_norm_A": 0.1, "grad_norm_B": 0.2, "acc": 0.4}]
        records.append({"round": 2, "train_loss": 0.6, "grad_norm_A": None, "grad_norm_B": 0.2, "acc": final})
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        summary = {"metric": "acc", "final": final, "best": final, "wall_seconds": 1.5, "rounds": 2}
        (run / "summary.json").write_text(
            json.dumps(summary | {"collapse_metric": "acc", "trivial_score": 0.5})
        )
    (root / "runs/rank-4/partition.json").write_text('{"sizes": [3, 5]}')
    (root / "runs/rank-32").mkdir()  # started, not finished: no summary.json
    return root


def test_a_record_holds_every_finished_run_as_its_directory_does(tmp_path):
    sweep = read_sweep(_sweep_dir(tmp_path / "s"))
    assert [run.cell for run in sweep.runs] == [{"rank": 4}, {"rank": 8}]
    record = sweep_record(sweep)
    # The config every run shares is kept once; each run keeps only what differs.
    assert record["config"] == {
        "method": "sfed-lora",
        "lora": {"alpha": 16.0},
        "federation": {"n_clients": 2},
        "faults": {"bad_kinds": ["nan"]},
    }
    assert record["runs"][1]["config"] == {"name": "rank-8", "lora.rank": 8}
    for name in ("r.json", "r.json.gz"):
        path = write_record(tmp_path / name, record)
        assert open_sweep(path) == sweep
        assert path.read_bytes() == write_record(tmp_path / f"again-{name}", record).read_bytes()
    assert json.loads(gzip.decompress((tmp_path / "r.json.gz").read_bytes())) == record


def test_a_damaged_record_is_one_error_line(tmp_path):
    good = write_record(tmp_path / "r.json.gz", sweep_record(read_sweep(_sweep_dir(tmp_path / "s"))))
    cut = tmp_path / "cut.json.gz"
    cut.write_bytes(good.read_bytes()[:200])
    with pytest.raises(SfedloraError, match=r"^record .*cut.json.gz is damaged \(EOFError\): restore it"):
        open_sweep(cut)
    shutil.copy(tmp_path / "s/runs/rank-4/summary.json", tmp_path / "summary.json")
    result = runner.invoke(app, ["report", str(tmp_path / "summary.json")])
    assert result.exit_code == 2
    assert "summary.json is not a sweep's record (no sweep, spec, config, runs)" in result.output
    result = runner.invoke(
        app, ["report", str(tmp_path / "s/runs/rank-4"), "--record", str(tmp_path / "x.json")]
    )
    assert result.exit_code == 2 and "is a single run, and --record writes a sweep's" in result.output
    assert not (tmp_path / "x.json").exists()
