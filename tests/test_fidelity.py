"""Faithful to the reference: optimizer state per round, aggregation in a real run, Flower's
client-count rounding, and DP-SGD's per-example gradients for causal LMs."""

import numpy as np
import pytest
import torch

from sfedlora.config import FederationConfig
from sfedlora.data import load_task
from sfedlora.engine.executors import InProcess
from sfedlora.engine.simulator import run_round
from sfedlora.federated.client import client_round
from sfedlora.federated.federation import build_federation
from sfedlora.federated.methods import select
from sfedlora.privacy import clip_per_example, per_example_gradients, per_example_norms

ADAMW = ("train.optimizer=adamw", "train.lr=0.01", "model.precision=fp32", "federation.local_steps=1")


def second_rounds_first_step(tiny_config, mode):
    """|change| / lr of every element client 0's first step of round 2 moved."""
    cfg = tiny_config(*ADAMW, f"train.optimizer_state={mode}", "method=fedit")
    fed = build_federation(cfg, load_task(cfg.data, seed=cfg.seed))
    run_round(fed)
    download = fed.download(0)
    before = {**fed.clients[0].tensors, **download}
    after = client_round(fed, fed.client(0), fed.clients[0], download, 2).state
    moved = torch.cat([(after.tensors[n] - before[n]).abs().flatten() for n in before])
    return fed, after, moved[moved > 0] / cfg.train.lr


def test_fresh_optimizer_starts_every_round_with_zero_moments(tiny_config):
    """The reference (FederatedScope) builds a new optimizer each round: Adam's first step
    with zero moments moves every element by lr (|m̂ / √v̂| = |g| / |g| = 1)."""
    fed, after, ratio = second_rounds_first_step(tiny_config, "fresh")
    assert after.optimizer is None  # nothing carried to the next round
    assert len(ratio) > 1000 and float(ratio.median()) == pytest.approx(1.0, abs=1e-4)
    assert float((ratio > 0.99).float().mean()) > 0.95


def test_persistent_optimizer_carries_its_moments_across_rounds(tiny_config):
    fed, after, ratio = second_rounds_first_step(tiny_config, "persistent")
    assert "exp_avg" in next(iter(after.optimizer["state"].values()))
    # Moments from round 1 mix in: the step is no longer lr everywhere.
    assert float((ratio - 1).abs().median()) > 0.01


def test_the_servers_a_is_the_example_weighted_mean_of_the_uploaded_as(tiny_config):
    """From a real round's tensors: clients of unequal size, one rank, FedSA-LoRA."""
    cfg = tiny_config("partition.kind=size", "partition.beta=1.0", "method=sfed-lora", "model.precision=fp32")
    fed = build_federation(cfg, load_task(cfg.data, seed=cfg.seed))
    sizes = fed.client_sizes
    assert len(set(sizes.tolist())) == len(sizes)  # unequal sizes, so the weights matter

    class Recording(InProcess):
        uploads: dict = {}

        def map(self, fn, args):
            args = list(args)
            for a, out in zip(args, super().map(fn, args)):
                self.uploads[a[0]] = out.update
                yield out

    recording = Recording(fed)
    record = run_round(fed, recording)
    assert record["aggregated"] == len(sizes) and set(recording.uploads) == set(range(len(sizes)))
    a_names = list(select(fed.initial, frozenset({"A"})))
    assert a_names and all(set(u) == set(fed.server) for u in recording.uploads.values())
    for n in a_names:
        uploaded = torch.stack([recording.uploads[k][n].double() for k in range(len(sizes))])
        weights = torch.tensor(sizes / sizes.sum(), dtype=torch.float64).view(-1, *[1] * (uploaded.dim() - 1))
        torch.testing.assert_close(fed.server[n].double(), (weights * uploaded).sum(0), rtol=1e-6, atol=1e-7)
        assert not torch.allclose(fed.server[n].double(), uploaded.mean(0), rtol=1e-4, atol=0)


@pytest.mark.parametrize("n, fraction", [(10, 0.35), (10, 0.25), (7, 0.5), (20, 0.99), (3, 0.1)])
def test_fraction_rounds_as_flowers_strategies_do(n, fraction):
    from flwr.server.strategy import FedAvg

    expected, _ = FedAvg(fraction_fit=fraction, min_fit_clients=1).num_fit_clients(n)
    assert FederationConfig(n_clients=n, fraction=fraction).sampled_per_round() == expected


def test_dp_sgd_on_a_causal_lm_clips_each_examples_own_gradient(lm_overrides):
    """Under DP-SGD the loss is each example's own token mean: an example's per-example
    gradient is the gradient of that example alone, whatever the other examples' lengths,
    so clipping it to C bounds what one example can change (the accounting's sensitivity)."""
    from sfedlora.config import build_config

    cfg = build_config(overrides=[*lm_overrides, "model.precision=fp32", "lora.dropout=0"])
    fed = build_federation(cfg, load_task(cfg.data, seed=cfg.seed))
    data = fed.client_data[0]
    idx = np.argsort(data.lengths())[[0, len(data) // 2, -1]]  # three examples of different lengths
    assert len(set(data.lengths()[idx].tolist())) == 3
    trained = {n: p for n, p in fed.params.items() if ".lora_" in n}
    for p in fed.params.values():
        p.requires_grad_(False)
    for p in trained.values():
        p.requires_grad_(True)
    fed.model.train()

    def loss(rows):
        return fed.task.loss(fed.model, data.collate(rows, fed.tokenizer), fed.compute, per_example=True)

    alone = []
    for i in idx:
        fed.model.zero_grad()
        loss([i]).backward()
        alone.append({n: p.grad.clone() for n, p in trained.items()})
    with per_example_gradients(fed.model):
        loss(idx).backward()
        samples = {n: p.grad_sample.detach().clone() for n, p in trained.items()}
    for j in range(len(idx)):
        for n in trained:
            torch.testing.assert_close(samples[n][j], alone[j][n], rtol=1e-3, atol=1e-6)
    bound = float(per_example_norms(samples).min()) / 2
    assert (per_example_norms(clip_per_example(samples, bound)) <= bound * (1 + 1e-6)).all()
