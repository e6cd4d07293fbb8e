"""Every file sfedlora wrote and reads back, damaged, cut short or from another version: one
`error:` line naming the file and the fix, exit 2, and nothing on disk changed."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from test_bad_input import assert_documented
from typer.testing import CliRunner

from sfedlora.cli import app
from sfedlora.errors import SfedloraError
from sfedlora.flower.node_state import load_state_file

runner = CliRunner()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished one-round run of two clients, with its adapters (made once for the module)."""
    from sfedlora.config import build_config
    from sfedlora.driver.experiment import run

    root = tmp_path_factory.mktemp("damaged")
    overrides = [
        f"output_dir={root}",
        "name=done",
        "data.max_train_examples=32",
        "data.max_eval_examples=8",
        "model.max_length=16",
        "federation.n_clients=2",
        "federation.rounds=1",
        "federation.local_steps=1",
        "partition.min_size=8",
        "train.batch_size=8",
        "eval.batch_size=8",
        "lora.rank=2",
    ]
    return run(build_config(overrides=overrides)).run_dir


@pytest.fixture
def run_dir(finished, tmp_path):
    """A copy of the finished run, to damage."""
    return Path(shutil.copytree(finished, tmp_path / "runs" / "done"))


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def refused(tmp_path, args, message, documented=True):
    """The command fails with one error line holding ``message`` and leaves tmp_path as it was."""
    before = snapshot(tmp_path)
    result = runner.invoke(app, args)
    out = result.stderr.strip()
    assert result.exit_code == 2, result.output
    assert len(out.splitlines()) == 1 and out.startswith("error: "), out
    assert message.replace("<tmp>", str(tmp_path)) in out, out
    assert snapshot(tmp_path) == before
    if documented:
        assert_documented(out, tmp_path)


def cut(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_a_damaged_checkpoint(run_dir, tmp_path):
    (run_dir / "summary.json").unlink()  # unfinished, as an interrupted run is
    (run_dir / "checkpoint.pt").write_bytes(b"PK\x03\x04 not a checkpoint")
    refused(
        tmp_path,
        ["run", "--resume", str(run_dir)],
        "error: checkpoint <tmp>/runs/done/checkpoint.pt is damaged, truncated or from another version "
        "(RuntimeError): the run cannot be resumed; start it again (or resume a copy of it)",
    )
    torch.save({"round": 1, "server": {}}, run_dir / "checkpoint.pt")  # another version's keys
    refused(
        tmp_path,
        ["run", "--resume", str(run_dir)],
        "checkpoint.pt is damaged, truncated or from another version (KeyError)",
        documented=False,
    )


def test_a_damaged_adapter(run_dir, tmp_path):
    cut(run_dir / "adapters/client_00/adapter_model.safetensors")
    refused(
        tmp_path,
        ["export", str(run_dir), str(tmp_path / "out"), "--client", "0"],
        "error: adapter <tmp>/runs/done/adapters/client_00/adapter_model.safetensors is damaged, truncated "
        "or from another version (SafetensorError): restore it from a copy, or run the run again",
    )
    (run_dir / "adapters/client_01/adapter_config.json").write_text('{"r": 2}')
    refused(
        tmp_path,
        ["export", str(run_dir), str(tmp_path / "out"), "--client", "1"],
        "adapter_config.json is damaged, truncated or from another version (ValueError)",
        documented=False,
    )


def test_a_run_config_cut_short_or_damaged(run_dir, tmp_path):
    config = run_dir / "config.yaml"
    text = config.read_text()
    config.write_text(text[: text.index("\nprivacy:")] + "\n")  # cut at a line: still valid YAML
    refused(
        tmp_path,
        ["export", str(run_dir), str(tmp_path / "out"), "--client", "0"],
        "error: run config <tmp>/runs/done/config.yaml lacks privacy.accountant, privacy.clip_norm, "
        "privacy.delta ...: it was cut short or written by an older sfedlora; restore it from a copy, or "
        "run the run again (or add the keys with the values the run used)",
    )
    config.write_text(text.replace("rank: 2", "rank: -2"))
    refused(
        tmp_path,
        ["run", "--resume", str(run_dir)],
        "error: run config <tmp>/runs/done/config.yaml is damaged, truncated or from another version "
        "(config lora.rank: Input should be greater than or equal to 1 (got -2)): restore it from a copy, "
        "or run the run again",
    )


def test_a_damaged_summary_or_metrics_file(run_dir, tmp_path):
    cut(run_dir / "summary.json")
    refused(
        tmp_path,
        ["report", str(run_dir)],
        "error: summary <tmp>/runs/done/summary.json is damaged, truncated or from another version "
        "(JSONDecodeError): restore it from a copy, or run the run again",
    )
    (run_dir / "summary.json").write_text(json.dumps({"final": 0.5}))  # another version: no metric
    refused(
        tmp_path, ["report", str(run_dir)], "summary.json is damaged, truncated or from", documented=False
    )


def test_damaged_metrics(run_dir, tmp_path):
    metrics = run_dir / "metrics.jsonl"
    metrics.write_text(metrics.read_text().replace('"round": 1', '"round": 3'))
    refused(
        tmp_path,
        ["report", str(run_dir)],
        "error: metrics <tmp>/runs/done/metrics.jsonl is damaged, truncated or from another version "
        "(ValueError): restore it from a copy, or run the run again",
    )
    cut(metrics, 0.3)
    refused(
        tmp_path, ["report", str(run_dir)], "metrics.jsonl is damaged, truncated or from", documented=False
    )


def test_a_damaged_sweep_spec(tmp_path):
    sweep = tmp_path / "runs" / "sw"
    sweep.mkdir(parents=True)
    (sweep / "sweep.yaml").write_text("base: {}\ngrid: [1, 2\n")
    refused(
        tmp_path,
        ["report", str(sweep)],
        "error: sweep spec <tmp>/runs/sw/sweep.yaml is damaged, truncated or from another version "
        "(ParserError): restore it from a copy, or start the sweep again under a new --name",
    )


def test_a_damaged_node_state(tmp_path):
    state = tmp_path / "client_state.pt"
    torch.save({"run": "r", "client": 0, "round": 1, "tensors": {}}, state)  # another version: no rng
    with pytest.raises(SfedloraError, match=r"node state .* from another version \(KeyError\): delete it"):
        load_state_file(state, "r", 0, 2, training=True)
    state.write_bytes(b"\x80\x02}q\x00.")  # a pickle, not a torch zip file
    with pytest.raises(SfedloraError, match=r"^node state .*client_state.pt is damaged"):
        load_state_file(state, "r", 0, 2, training=True)
    assert state.read_bytes() == b"\x80\x02}q\x00."
