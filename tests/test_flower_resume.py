"""A Flower run stopped mid-run and resumed ends as an uninterrupted one: the ServerApp's side
comes from the run directory's checkpoint, each SuperNode's client from its own state-dir."""

import pytest
from test_flower_parity import adapters

from sfedlora.driver.experiment import run
from sfedlora.driver.rundir import read_metrics
from sfedlora.flower.engine import NODES, run_simulation

COMMON = (
    "model.precision=fp32",
    "lora.dropout=0.1",
    "federation.rounds=3",
    "method=sfed-lora",
    "train.optimizer_state=persistent",
    "flower.collect_adapters=true",
)


class Stop(Exception):
    pass


def test_a_resumed_flower_simulation_ends_with_the_uninterrupted_adapters(tiny_config):
    embedded = run(tiny_config("name=embedded", *COMMON))
    run_dir = embedded.run_dir.parent / "flower"
    kept = {}

    def stop_in_round_2(record):
        # As if the ServerApp died in round 2 after the nodes had trained it: round 1's
        # checkpoint, and nodes one round ahead of it.
        checkpoint = run_dir / "checkpoint.pt"
        if record["round"] == 1:
            kept["round 1"] = checkpoint.read_bytes()
            return
        checkpoint.write_bytes(kept["round 1"])
        raise Stop

    with pytest.raises(Stop):
        run_simulation(tiny_config("name=flower", *COMMON), on_record=stop_in_round_2)
    key = (run_dir / "run_key").read_text()
    resumed = run_simulation(None, resume=run_dir)
    assert (run_dir / "run_key").read_text() == key and not (run_dir / "checkpoint.pt").exists()
    records = read_metrics(run_dir)
    assert [r["round"] for r in records] == [1, 2, 3] and resumed.records == records
    for a, b in zip(embedded.records, records, strict=True):
        for metric in ("train_loss", "update_norm", "personal_accuracy_mean"):
            assert b[metric] == pytest.approx(a[metric], abs=1e-5), (a["round"], metric)
    ours, theirs = adapters(embedded.run_dir), adapters(run_dir)
    assert sorted(theirs) == ["client_00", "client_01", "client_02"] and ours.keys() == theirs.keys()
    for name in ours:
        # Collected by the server, and as each node saved it in its own state-dir.
        on_node = adapters(run_dir / NODES / name)[name]
        for t in ours[name]:
            assert (ours[name][t] - theirs[name][t]).abs().max() <= 1e-5, (name, t)
            assert (ours[name][t] - on_node[t]).abs().max() <= 1e-5, (name, t)
