"""The Flower runtime: same results as the embedded simulator; only what the method sends leaves a client."""

import pytest
import torch
from flwr.app import Context, Message, MessageType, RecordDict
from test_flower_parity import adapters
from typer.testing import CliRunner

from sfedlora.cli import app
from sfedlora.data import load_task
from sfedlora.driver.experiment import run
from sfedlora.driver.rundir import read_metrics
from sfedlora.errors import SfedloraError
from sfedlora.federated.client import client_round
from sfedlora.federated.federation import build_federation
from sfedlora.federated.methods import tensor_kind
from sfedlora.flower import client_app
from sfedlora.flower.engine import run_simulation
from sfedlora.flower.records import (
    DOWNLOAD,
    STATE_TENSORS,
    UPDATE,
    config_text,
    load_state,
    read_train_reply,
    request,
)

COMPARED = (
    "train_loss",
    "personal_accuracy_mean",
    "personal_accuracy_min",
    "personal_local_accuracy_mean",
    "update_norm",
)


# The mixed-rank case also evaluates a sample of 2 of the 3 clients: Flower must ask the same ones.
@pytest.mark.parametrize(
    "ranks",
    [(), ("lora.rank=8", "lora.client_ranks=[2, 4, 8]", "eval.clients=2", "flower.collect_adapters=true")],
    ids=["one-rank", "mixed-ranks"],
)
def test_flower_simulation_matches_the_embedded_simulator(tiny_config, tiny_overrides, ranks):
    overrides = (
        "federation.rounds=3",
        "lora.dropout=0.1",
        "model.precision=fp32",
        "method=sfed-lora",
        *ranks,
    )
    embedded = run(tiny_config("name=embedded", *overrides))
    sets = [a for o in [*tiny_overrides, *overrides, "name=flower"] for a in ("--set", o)]
    result = CliRunner().invoke(app, ["run", "--runtime", "flower", *sets])
    assert result.exit_code == 0, result.output
    run_dir = embedded.run_dir.parent / "flower"
    flower_records = read_metrics(run_dir)
    assert [r["round"] for r in flower_records] == [1, 2, 3]
    for a, b in zip(embedded.records, flower_records):
        assert a["clients"] == b["clients"] and a["aggregated"] == b["aggregated"] == 3
        assert (a["bytes_up"], a["bytes_down"]) == (b["bytes_up"], b["bytes_down"]) and a["bytes_up"] > 0
        assert a.get("client_ranks") == b.get("client_ranks") and a.get("client_gammas") == b.get(
            "client_gammas"
        )
        assert a.get("evaluated_clients") == b.get("evaluated_clients") and len(
            a.get("evaluated_clients", [0] * 3)
        ) == 3 - bool(ranks)
        for key in COMPARED:
            assert b[key] == pytest.approx(a[key], abs=1e-5), (a["round"], key)
    assert flower_records[-1]["train_loss"] != flower_records[0]["train_loss"]  # it trained
    for name in ("config.yaml", "partition.json", "metrics.jsonl", "summary.json"):
        assert (run_dir / name).is_file()
    assert not (run_dir / "checkpoint.pt").exists()
    if not ranks:
        # FedSA-LoRA's B stays on the clients: unasked, the server has no personalised adapters to save.
        assert not (run_dir / "adapters").exists()
        return
    # Asked, every node sends its own, saved at its rank as the simulator saves it.
    ours, theirs = adapters(embedded.run_dir), adapters(run_dir)
    assert sorted(theirs) == ["client_00", "client_01", "client_02"] and ours.keys() == theirs.keys()
    for name in ours:
        for t in ours[name]:
            assert (ours[name][t] - theirs[name][t]).abs().max() <= 1e-5, (name, t)


def test_injected_faults_and_a_simulator_checkpoint_are_refused_on_flower(tiny_config, interrupted_run):
    with pytest.raises(SfedloraError, match="faults.dropout and faults.bad_update inject faults"):
        run_simulation(tiny_config("faults.dropout=0.5"))
    # Held-out client shares are scored where the clients' states live, which a Flower server is not.
    with pytest.raises(SfedloraError, match="eval.client_test_fraction holds out a share"):
        run_simulation(tiny_config("eval.client_test_fraction=0.1"))
    # The embedded simulator's checkpoint holds client states that no SuperNode has.
    run_dir = interrupted_run("embedded")
    result = CliRunner().invoke(app, ["run", "--runtime", "flower", "--resume", run_dir])
    assert (
        result.exit_code == 2
        and "written by the embedded simulator: resume it without --runtime flower" in (result.output)
    )


def _message(cfg, k, round_, download):
    return Message(
        request(config_text(cfg), "run-a", k, round_, download), dst_node_id=7, message_type=MessageType.TRAIN
    )


def test_client_app_sends_only_a_and_keeps_b_and_optimizer_in_context_state(tiny_config, server_identity):
    cfg = tiny_config("method=sfed-lora", "train.optimizer_state=persistent")
    fed = build_federation(cfg, load_task(cfg.data, seed=cfg.seed))
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 1}, state=RecordDict(), run_config={})
    state = fed.clients[1]
    for round_ in (1, 2):
        download = {n: t + 0.01 * round_ for n, t in fed.method.download(fed.server).items()}
        msg = _message(cfg, 1, round_, download)
        assert all(tensor_kind(n) != "B" for n in msg.content.array_records[DOWNLOAD])
        reply = client_app.train(msg, context)
        sent = reply.content.array_records[UPDATE]
        assert {tensor_kind(n) for n in sent} == {"A", "head"}
        # The simulator's own client step, on the same state, gives the same bits.
        expected = client_round(fed, fed.client(1), state, download, round_)
        result, update = read_train_reply(reply)
        assert result.loss == expected.result.loss and result.steps == 2
        assert all(torch.equal(update[n], expected.update[n]) for n in expected.update)
        state = expected.state
        kept = context.state.array_records[STATE_TENSORS]
        assert any(tensor_kind(n) == "B" for n in kept)
        assert all(torch.equal(torch.from_numpy(kept[n].numpy()), state.tensors[n]) for n in kept)
        kept_state = load_state(context.state)
        assert kept_state.steps == 2 * round_ and kept_state.optimizer["state"]  # AdamW's moments


def test_client_app_refuses_a_request_for_another_partition(tiny_config, server_identity):
    cfg = tiny_config()
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 2}, state=RecordDict(), run_config={})
    with pytest.raises(SfedloraError, match="server asked this node for client 0, but it holds partition 2"):
        client_app.train(_message(cfg, 0, 1, {}), context)


def test_client_app_trains_and_sends_at_its_own_rank(tiny_config, server_identity):
    """Mixed ranks on Flower: the ClientApp runs the simulator's client_round on a download cut
    to its rank, sends only its rows of A and keeps a B of r_k columns."""
    cfg = tiny_config("method=sfed-lora", "lora.rank=8", "lora.client_ranks=[2, 4, 8]")
    fed = build_federation(cfg, load_task(cfg.data, seed=cfg.seed))
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    download = fed.download(0)  # what the ServerApp sends client 0 (rank 2)
    assert all(t.shape[0] == 2 for n, t in download.items() if tensor_kind(n) == "A")
    reply = client_app.train(_message(cfg, 0, 1, download), context)
    result, update = read_train_reply(reply)
    expected = client_round(fed, fed.client(0), fed.clients[0], download, 1)
    assert result.loss == expected.result.loss
    assert {tensor_kind(n) for n in update} == {"A", "head"}
    assert all(
        update[n].shape == download[n].shape and torch.equal(update[n], expected.update[n]) for n in update
    )
    kept = context.state.array_records[STATE_TENSORS]
    assert all(kept[n].numpy().shape[1] == 2 for n in kept if tensor_kind(n) == "B")
