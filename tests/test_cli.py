"""Bad input at the command line: a one-line message naming the problem, exit code 2."""

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from sfedlora.cli import app

runner = CliRunner()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "lora.rnk=4"], "unknown config key 'lora.rnk'"),
        (["--set", "federation.rounds=0"], "federation.rounds: Input should be greater than or equal to 1"),
        (["--set", "train.lr=fast"], "train.lr: Input should be a valid number"),
        (["--set", "method=fedavg"], "unknown method 'fedavg'"),
        (["--set", "train.optimizer=adam"], "train.optimizer: Input should be 'sgd' or 'adamw'"),
        (["--set", "method=sfed-lora", "--set", "lora.scaling=lora"], "method sfed-lora uses scaling sfed"),
        (["--set", "federation.clients_per_round=11"], "clients_per_round (11) exceeds n_clients (10)"),
        (["--set", "rounds"], "write it as key=value"),
        (["missing.yaml"], "config file missing.yaml not found"),
    ],
)
def test_bad_config_exits_2_with_one_line(args, message):
    result = runner.invoke(app, ["run", *args])
    assert result.exit_code == 2
    out = result.output.strip()
    assert message in out
    assert len(out.splitlines()) == 1


def test_bad_yaml_and_unknown_key_in_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("federation:\n  rounds: [1\n")
    result = runner.invoke(app, ["run", str(bad)])
    assert result.exit_code == 2 and "not valid YAML at line" in result.output
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("federation:\n  clients: 5\n")
    result = runner.invoke(app, ["run", str(unknown)])
    assert result.exit_code == 2 and "unknown config key 'federation.clients'" in result.output


def test_bad_model_path_and_data_dir_are_named(tmp_path):
    result = runner.invoke(app, ["run", "--set", f"model.name_or_path={tmp_path}/nomodel", "--set", f"output_dir={tmp_path}"])
    assert result.exit_code == 2 and "has no config.json" in result.output
    result = runner.invoke(app, ["run", "--set", "data.source=tsv", "--set", f"data.data_dir={tmp_path}/none"])
    assert result.exit_code == 2 and "is not a directory" in result.output


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
    proc = subprocess.run([sys.executable, "-m", "sfedlora.cli", "run", "--set", "lora.rank=-1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: config lora.rank: Input should be greater than or equal to 1 (got -1)"
    assert proc.stdout == ""
