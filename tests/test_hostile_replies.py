"""A registered SuperNode is not trusted: replies with wrong dtypes, oversized or negative
shapes, extra or missing tensors, non-finite values, another run's key or an earlier round's
are refused and counted with their reason, before anything in them is decoded, and the round
goes on with the sound replies."""

import io
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from sfedlora.data import load_task
from sfedlora.federated.client import ClientResult
from sfedlora.federated.federation import build_server
from sfedlora.federated.server import expected_update
from sfedlora.flower.records import CONFIG, RESULT, UPDATE, Request, result_stats, train_reply
from sfedlora.flower.server_app import FlowerRounds

KEY = "run-a"


def npy_header(descr: str, shape: tuple) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def forged(update: dict, descr: str, shape: tuple, payload: bytes = b"\0" * 16) -> ArrayRecord:
    """``update`` with its first array's header claiming ``descr`` and ``shape`` (whatever
    its declared fields say)."""
    first, *rest = update
    arrays = {n: Array(torch_tensor=update[n]) for n in rest}
    arrays[first] = Array("float32", (4,), "numpy.ndarray", npy_header(descr, shape) + payload)
    return ArrayRecord(arrays)


def honest(update, k, round_=1, run=KEY):
    return train_reply(ClientResult(0.5, 1, {"A": 1.0}, 8), update, Request(None, "", run, k, round_, {}))


def hostile(kind: str, update: dict, k: int) -> RecordDict:
    first = next(iter(update))
    reply = honest(update, k)
    if kind == "dtype":
        reply[UPDATE] = ArrayRecord({n: t.double() for n, t in update.items()})
    elif kind == "oversized":  # a header claiming a terabyte: refused before anything is allocated
        reply[UPDATE] = forged(update, "<f4", (2**38,))
    elif kind == "negative shape":
        reply[UPDATE] = forged(update, "<f4", (-4, 2))
    elif kind == "pickle":  # an object array would need unpickling to load
        reply[UPDATE] = forged(update, "|O", (1,), b"\x80\x04\x95")
    elif kind == "keys":
        reply[UPDATE] = ArrayRecord(
            {"other": torch.zeros(2), **{n: t for n, t in update.items() if n != first}}
        )
    elif kind == "non-finite":
        reply[UPDATE] = ArrayRecord({n: torch.full_like(t, float("nan")) for n, t in update.items()})
    elif kind == "another run":
        reply = honest(update, k, run="run-b")
    elif kind == "replay":
        reply = honest(update, k, round_=0)
    elif kind == "stats":
        reply[RESULT] = MetricRecord({**result_stats(ClientResult(float("nan"), 1, {}, 8)), "secret": 1})
    elif kind == "no config":
        del reply[CONFIG]
    return reply


KINDS = {
    "honest": None,
    "dtype": "is float64",
    "oversized": f"({2**38},), expected float32",
    "negative shape": "(-4, 2), expected float32",
    "pickle": "is object(1,), expected float32",
    "keys": "wrong tensors (missing",
    "non-finite": "non-finite values in",
    "another run": "reply of another run",
    "replay": "in round 0, not this request",
    "stats": "training statistics of another kind (secret)",
    "no config": "reply of another run",
}


class Grid:
    """Flower's Grid as FlowerRounds uses it, each node answering with the reply ``make`` gives."""

    def __init__(self, make):
        self.make, self.pending = make, {}

    def push_messages(self, messages):
        ids = [f"m{i}" for i in range(len(messages))]
        self.pending = {i: int(m.metadata.dst_node_id) for i, m in zip(ids, messages)}
        return ids

    def pull_messages(self, ids):
        return [
            SimpleNamespace(
                metadata=SimpleNamespace(reply_to_message_id=i),
                has_error=lambda: False,
                content=self.make(node),
            )
            for i, node in self.pending.items()
            if i in ids
        ]


@pytest.fixture
def server(tiny_config, server_identity):
    cfg = tiny_config(f"federation.n_clients={len(KINDS)}", "partition.min_size=4", "method=fedit")
    return build_server(cfg, load_task(cfg.data, seed=cfg.seed))


def test_hostile_replies_are_refused_counted_and_the_round_goes_on(server):
    kinds = list(KINDS)
    before = {n: t.clone() for n, t in server.server.items()}
    upload = expected_update(server, 1)

    def reply(node):
        k = node - 100
        update = {n: t + 0.01 for n, t in server.ranks.view(upload, k).items()}
        return honest(update, k) if kinds[k] == "honest" else hostile(kinds[k], update, k)

    rounds = FlowerRounds(Grid(reply))
    rounds.cfg, rounds.text, rounds.key = server.cfg, "", KEY
    rounds.nodes = {k: 100 + k for k in range(len(kinds))}
    record = rounds.play(server)
    reasons = {r["client"]: r["reason"] for r in record["rejected"]}
    for k, kind in enumerate(kinds):
        if KINDS[kind] is None:
            assert k not in reasons
        else:
            assert KINDS[kind] in reasons.get(k, ""), (kind, reasons.get(k))
    assert record["aggregated"] == 1 and record["round"] == 1
    # The honest reply alone moved the global tensors: by its 0.01.
    for n, t in server.server.items():
        assert torch.allclose(t, before[n] + 0.01), n
