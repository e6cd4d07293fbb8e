"""A SuperNode's own disk: its client's state survives a restart, and it trains on its own data."""

import shutil

import pytest
import torch
from flwr.app import Context, Message, MessageType, RecordDict

from sfedlora.config import build_config
from sfedlora.data import bundled_sst2_dir, load_task
from sfedlora.errors import SfedloraError
from sfedlora.federated.federation import build_federation
from sfedlora.flower import client_app
from sfedlora.flower.node_state import STATE_FILE
from sfedlora.flower.records import config_text, read_train_reply, request


def train(cfg, fed, context, round_, run="run-a"):
    """One training request to client 1's ClientApp, as the ServerApp of run ``run`` sends it."""
    download = {n: t + 0.01 * round_ for n, t in fed.method.download(fed.server).items()}
    msg = Message(
        request(config_text(cfg), run, 1, round_, download), dst_node_id=7, message_type=MessageType.TRAIN
    )
    return read_train_reply(client_app.train(msg, context))


def node(**config):
    """A fresh ClientApp process (or a new Flower run): its Context.state is empty."""
    return Context(
        run_id=1, node_id=7, node_config={"partition-id": 1, **config}, state=RecordDict(), run_config={}
    )


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_a_restarted_node_continues_with_its_own_state(tiny_config, server_identity, tmp_path):
    cfg = tiny_config("method=sfed-lora", "train.optimizer_state=persistent")
    fed = build_federation(cfg, load_task(cfg.data, seed=cfg.seed))
    steady = node(**{"state-dir": str(tmp_path / "steady")})
    train(cfg, fed, steady, 1)
    _, expected = train(cfg, fed, steady, 2)
    killed = node(**{"state-dir": str(tmp_path / "killed")})
    train(cfg, fed, killed, 1)
    assert (tmp_path / "killed" / STATE_FILE).is_file()
    restarted = node(**{"state-dir": str(tmp_path / "killed")})  # a new process: Context.state is empty
    _, update = train(cfg, fed, restarted, 2)
    assert same(update, expected)
    # Without the saved state the client would have started again from the initial one.
    amnesiac = node()
    train(cfg, fed, node(), 1)
    _, forgot = train(cfg, fed, amnesiac, 2)
    assert not same(forgot, expected)


def test_a_node_never_mixes_runs(tiny_config, server_identity, tmp_path):
    cfg = tiny_config("method=sfed-lora")
    fed = build_federation(cfg, load_task(cfg.data, seed=cfg.seed))
    disk = {"state-dir": str(tmp_path)}
    train(cfg, fed, node(**disk), 1, run="run-a")
    # Another run on the same node starts its client afresh: as a node with nothing saved does.
    _, other = train(cfg, fed, node(**disk), 2, run="run-b")
    _, fresh = train(cfg, fed, node(), 2, run="run-c")
    assert same(other, fresh)
    # The same run asking for a round before one the node has trained is refused, not mixed.
    with pytest.raises(SfedloraError, match="give each node its own state-dir"):
        train(cfg, fed, node(**disk), 1, run="run-b")


def test_a_resumed_server_replays_the_round_it_stopped_in(tiny_config, server_identity, tmp_path):
    """The ServerApp checkpoints after a round concludes; one stopped mid-round asks for that
    round again, which the node may have trained already: it trains it again from the state
    before it, and goes on as if the round had happened once."""
    cfg = tiny_config("method=sfed-lora", "train.optimizer_state=persistent")
    fed = build_federation(cfg, load_task(cfg.data, seed=cfg.seed))
    steady = node()
    for round_ in (1, 2, 3):
        _, expected = train(cfg, fed, steady, round_)
    disk = {"state-dir": str(tmp_path)}
    train(cfg, fed, node(**disk), 1)
    train(cfg, fed, node(**disk), 2)  # the server stopped before round 2's checkpoint
    train(cfg, fed, node(**disk), 2)  # and, resumed, asks for round 2 again
    _, update = train(cfg, fed, node(**disk), 3)
    assert same(update, expected)


def test_a_node_trains_on_the_data_on_its_own_disk(tiny_overrides, server_identity, tmp_path):
    """node config data-dir: the node's files are its client's data, all of them; it reports
    their count, which the server weights it by."""
    own = tmp_path / "node-data"
    own.mkdir()
    rows = (bundled_sst2_dir() / "train.tsv").read_text().splitlines()
    (own / "train.tsv").write_text("\n".join(rows[:38]) + "\n")  # a header and 37 sentences
    shutil.copy(bundled_sst2_dir() / "dev.tsv", own / "dev.tsv")
    cfg = build_config(overrides=[*tiny_overrides, "data.source=tsv", f"data.data_dir={bundled_sst2_dir()}"])
    fed = build_federation(cfg, load_task(cfg.data, seed=cfg.seed))
    result, _ = train(cfg, fed, node(**{"data-dir": str(own)}), 1)
    assert result.examples == 37 and result.examples != fed.client_sizes[1]
    result, _ = train(cfg, fed, node(), 1)
    assert result.examples == fed.client_sizes[1]
    with pytest.raises(SfedloraError, match="is not a directory"):
        train(cfg, fed, node(**{"data-dir": str(tmp_path / "nowhere")}), 1)
