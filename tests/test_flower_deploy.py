"""Flower's Deployment Engine on this machine: TLS, SuperNode authentication, SuperNodes with
their own data and state, a SuperNode stopped and started again, a whole deployment that dies
and resumes, and no process left behind."""

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from test_flower_parity import adapters
from typer.testing import CliRunner

from sfedlora.cli import app
from sfedlora.config import build_config
from sfedlora.data import bundled_sst2_dir, load_task
from sfedlora.driver.experiment import run
from sfedlora.driver.rundir import read_metrics
from sfedlora.federated.shared import split_clients
from sfedlora.flower.credentials import make_node_key
from sfedlora.flower.deploy import LocalDeployment, prepare, up
from sfedlora.flower.node_state import STATE_FILE


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


def same_rounds(embedded: list[dict], deployed: list[dict]) -> None:
    for a, b in zip(embedded, deployed, strict=True):
        assert (a["clients"], a["bytes_up"], a["bytes_down"]) == (
            b["clients"],
            b["bytes_up"],
            b["bytes_down"],
        )
        assert b["aggregated"] == 3 and b["dropped"] == []
        for key in (k for k in COMPARED if k in a):  # personal scores where the round was evaluated
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-5), (a["round"], key)


def wait_for(condition, job, workdir: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert job.poll() is None, (workdir / "logs" / "run.log").read_text()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.2)


def test_flower_up_runs_a_job_over_tls_and_stops_everything(tiny_config, tiny_overrides, tmp_path):
    # One round: each message starts a ClientApp process, and the rounds' parity is checked on
    # more rounds (and a resumed run) in the test after this one.
    one = ("federation.rounds=1", *SAME_AS_EMBEDDED)
    workdir = tmp_path / "work"
    sets = [a for o in [*tiny_overrides, *one, "name=deployed"] for a in ("--set", o)]
    result = CliRunner().invoke(app, ["flower", "up", "--clients", "3", "--workdir", str(workdir), *sets])
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "runs" / "deployed"
    records = read_metrics(run_dir)
    assert [r["round"] for r in records] == [1] and records[0]["bytes_up"] > 0
    same_rounds(run(tiny_config(*one, "name=embedded")).records, records)
    assert json.loads((run_dir / "summary.json").read_text())["rounds"] == 1
    # The rounds show as they land, and the summary at the end, as `sfedlora run` shows them.
    assert "round    1  loss" in result.output and "personal_accuracy_mean" in result.output
    assert "summary" in result.output
    assert (workdir / "certs" / "ca.crt").is_file() and len(list((workdir / "keys").glob("*.pub"))) == 3
    # Each node saved its personalised adapter in its own state-dir.
    assert all(
        (workdir / "nodes" / f"supernode-{k}" / "adapters" / f"client_0{k}").is_dir() for k in range(3)
    )
    assert processes_in(workdir) == []


def node_data(cfg, root: Path) -> dict[int, Path]:
    """Each client's partition of the run's data as that node's own files (GLUE TSV)."""
    data = load_task(cfg.data, seed=cfg.seed)
    dirs = {}
    for k, part in enumerate(split_clients(cfg, data.train.labels)):
        dirs[k] = root / f"client_{k}"
        dirs[k].mkdir(parents=True)
        rows = "".join(f"{data.train.texts[i]}\t{data.train.labels[i]}\n" for i in part)
        (dirs[k] / "train.tsv").write_text("sentence\tlabel\n" + rows)
        shutil.copy(bundled_sst2_dir() / "dev.tsv", dirs[k] / "dev.tsv")
    return dirs


def test_a_deployment_that_dies_resumes_with_each_nodes_own_data_and_state(tiny_overrides, tmp_path):
    """Three SuperNodes, each with its own data directory and state-dir; an unregistered key
    refused; every process killed at once after a round; a new SuperLink and the same nodes
    (started again) resume the run, which ends with the uninterrupted run's adapters."""
    overrides = [
        *tiny_overrides,
        *SAME_AS_EMBEDDED,
        "data.source=tsv",
        f"data.data_dir={bundled_sst2_dir()}",
        "train.optimizer_state=persistent",
        "flower.collect_adapters=true",
        "eval.every=2",  # each message starts a ClientApp process: the fewer, the shorter the test
    ]
    embedded = run(build_config(overrides=[*overrides, "name=embedded"]))
    cfg = prepare(build_config(overrides=[*overrides, "name=deployed"]))
    run_dir = Path(cfg.output_dir) / cfg.name
    workdir = tmp_path / "work"
    dirs = node_data(cfg, tmp_path / "node-data")
    with LocalDeployment(workdir, 3, data_dirs=dirs) as deployment:
        # A fourth node claiming client 0 with a key the SuperLink never registered: if it were
        # let in, the handshake would find two holders of partition 0 and stop the run.
        intruder_key, _ = make_node_key(workdir / "keys", "intruder")
        deployment.start_node(0, intruder_key, name="intruder")
        job = deployment.submit(cfg)
        wait_for((run_dir / "checkpoint.pt").is_file, job, workdir)
        deployment.stop(grace=0)  # a power cut: nodes may be half-way through the next round
    assert len(read_metrics(run_dir)) < 2
    up(None, workdir, timeout=300, resume=run_dir, data_dirs=dirs)  # `sfedlora flower up --resume`
    records = read_metrics(run_dir)
    assert [r["round"] for r in records] == [1, 2] and (run_dir / "summary.json").is_file()
    same_rounds(embedded.records, records)
    ours, theirs = adapters(embedded.run_dir), adapters(run_dir)
    assert sorted(theirs) == ["client_00", "client_01", "client_02"] and ours.keys() == theirs.keys()
    for k, name in enumerate(ours):
        on_node = adapters(workdir / "nodes" / f"supernode-{k}")[name]
        for t in ours[name]:
            assert (ours[name][t] - theirs[name][t]).abs().max() <= 1e-5, (name, t)
            assert (ours[name][t] - on_node[t]).abs().max() <= 1e-5, (name, t)
    assert "Failed to activate SuperNode" in (workdir / "logs" / "intruder.log").read_text()
    assert "No SuperNode found with the given public key" in (workdir / "logs" / "superlink.log").read_text()
    assert processes_in(workdir) == []


def test_a_stopped_supernode_is_dropped_and_started_again_goes_on_with_its_own_state(
    tiny_overrides, tmp_path
):
    cfg = prepare(
        build_config(overrides=[*tiny_overrides, "name=faulty", "federation.rounds=3", "eval.every=3"])
    )
    run_dir = Path(cfg.output_dir) / cfg.name
    workdir = tmp_path / "work"
    with LocalDeployment(workdir, 3) as deployment:
        job = deployment.submit(cfg)
        wait_for(lambda: (run_dir / "checkpoint.pt").is_file(), job, workdir)
        # Stopped by its operator in round 2, a SuperNode signs off: the SuperLink answers for
        # it at once, and the round goes on without it. Started again (the same key and
        # state-dir) while the others train, it is back for round 3.
        deployment.kill("supernode-2", signal.SIGTERM)
        deployment.start_node(2, workdir / "keys" / "node-2")
        job.wait(timeout=300)
    records = read_metrics(run_dir)
    assert [(r["round"], r["dropped"], r["aggregated"]) for r in records] == [
        (1, [], 3),
        (2, [2], 2),
        (3, [], 3),
    ]
    assert (run_dir / "summary.json").is_file()
    assert "no reply from client 2" in (workdir / "logs" / "run.log").read_text()
    # It went on from its own state after round 1: started afresh it would count 2 steps, not 4.
    state = torch.load(workdir / "nodes" / "supernode-2" / STATE_FILE, weights_only=True)
    assert (state["round"], state["steps"]) == (3, 4)
    assert processes_in(workdir) == []
