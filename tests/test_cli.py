"""Bad input at the command line: a one-line message naming the problem, exit code 2."""

import subprocess
import sys

from typer.testing import CliRunner

from sfedlora.cli import app

runner = CliRunner()


def test_existing_run_directory_is_never_overwritten(tmp_path, tiny_overrides):
    run_dir = tmp_path / "runs" / "taken"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("precious\n")
    result = runner.invoke(app, ["run", *[a for o in tiny_overrides + ["name=taken"] for a in ("--set", o)]])
    assert result.exit_code == 2 and "already exists" in result.output
    assert (run_dir / "metrics.jsonl").read_text() == "precious\n"


def test_config_command_prints_the_resolved_main_job():
    result = runner.invoke(app, ["config"])
    assert result.exit_code == 0
    assert "method: sfed-lora" in result.output and "scaling: sfed" in result.output


def test_console_script_reports_errors_on_stderr():
    proc = subprocess.run(
        [sys.executable, "-m", "sfedlora.cli", "run", "--set", "lora.rank=-1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert (
        proc.stderr.strip() == "error: config lora.rank: Input should be greater than or equal to 1 (got -1)"
    )
    assert proc.stdout == ""


def test_partition_command_shows_sizes_and_label_histograms():
    result = runner.invoke(
        app, ["partition", "--set", "partition.kind=dirichlet", "--set", "federation.n_clients=4"]
    )
    assert result.exit_code == 0, result.output
    assert "12000 training examples, 4 clients, Dirichlet β=0.5" in result.output
    rows = [
        line
        for line in result.output.splitlines()
        if line.strip().startswith("│") and line.split("│")[1].strip().isdigit()
    ]
    assert len(rows) == 4
    sizes = [int(r.split("│")[2]) for r in rows]
    per_label = [int(r.split("│")[3]) + int(r.split("│")[4]) for r in rows]
    assert sizes == per_label and sum(sizes) == 12000


def test_round_lines_show_the_headline_with_the_worst_client_and_survive_an_empty_round():
    from sfedlora.logs import round_lines

    evaluated = {
        "round": 5,
        "dropped": [],
        "train_loss": 0.41234,
        "personal_accuracy_mean": 0.8,
        "personal_accuracy_min": 0.7,
    }
    assert round_lines(evaluated, "personal_accuracy_mean", every_round=False) == [
        "round    5  loss 0.4123  personal_accuracy_mean 0.8000  (min over clients 0.7000)"
    ]
    perplexity = {
        "round": 2,
        "dropped": [],
        "train_loss": 2.0,
        "personal_perplexity_mean": 9.0,
        "personal_perplexity_max": 12.0,
    }
    assert round_lines(perplexity, "personal_perplexity_mean", every_round=False)[0].endswith(
        "(max over clients 12.0000)"
    )
    # Every sampled client dropped: no loss was recorded (null in metrics.jsonl).
    empty = {"round": 3, "dropped": [0, 1], "train_loss": None}
    lines = round_lines(empty, "personal_accuracy_mean", every_round=True)
    assert "no reply from clients [0, 1]" in lines[0] and lines[1] == "round    3  loss -"
    assert round_lines(empty, "personal_accuracy_mean", every_round=False) == lines[:1]
    assert round_lines(evaluated, None, every_round=False) == [
        "round    5  loss 0.4123  personal_accuracy_mean 0.8000"
    ]
