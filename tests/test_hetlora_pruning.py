"""HetLoRA's local rank self-pruning: the regulariser against hand-computed values, the
pruning decision, the pruned rank kept in the client's state, its smaller upload, and the
server's zero-padding of it."""

import math

import pytest
import torch

from sfedlora.config import build_config
from sfedlora.data import load_task
from sfedlora.engine.executors import auto_engine
from sfedlora.engine.fused import check_fused
from sfedlora.engine.simulator import run_round
from sfedlora.errors import SfedloraError
from sfedlora.federated.client import ClientState, client_round
from sfedlora.federated.federation import build_federation
from sfedlora.federated.kinds import tensor_kind
from sfedlora.federated.methods import Replies, get_method
from sfedlora.federated.pruning import Pruning, held_rank, pruning_of
from sfedlora.federated.ranks import RankPlan, pad

A, B, HEAD = "m.q.lora_A.default.weight", "m.q.lora_B.default.weight", "m.classifier.weight"


def adapter(rows: int) -> dict[str, torch.Tensor]:
    """A rank-``rows`` layer (d_in = 3, d_out = 2) whose components 2 and 3 are known."""
    a, b = torch.zeros(rows, 3), torch.zeros(2, rows)
    a[0, 2] = b[1, 0] = 5.0  # the kept part: never in the tail
    a[2, 0], a[3, 1] = 1.0, 2.0
    b[0, 2], b[1, 3] = 1.0, 1.0
    if rows > 4:  # padding beyond the client's rank: never counted
        a[4:], b[:, 4:] = 7.0, 7.0
    return {A: a, B: b}


@pytest.mark.parametrize("rows", [4, 6])
def test_the_tail_norm_is_that_of_the_last_components_product_or_factors(rows):
    # r = 4, γ = 0.5: components 2 and 3 are the tail; B_tail A_tail = [[1, 0, 0], [0, 2, 0]].
    product, factors = Pruning(0.5, 0.1, 1, "product"), Pruning(0.5, 0.1, 1, "factors")
    assert float(product.tail(adapter(rows), 4)) == pytest.approx(math.sqrt(5))
    assert float(factors.tail(adapter(rows), 4)) == pytest.approx(math.sqrt(2) * math.sqrt(5))
    assert float(product.penalty(adapter(rows), 4)) == pytest.approx(0.1 * math.sqrt(5))


def test_the_kept_rank_is_the_floor_of_gamma_r_never_below_the_minimum():
    rule = Pruning(0.9, 0.0, 2, "product")
    assert [rule.kept(r) for r in (10, 8, 3, 2, 1)] == [9, 7, 2, 2, 1]
    assert rule.decide(before=1.0, after=0.5, rank=10) == 9  # the tail shrank: pruned
    assert rule.decide(before=0.5, after=1.0, rank=10) == 10  # it grew: kept
    assert rule.decide(before=0.0, after=0.0, rank=10) == 10


def test_the_server_zero_pads_a_pruned_clients_upload():
    plan = RankPlan.build("lora", 8.0, 4, None, 2, 2)  # one assigned rank, 4; client 0 pruned to 2
    full = adapter(4)
    ups = [{A: full[A][:2] + 1, B: full[B][:, :2] + 1}, full]
    server = {A: torch.zeros(4, 3), B: torch.zeros(2, 4)}
    new = get_method("hetlora").aggregate(Replies(1, [0, 1], ups, [1.0, 1.0], plan, server, build_config()))
    norms = [float(torch.linalg.matrix_norm(2.0 * u[B] @ u[A])) for u in ups]  # γ = 8/4 for both
    w = [n / sum(norms) for n in norms]
    padded = pad(ups[0], server)
    torch.testing.assert_close(new[A], w[0] * padded[A] + w[1] * full[A])
    torch.testing.assert_close(new[B], w[0] * padded[B] + w[1] * full[B])


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    overrides = [
        f"output_dir={tmp_path_factory.mktemp('runs')}",
        "data.max_train_examples=120",
        "data.max_eval_examples=48",
        "model.max_length=32",
        "federation.n_clients=3",
        "federation.local_steps=2",
        "partition.min_size=8",
        "train.batch_size=8",
        "lora.rank=4",
        "method=hetlora",
        "federation.hetlora_prune_decay=0.75",
        "federation.hetlora_prune_weight=10",
        "train.lr=0.01",
    ]
    cfg = build_config(overrides=overrides)
    return build_federation(cfg, load_task(cfg.data, seed=cfg.seed))


def with_tail(tensors, value):
    """``tensors`` with every B's last column (the tail at r = 4, γ = 0.75) set to ``value``."""
    return {
        n: t.clone().index_fill_(1, torch.tensor([3]), value) if tensor_kind(n) == "B" else t
        for n, t in tensors.items()
    }


def test_a_client_whose_tail_shrinks_prunes_and_sends_the_smaller_adapter(fed):
    download = with_tail(fed.download(0), 1.0)
    out = client_round(fed, fed.client(0), fed.clients[0], download, 1)
    assert out.state.rank == 3  # ⌊0.75 · 4⌋
    assert held_rank(out.update) == 3 and held_rank(out.state.tensors) == 3
    assert all(t.shape[1] == 3 for n, t in out.update.items() if tensor_kind(n) == "B")
    # The pruned rank survives the state's round trip (a checkpoint, a node's state file)...
    state = ClientState.from_state_dict(out.state.state_dict())
    assert state.rank == 3
    # ... and the next round trains and sends rank 3 from a download at the assigned rank 4.
    again = client_round(fed, fed.client(0), state, fed.download(0), 2)
    # (its tail, component 2, is the server's zero B there: it cannot shrink, so no new cut)
    assert held_rank(again.update) == 3 and again.state.rank == 3


def test_a_client_whose_tail_grows_keeps_its_rank(fed):
    # The server's B is zero at the start: the tail's norm can only grow in training.
    out = client_round(fed, fed.client(1), fed.clients[1], fed.download(1), 1)
    assert out.state.rank is None and held_rank(out.update) == 4


def test_a_round_with_a_pruned_client_aggregates_it_padded(fed):
    fed.server.update(with_tail(fed.server, 1.0))
    record = run_round(fed)
    assert record["aggregated"] == 3 and not record["rejected"]
    assert all(c.rank == 3 for c in fed.clients)
    # From then on the server sends, and the clients send back, rank 3 (or less).
    assert fed.pruned == {0: 3, 1: 3, 2: 3} and held_rank(fed.download(0)) == 3
    second = run_round(fed)
    assert second["aggregated"] == 3 and second["bytes_up"] < record["bytes_up"]
    assert second["bytes_down"] < record["bytes_down"]
    # The server's record of the pruned ranks is in its checkpoint.
    saved, fed.pruned = fed.state_dict(), {}
    fed.load_state_dict(saved)
    assert set(fed.pruned) == {0, 1, 2}
    assert {n: t.shape for n, t in fed.server.items()} == {
        n: t.shape for n, t in fed.initial.items() if n in fed.server
    }


def test_pruning_needs_the_per_client_engine_and_hetlora(fed):
    with pytest.raises(SfedloraError, match="the fused engine has no HetLoRA rank self-pruning"):
        check_fused(fed)
    assert auto_engine(fed) == "per-client"
    cfg = build_config(overrides=["method=fedit", "federation.hetlora_prune_decay=0.9"])
    with pytest.raises(SfedloraError, match="is HetLoRA's rank self-pruning, not fedit's"):
        pruning_of(cfg)
