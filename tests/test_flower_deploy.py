"""Flower's Deployment Engine on this machine: TLS, SuperNode authentication, a SuperNode
that dies mid-run, and no process left behind."""

import json
import os
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sfedlora.cli import app
from sfedlora.config import build_config
from sfedlora.experiment import run
from sfedlora.flower.credentials import make_node_key
from sfedlora.flower.deploy import LocalDeployment, prepare
from sfedlora.rundir import read_metrics


def processes_in(workdir: Path) -> list[str]:
    """Live processes working in ``workdir``: every process a deployment starts, and its children, does."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and os.readlink(proc / "cwd").startswith(str(workdir.resolve())):
                pids.append(proc.name)
        except OSError:
            continue
    return pids


# The same rounds as the embedded simulator's. fp32, so that processes agree to the last
# bits; a learning rate at which the models leave the majority class within the two rounds,
# so that the scores tell the trained personalised models from any other.
SAME_AS_EMBEDDED = ("model.precision=fp32", "train.lr=0.01")
COMPARED = (
    "train_loss",
    "update_norm",
    "personal_accuracy_mean",
    "personal_accuracy_min",
    "personal_local_accuracy_mean",
)


def test_flower_up_runs_a_job_over_tls_and_stops_everything(tiny_config, tiny_overrides, tmp_path):
    workdir = tmp_path / "work"
    sets = [a for o in [*tiny_overrides, *SAME_AS_EMBEDDED, "name=deployed"] for a in ("--set", o)]
    result = CliRunner().invoke(app, ["flower", "up", "--clients", "3", "--workdir", str(workdir), *sets])
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "runs" / "deployed"
    records = read_metrics(run_dir)
    assert [r["round"] for r in records] == [1, 2]
    assert all(r["aggregated"] == 3 and r["dropped"] == [] and r["bytes_up"] > 0 for r in records)
    embedded = run(tiny_config(*SAME_AS_EMBEDDED, "name=embedded")).records
    for a, b in zip(embedded, records, strict=True):
        assert (a["clients"], a["bytes_up"], a["bytes_down"]) == (
            b["clients"],
            b["bytes_up"],
            b["bytes_down"],
        )
        for key in COMPARED:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-5), (a["round"], key)
    assert records[-1]["personal_accuracy_mean"] != records[0]["personal_accuracy_mean"]  # the scores moved
    assert json.loads((run_dir / "summary.json").read_text())["rounds"] == 2
    # The rounds show as they land, and the summary at the end, as `sfedlora run` shows them.
    assert "round    1  loss" in result.output and "round    2  loss" in result.output
    assert "personal_accuracy_mean" in result.output and "summary" in result.output
    assert (workdir / "certs" / "ca.crt").is_file() and len(list((workdir / "keys").glob("*.pub"))) == 3
    assert processes_in(workdir) == []


@pytest.mark.slow  # about 5 minutes on 2 cores: it waits for the SuperLink to miss two heartbeats
def test_a_killed_supernode_is_dropped_and_an_unregistered_key_is_refused(tiny_overrides, tmp_path):
    cfg = prepare(
        build_config(
            overrides=[
                *tiny_overrides,
                "name=faulty",
                "federation.rounds=3",
                "flower.round_timeout=300",
                "server.min_replies=2",
            ]
        )
    )
    run_dir = Path(cfg.output_dir) / cfg.name
    workdir = tmp_path / "work"
    with LocalDeployment(workdir, 3) as deployment:
        # A fourth node claiming client 0 with a key the SuperLink never registered: if it were
        # let in, the handshake would find two holders of partition 0 and stop the run.
        intruder_key, _ = make_node_key(workdir / "keys", "intruder")
        deployment.start_node(0, intruder_key, name="intruder")
        job = deployment.submit(cfg)
        deadline = time.monotonic() + 500
        while (
            not (run_dir / "metrics.jsonl").is_file() or not (run_dir / "metrics.jsonl").read_text().strip()
        ):
            assert job.poll() is None, (workdir / "logs" / "run.log").read_text()[-2000:]
            assert time.monotonic() < deadline
            time.sleep(0.5)
        deployment.kill("supernode-2")
        job.wait(timeout=600)
    records = read_metrics(run_dir)
    assert [r["round"] for r in records] == [1, 2, 3]
    assert records[0]["dropped"] == [] and records[0]["aggregated"] == 3
    for r in records[1:]:
        assert r["dropped"] == [2] and r["aggregated"] == 2 and r["train_loss"] is not None
    assert (run_dir / "summary.json").is_file()
    assert "no reply from client 2" in (workdir / "logs" / "run.log").read_text()
    assert "Failed to activate SuperNode" in (workdir / "logs" / "intruder.log").read_text()
    assert "No SuperNode found with the given public key" in (workdir / "logs" / "superlink.log").read_text()
    assert processes_in(workdir) == []
