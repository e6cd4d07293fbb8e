"""A node that skipped rounds catches up on the base change with the rounds' changes since the
one it holds (factors where they are smaller), or the whole ΔW where that is smaller; it ends
with the server's bits; the server keeps no change no node can need."""

import torch
from flwr.app import Context, Message, MessageType, RecordDict

from sfedlora.data import load_task
from sfedlora.engine.simulator import run_round
from sfedlora.federated.catchup import BaseHistory, CatchUp, Change, change_bytes, fold
from sfedlora.federated.federation import build_federation
from sfedlora.federated.kinds import split_base
from sfedlora.flower import client_app
from sfedlora.flower.records import (
    CONFIG,
    config_text,
    load_held_base,
    read_request,
    read_train_reply,
    request,
)

W = "m.q.base_layer.weight"
D = 40  # a 40 x 40 weight: a rank-2 change is 2·80 fp32 + 2 float64 = 656 bytes, the matrix 6400


def change(seed: int, rank: int = 2) -> Change:
    g = torch.Generator().manual_seed(seed)
    return Change.of(
        torch.randn(D, rank, generator=g),
        torch.rand(rank, generator=g).double(),
        torch.randn(rank, D, generator=g),
    )


def played(rounds: int, took: dict[int, list[int]]) -> tuple[BaseHistory, dict[str, torch.Tensor]]:
    """The server's history and ΔW after ``rounds`` rounds, client k sampled in (and taking the
    download of) the rounds ``took[k]``."""
    history, delta = BaseHistory(), {}
    for t in range(1, rounds + 1):
        changes = {W: change(t)}
        delta = {W: fold(delta.get(W), changes[W])}
        history.add(t, changes)
        sampled = [k for k in took if t in took[k]]
        history.close(t, sampled, sampled, 4 * D * D)
    return history, delta


def test_a_change_travels_as_its_factors_where_they_are_smaller_and_folds_exactly():
    low, full = change(1), change(1, rank=30)  # 30·(80·4 + 8) bytes > the 6400 of the matrix
    assert set(low.parts) == {"u", "c", "v"} and low.nbytes == change_bytes(D, D, 2) == 656
    assert set(full.parts) == {"dense"} and full.nbytes == 4 * D * D
    u, c, v = (low.parts[p] for p in "ucv")
    torch.testing.assert_close(low.value(), (u.double() * c) @ v.double(), rtol=0, atol=0)
    torch.testing.assert_close(low.T.value(), low.value().T, rtol=0, atol=1e-12)  # a Conv1D's weight


def test_a_node_that_skipped_two_rounds_gets_their_changes_and_ends_with_the_servers_bits():
    # Client 0 is sampled in every round; client 1 in rounds 1 and 2, then skips 3 and 4.
    history, delta = played(4, {0: [1, 2, 3, 4], 1: [1, 2]})
    assert history.held == {0: 3, 1: 1}
    # Round 5: client 1 holds ΔW as of round 1 and gets the changes of rounds 2 to 4, as factors.
    catch = history.catch_up(1, delta, 4)
    assert catch.since == 1 and [r for r, _ in catch.steps] == [2, 3, 4] and catch.nbytes == 3 * 656
    wired = CatchUp.from_flat(catch.upto, catch.since, catch.flat())
    assert torch.equal(wired.onto(played(1, {})[1], 1)[W], delta[W])  # the server's bits
    # Client 0 saw round 4's download: it gets round 4's change alone.
    assert [r for r, _ in history.catch_up(0, delta, 4).steps] == [4]
    # A node the server knows nothing of gets the whole ΔW; so does one that did not reply.
    assert history.catch_up(2, delta, 4).since is None and history.catch_up(2, delta, 4).nbytes == 4 * D * D
    history.close(5, [0], [], 4 * D * D)
    assert history.catch_up(0, delta, 4).since is None


def test_the_server_keeps_only_the_changes_some_node_can_need():
    history, _ = played(3, {0: [1, 2, 3], 1: [1, 2, 3]})
    assert history.changes.keys() == {3} and history.start == 2  # both hold round 2's ΔW
    # A node far behind: once the changes since its round outweigh ΔW, it gets the whole.
    history, delta = played(12, {0: list(range(1, 13)), 1: [1]})
    assert (
        history.held[1] == 0 and sum(c.nbytes for ch in history.changes.values() for c in ch.values()) < 6400
    )
    assert history.catch_up(1, delta, 12).since is None
    restored = BaseHistory.from_state_dict(history.state_dict())  # a checkpoint keeps it
    assert restored.held == history.held and restored.changes.keys() == history.changes.keys()
    # A resumed server believes what each node says it holds, up to its own round.
    restored.rejoin(1, 11, 12)
    assert [r for r, _ in restored.catch_up(1, delta, 12).steps] == [12]
    restored.rejoin(0, 13, 12)  # a round the resumed server has not played again
    assert restored.catch_up(0, delta, 12).since is None


def test_a_flower_node_that_skipped_rounds_trains_on_the_simulators_base_change(
    tiny_config, server_identity, tmp_path
):
    """FLoRA, one client a round of three: client 1's node gets only the requests of the rounds
    it is sampled in, catches up on the base change and trains to the simulator's bits."""
    cfg = tiny_config("method=flora", "federation.clients_per_round=1", "federation.rounds=6")
    fed = build_federation(cfg, load_task(cfg.data, seed=cfg.seed))
    disk = {"partition-id": 1, "state-dir": str(tmp_path / "node")}
    context = Context(run_id=1, node_id=7, node_config=disk, state=RecordDict(), run_config={})
    trained = []
    for round_ in range(1, 7):
        body = request(config_text(cfg), "run-a", 1, round_, *fed.wire(1))
        msg = Message(body, dst_node_id=7, message_type=MessageType.TRAIN)
        before = split_base(fed.server)[1]
        record = run_round(fed)
        if record["clients"] != [1]:
            continue
        trained.append(round_)
        catch = read_request(msg).catch
        if len(trained) > 1:  # what it missed since the round it last trained in, as factors
            assert catch.since == trained[-2] - 1 and all(
                "u" in c.parts for _, ch in catch.steps for c in ch.values()
            )
        _, update = read_train_reply(client_app.train(msg, context))
        held_round, held = load_held_base(context.state, "run-a")
        assert held_round == round_ - 1 and all(torch.equal(held[n], before[n]) for n in before)
        assert all(torch.equal(update[n], fed.clients[1].tensors[n]) for n in update)
    assert len(trained) >= 2 and trained[1] - trained[0] > 1  # it did skip rounds
    # Started again (an empty Context.state), the node says at the handshake what its state-dir holds.
    again = Context(run_id=2, node_id=7, node_config=disk, state=RecordDict(), run_config={})
    hello = request(config_text(cfg), "run-a", -1, 0, {})
    reply = client_app.query(Message(hello, dst_node_id=7, message_type=MessageType.QUERY), again)
    assert reply.content.config_records[CONFIG]["base_round"] == trained[-1] - 1
