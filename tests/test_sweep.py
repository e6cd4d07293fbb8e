"""Sweeps: a 2x2 grid of tiny runs, skipping finished cells on re-run, summary and report."""

import csv
import json

import pytest
from typer.testing import CliRunner

from sfedlora.cli import app
from sfedlora.errors import SfedloraError
from sfedlora.results.grid import cell_name, cell_overrides, grid_cells, parse_grid
from sfedlora.results.record import read_run
from sfedlora.results.sweep import load_sweep, run_sweep
from sfedlora.results.sweep_summary import cell_row

runner = CliRunner()


def test_grid_parsing_and_cells():
    grid = parse_grid("method=fedsa-lora,sfed-lora rank=4,8 train.lr=0.001")
    assert grid == {"method": ["fedsa-lora", "sfed-lora"], "rank": [4, 8], "train.lr": [0.001]}
    cells = grid_cells(grid)
    assert len(cells) == 4 and cells[0] == {"method": "fedsa-lora", "rank": 4, "train.lr": 0.001}
    assert cell_name(cells[3]) == "method-sfed-lora_rank-8_lr-0.001"
    assert cell_name({"lora.dropout": 0.1, "faults.dropout": 0.2}) == "lora.dropout-0.1_faults.dropout-0.2"
    assert cell_overrides({"train.max_grad_norm": None, "federation.local_head": True}) == [
        "train.max_grad_norm=null",
        "federation.local_head=true",
    ]
    assert cell_overrides(cells[3]) == ["method=sfed-lora", "lora.rank=8", "train.lr=0.001"]
    with pytest.raises(SfedloraError, match="write it as key=v1,v2"):
        parse_grid("rank")


@pytest.mark.parametrize(
    ("metric", "target", "reached"),
    [
        ("accuracy", 0.5, 2),
        ("accuracy", 0.9, 4),
        ("accuracy", 0.99, None),
        ("perplexity", 30.0, 2),  # lower is better
        ("perplexity", 20.0, 4),
    ],
)
def test_rounds_to_target_is_the_first_evaluation_that_reaches_it(tmp_path, metric, target, reached):
    # Rounds 1-4, evaluated at 1, 2 and 4: round 3 has no score and cannot be the answer.
    scores = {"accuracy": [0.4, 0.6, None, 0.95], "perplexity": [40.0, 25.0, None, 18.0]}[metric]
    records = [{"round": i + 1, metric: v, "train_loss": 1.0} for i, v in enumerate(scores)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = {"metric": metric, "final": scores[-1], "best": scores[-1], "wall_seconds": 1.0}
    summary |= {"collapse_metric": metric, "trivial_score": None, "rounds": 4}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    (tmp_path / "config.yaml").write_text("method: sfed-lora\n")
    assert cell_row(read_run(tmp_path, {"rank": 4}), target)["rounds_to_target"] == reached


def test_a_bad_cell_is_named_before_anything_runs(tmp_path):
    with pytest.raises(SfedloraError, match="grid cell method-fedsa-lora_rank-0: config lora.rank"):
        load_sweep(None, "method=fedsa-lora rank=4,0", [f"output_dir={tmp_path}"])


def test_two_by_two_sweep_resumes_and_reports(tiny_overrides, tmp_path):
    sets = [a for o in tiny_overrides + ["eval.every=1"] for a in ("--set", o)]
    args = [
        "sweep",
        "--grid",
        "method=fedsa-lora,sfed-lora rank=2,4",
        "--name",
        "s",
        "--target",
        "0.3",
        *sets,
    ]
    # Part by part: a narrower grid first; the full grid then runs only the cells left.
    result = runner.invoke(
        app,
        ["sweep", "--grid", "method=fedsa-lora,sfed-lora rank=2", "--name", "s", "--target", "0.3", *sets],
    )
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, args)
    assert result.exit_code == 0 and result.output.count("already finished, skipped") == 2, result.output
    sweep_dir = tmp_path / "runs" / "s"
    names = sorted(p.name for p in (sweep_dir / "runs").iterdir())
    assert names == [
        "method-fedsa-lora_rank-2",
        "method-fedsa-lora_rank-4",
        "method-sfed-lora_rank-2",
        "method-sfed-lora_rank-4",
    ]
    rows = list(csv.DictReader((sweep_dir / "summary.csv").open()))
    assert [(r["method"], r["rank"]) for r in rows] == [
        ("fedsa-lora", "2"),
        ("fedsa-lora", "4"),
        ("sfed-lora", "2"),
        ("sfed-lora", "4"),
    ]
    assert {
        "final",
        "best",
        "rounds_to_target",
        "final_train_loss",
        "grad_norm_A",
        "grad_norm_B",
        "collapsed",
        "collapse_reason",
        "wall_seconds",
    } <= set(rows[0])
    assert all(0 <= float(r["final"]) <= 1 for r in rows)
    assert "| method | rank | n | final |" in (sweep_dir / "summary.md").read_text()

    # Re-running: every finished cell is skipped, and its files stay as they were.
    metrics = (sweep_dir / "runs" / names[0] / "metrics.jsonl").read_bytes()
    result = runner.invoke(app, args)
    assert result.exit_code == 0 and result.output.count("already finished, skipped") == 4
    assert (sweep_dir / "runs" / names[0] / "metrics.jsonl").read_bytes() == metrics
    # Narrowing the finished sweep again keeps its summary whole.
    result = runner.invoke(
        app, ["sweep", "--grid", "method=sfed-lora rank=4", "--name", "s", "--target", "0.3", *sets]
    )
    assert result.exit_code == 0 and len(list(csv.DictReader((sweep_dir / "summary.csv").open()))) == 4

    result = runner.invoke(app, ["report", str(sweep_dir)])
    assert result.exit_code == 0, result.output
    plots = sorted(p.name for p in (sweep_dir / "plots").iterdir())
    for stem in (
        "metric_vs_round",
        "train_loss_vs_round",
        "grad_norm_A",
        "grad_norm_B",
        "heatmap",
        "heatmap_train_loss",
    ):
        assert f"{stem}.png" in plots and f"{stem}.pdf" in plots
        assert (sweep_dir / "plots" / f"{stem}.png").stat().st_size > 5000
    md = (sweep_dir / "report.md").read_text()
    assert "![metric_vs_round](plots/metric_vs_round.png)" in md and "| fedsa-lora | 2 |" in md

    # The sweep's record alone gives the same tables, and the figures asked for.
    published = tmp_path / "published"
    published.mkdir()
    result = runner.invoke(
        app, ["report", str(sweep_dir), "--only", "", "--record", str(published / "s.json.gz")]
    )
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["report", str(published / "s.json.gz"), "--only", "heatmap"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in published.iterdir()) == [
        "heatmap.png",
        "s.json.gz",
        "summary.csv",
        "summary.md",
    ]
    for table in ("summary.md", "summary.csv"):
        assert (published / table).read_text() == (sweep_dir / table).read_text()


def test_a_sweep_directory_holding_another_sweep_is_refused(tiny_overrides, tmp_path):
    base, grid = load_sweep(None, "rank=2", tiny_overrides)
    sweep_dir = tmp_path / "x"
    sweep_dir.mkdir()
    (sweep_dir / "sweep.yaml").write_text("base: {}\ngrid: {rank: [8]}\n")
    with pytest.raises(SfedloraError, match="holds a different sweep"):
        run_sweep(base, grid, sweep_dir)


def test_report_of_a_single_run(tiny_config, tmp_path):
    from sfedlora.driver.experiment import run

    result = run(tiny_config("name=one"))
    out = runner.invoke(app, ["report", str(result.run_dir)])
    assert out.exit_code == 0, out.output
    assert (result.run_dir / "plots" / "run.png").is_file() and (
        result.run_dir / "plots" / "run.pdf"
    ).is_file()
    assert "**collapsed**" in (result.run_dir / "report.md").read_text()
    bad = runner.invoke(app, ["report", str(tmp_path)])
    assert bad.exit_code == 2 and "neither a finished run" in bad.output


def test_cells_of_other_methods_do_not_inherit_a_preset_scaling(tiny_overrides):
    from sfedlora.config import build_config

    base, grid = load_sweep(None, "method=fedsa-lora,sfed-lora,fedsa-rslora", tiny_overrides)
    rules = [build_config(base, cell_overrides(c)).scaling for c in grid_cells(grid)]
    assert rules == ["lora", "sfed", "rslora"]


def test_learning_rate_views(tmp_path):
    from sfedlora.results.sweep_summary import _learning_rate_views

    grid = {"method": ["a"], "rank": [4, 8], "lr": [0.1, 0.01], "seed": [0, 1]}
    finals = {(4, 0.1): [0.8, 0.7], (4, 0.01): [0.6, 0.6], (8, 0.1): [0.5, 0.5], (8, 0.01): [0.9, 0.7]}
    rows = [
        {"method": "a", "rank": r, "lr": lr, "seed": s, "final": f, "final_train_loss": 1 - f}
        for (r, lr), fs in finals.items()
        for s, f in enumerate(fs)
    ]
    text = "\n".join(_learning_rate_views(rows, grid))
    metric, loss = text.split("## Final training loss")
    assert "**lr = 0.1**\n\n| method | r=4 | r=8 |\n|---|---|---|\n| a | 0.7500 | 0.5000 |" in metric
    assert "| a | 0.6000 | 0.8000 |" in metric  # lr = 0.01
    assert "| a | 0.7500 (0.1) | 0.8000 (0.01) |" in loss  # tuned, after the loss tables
    assert "**lr = 0.1**\n\n| method | r=4 | r=8 |\n|---|---|---|\n| a | 0.2500 | 0.5000 |" in loss
    assert "| a | 0.4000 | 0.2000 |" in loss  # lr = 0.01

    # Where lower is better (a perplexity), the tuned rate is the one with the lowest final value.
    for row in rows:
        row["metric"] = "personal_perplexity_mean"
    assert "| a | 0.6000 (0.01) | 0.5000 (0.1) |" in "\n".join(_learning_rate_views(rows, grid))


@pytest.mark.parametrize(
    "text, message", [("grid: [1, 2]\n", "must map axes to lists"), ("a: [\n", "not valid YAML")]
)
def test_bad_sweep_files(tmp_path, text, message):
    path = tmp_path / "s.yaml"
    path.write_text(text)
    with pytest.raises(SfedloraError, match=message):
        load_sweep(path, None)


def test_rank_lists_as_a_grid_axis(tmp_path):
    path = tmp_path / "mixed.yaml"
    path.write_text("lora: {rank: 8}\ngrid:\n  method: [sfed-lora]\n  client_ranks: [[8], [2, 4, 8]]\n")
    base, grid = load_sweep(path, None, [f"output_dir={tmp_path}"])
    cells = grid_cells(grid)
    assert [cell_name(c) for c in cells] == [
        "method-sfed-lora_client_ranks-8",
        "method-sfed-lora_client_ranks-2+4+8",
    ]
    assert cell_overrides(cells[1]) == ["method=sfed-lora", "lora.client_ranks=[2, 4, 8]"]
    path.write_text("lora: {rank: 4}\ngrid:\n  client_ranks: [[2, 8]]\n")
    with pytest.raises(
        SfedloraError,
        match="grid cell client_ranks-2\\+8: config lora.client_ranks: rank 8 exceeds lora.rank=4",
    ):
        load_sweep(path, None, [])


def test_a_sweep_without_output_dir_goes_to_the_default(tiny_overrides, tmp_path, monkeypatch):
    """The README's sweep of an example YAML (which names no output_dir) lands in ./runs."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "job.yaml").write_text("method: sfed-lora\n")
    sets = [a for o in tiny_overrides if not o.startswith("output_dir=") for a in ("--set", o)]
    result = runner.invoke(app, ["sweep", "job.yaml", "--grid", "rank=2", "--name", "plain", *sets])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "runs" / "plain" / "runs" / "rank-2" / "summary.json").is_file()


def test_a_failing_cell_is_reported_and_the_others_finish(tiny_overrides, tmp_path):
    base, grid = load_sweep(None, "rank=2,4", tiny_overrides)
    sweep_dir = tmp_path / "s"
    broken = sweep_dir / "runs" / "rank-2"
    broken.mkdir(parents=True)
    (broken / "checkpoint.pt").write_bytes(b"not a checkpoint")  # a resume that cannot work: no config.yaml
    with pytest.raises(
        SfedloraError, match=r"1 of 2 cells failed .* first rank-2: .* is not a run directory"
    ):
        run_sweep(base, grid, sweep_dir)
    assert (sweep_dir / "runs" / "rank-4" / "summary.json").is_file()
    assert [r["rank"] for r in csv.DictReader((sweep_dir / "summary.csv").open())] == ["4"]


def test_cells_in_worker_processes_finish_and_name_their_warnings(tiny_overrides, tmp_path, capfd):
    # Every reply corrupted: each round of each cell logs refused updates, from two processes at once.
    base, grid = load_sweep(
        None, "rank=2,4", [*tiny_overrides, "federation.rounds=1", "faults.bad_update=1.0"]
    )
    done = run_sweep(base, grid, tmp_path / "s", jobs=2)
    assert sorted(p.name for p in done) == ["rank-2", "rank-4"]
    assert all((p / "summary.json").is_file() for p in done)
    err = capfd.readouterr().err
    for cell in ("rank-2", "rank-4"):
        assert f"{cell}: round 1: update of client 0 rejected" in err, err
    assert "\nround 1:" not in "\n" + err  # no warning without its cell


def test_heatmap_axis_labels_do_not_run_into_neighbouring_panels():
    from sfedlora.results.report import _heatmap, _plt

    plt = _plt()
    methods, clients, ranks = (
        ["fedsa-lora", "fedsa-rslora", "sfed-lora", "rolora"],
        [5, 10, 20],
        [4, 8, 32, 128, 512],
    )
    values = {(m, n, r): [0.5] for m in methods for n in clients for r in ranks}
    fig = _heatmap(plt, values, methods, clients, ranks, "train_loss")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    panels = fig.axes[: len(methods)]
    for ax in panels:
        labels = [t for t in (ax.yaxis.label, ax.xaxis.label) if t.get_text()]
        for other in panels:
            if other is not ax:
                for label in labels:
                    assert not label.get_window_extent(renderer).overlaps(other.get_window_extent(renderer))
    plt.close(fig)
