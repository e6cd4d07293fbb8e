"""Local training pieces: learning-rate schedule, batch sampling, client state across rounds."""

import numpy as np
import pytest
import torch

from sfedlora.config import TrainConfig
from sfedlora.data import load_task
from sfedlora.engine.simulator import run_round
from sfedlora.federated.client import _batch_indices, lr_at
from sfedlora.federated.federation import build_federation
from sfedlora.federated.shared import steps_per_round


def test_warmup_then_schedules():
    cfg = TrainConfig(lr=1.0, warmup_steps=4, schedule="linear")
    assert [lr_at(s, 14, cfg) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, 14, cfg) == 1.0 and lr_at(9, 14, cfg) == pytest.approx(0.5) and lr_at(14, 14, cfg) == 0.0
    cos = TrainConfig(lr=2.0, schedule="cosine")
    assert (
        lr_at(0, 10, cos) == 2.0
        and lr_at(5, 10, cos) == pytest.approx(1.0)
        and lr_at(10, 10, cos) == pytest.approx(0.0)
    )
    assert lr_at(123, 10, TrainConfig(lr=0.3)) == 0.3


def test_steps_from_epochs():
    assert steps_per_round(100, 16, 5, None) == 5
    assert steps_per_round(100, 16, None, 1.0) == 7
    assert steps_per_round(100, 16, None, 0.5) == 4


@pytest.mark.parametrize("group", [False, True])
def test_batches_cover_the_data_without_replacement(group):
    lengths = np.random.default_rng(0).integers(3, 60, size=40)
    g = torch.Generator().manual_seed(1)
    batches = _batch_indices(lengths, 8, 5, g, group)
    assert [len(b) for b in batches] == [8] * 5
    assert sorted(np.concatenate(batches).tolist()) == list(range(40))  # one epoch, each example once
    if group:
        spans = [lengths[b].max() - lengths[b].min() for b in batches]
        assert max(spans) < lengths.max() - lengths.min()
        # batch order is still random: not sorted by length
        firsts = [lengths[b].min() for b in batches]
        assert firsts != sorted(firsts) and firsts != sorted(firsts, reverse=True)


def test_batches_are_reproducible_from_the_generator_state():
    lengths = np.arange(30)
    g = torch.Generator().manual_seed(5)
    state = g.get_state()
    a = _batch_indices(lengths, 4, 12, g, True)
    g.set_state(state)
    b = _batch_indices(lengths, 4, 12, g, True)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert len(np.concatenate(a)) == 48  # more than one pass: reshuffled, not repeated


def test_clients_not_sampled_keep_their_state(tiny_config):
    # A persistent optimizer, so the sampled client's moments are part of what changes.
    cfg = tiny_config(
        "method=sfed-lora",
        "federation.clients_per_round=1",
        "train.lr=0.01",
        "train.optimizer_state=persistent",
    )
    fed = build_federation(cfg, load_task(cfg.data, seed=cfg.seed))
    before = [{n: t.clone() for n, t in c.tensors.items()} for c in fed.clients]
    rec = run_round(fed)
    (k,) = rec["clients"]
    assert fed.ranks.gamma() == pytest.approx(16 * (1 / 4) ** 0.5)  # N = 1 update averaged per round
    for j, c in enumerate(fed.clients):
        same = all(torch.equal(before[j][n], c.tensors[n]) for n in c.tensors)
        assert same == (j != k)
        assert (c.optimizer is None) == (j != k) and c.steps == (2 if j == k else 0)
