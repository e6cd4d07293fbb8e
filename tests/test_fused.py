"""The fused engine against the per-client one: same adapters, same metrics (fp32, dropout off)."""

import itertools

import numpy as np
import pytest
import torch

from sfedlora.config import TrainConfig, build_config
from sfedlora.data import load_task
from sfedlora.engine.executors import Fused, InProcess, make_executor
from sfedlora.engine.fused import micro_batches
from sfedlora.engine.simulator import run_round
from sfedlora.engine.stacked import StackedOptimizer
from sfedlora.errors import SfedloraError
from sfedlora.federated.evaluation import ScoredHere, evaluate
from sfedlora.federated.federation import build_federation
from sfedlora.federated.jobs import EvalJob

SGD = ("model.precision=fp32", "train.optimizer=sgd", "train.lr=0.05", "simulator.fused_tokens=96")


def federation(cfg):
    fed = build_federation(cfg, load_task(cfg.data, seed=cfg.seed))
    # Dropout masks depend on the batch they are drawn for, so the engines draw different ones.
    for m in fed.model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return fed


def both(cfg, rounds=2):
    """The same run on each engine: (per-client federation, fused federation, their records)."""
    feds, records = [], []
    for engine in (InProcess, Fused):
        fed = federation(cfg)
        executor = engine(fed)
        records.append([run_round(fed, executor) for _ in range(rounds)])
        records[-1].append(evaluate(fed, ScoredHere(executor)))
        feds.append(fed)
    return (*feds, *records)


def assert_same(a, b, ra, rb, atol=1e-5):
    for k in range(len(a.clients)):
        assert a.clients[k].tensors.keys() == b.clients[k].tensors.keys()
        for n, t in a.clients[k].tensors.items():
            torch.testing.assert_close(b.clients[k].tensors[n], t, atol=atol, rtol=0, msg=f"client {k} {n}")
        assert a.clients[k].steps == b.clients[k].steps
    for n, t in a.server.items():
        torch.testing.assert_close(b.server[n], t, atol=atol, rtol=0, msg=n)
    for x, y in zip(ra, rb):
        for key, value in x.items():
            if isinstance(value, float) and key != "seconds":
                assert y[key] == pytest.approx(value, abs=1e-5), key


@pytest.mark.parametrize(
    "method",
    [
        "fedit",
        "ffa-lora",
        "fedsa-lora",
        "rolora",
        "fedsa-rslora",
        "sfed-lora",
        "fedex-lora",
        "flora",
        "flexlora",
        "hetlora",
    ],
)
def test_every_method_trains_the_same_adapters_fused(tiny_config, method):
    a, b, ra, rb = both(tiny_config(*SGD, f"method={method}"))
    assert_same(a, b, ra, rb)
    assert ra[-1]["personal_accuracy_mean"] == pytest.approx(rb[-1]["personal_accuracy_mean"], abs=1e-9)


def test_unequal_clients_mixed_ranks_and_local_epochs_fused(tiny_config):
    """Clients of unequal size take unequal local steps (local_epochs) at their own rank and γ:
    those done leave the lockstep; SGD momentum and weight decay; a local head; the clients
    trained in groups (simulator.fused_clients)."""
    cfg = tiny_config(
        *SGD,
        "partition.kind=size",
        "partition.beta=1.0",
        "federation.local_steps=null",
        "federation.local_epochs=0.3",
        "lora.rank=8",
        "lora.client_ranks=[2, 4, 8]",
        "train.momentum=0.9",
        "train.weight_decay=0.01",
        "federation.local_head=true",
        "simulator.fused_clients=2",  # the round's three clients in two groups
    )
    a, b, ra, rb = both(cfg)
    steps = [a.clients[k].steps for k in range(3)]
    assert len(set(steps)) > 1  # the lockstep really had clients leave early
    assert_same(a, b, ra, rb)


def test_persistent_adamw_with_clipping_fused(tiny_config):
    """AdamW's moments carried across rounds in torch's own state_dict format, a per-client
    schedule, and clipping by each client's own norm (max_grad_norm small enough to bite).

    AdamW divides by √v: where a gradient element is near zero, float-order noise becomes an
    update of up to lr, so the engines agree to a fraction of lr rather than to 1e-5."""
    cfg = tiny_config(
        "model.precision=fp32",
        "train.optimizer_state=persistent",
        "train.schedule=cosine",
        "train.warmup_steps=1",
        "train.max_grad_norm=0.05",
        "train.lr=0.0005",
        "simulator.fused_tokens=96",
    )
    a, b, ra, rb = both(cfg, rounds=3)
    assert_same(a, b, ra, rb, atol=0.1 * cfg.train.lr)
    assert b.clients[0].optimizer["state"] and "exp_avg" in next(
        iter(b.clients[0].optimizer["state"].values())
    )
    for x, y in zip(a.clients[0].optimizer["state"].values(), b.clients[0].optimizer["state"].values()):
        assert float(x["step"]) == float(y["step"]) == 6


def test_causal_lm_fused(lm_overrides):
    cfg = build_config(overrides=[*lm_overrides, *SGD, "method=sfed-lora", "lora.scaling=sfed"])
    a, b, ra, rb = both(cfg)
    assert_same(a, b, ra, rb)
    assert ra[-1]["personal_perplexity_mean"] == pytest.approx(rb[-1]["personal_perplexity_mean"], rel=1e-5)


def test_micro_batches_sort_by_length_and_keep_within_the_token_budget():
    lengths = np.array([5, 30, 7, 7, 12, 90, 3, 12])
    cuts = micro_batches(lengths, 32)
    assert sorted(np.concatenate(cuts).tolist()) == list(range(len(lengths)))
    flat = np.concatenate(cuts)
    assert (np.diff(lengths[flat]) >= 0).all()
    for mb in cuts:
        assert len(mb) * lengths[mb].max() <= 32 or len(mb) == 1  # a longer row goes alone
    assert [lengths[mb].tolist() for mb in cuts] == [[3, 5, 7, 7], [12, 12], [30], [90]]


def _cost(lengths, cuts, overhead):
    return sum(len(mb) * lengths[mb].max() + overhead for mb in cuts)


@pytest.mark.parametrize("seed", range(5))
def test_micro_batches_are_the_cheapest_cuts(seed):
    """Against every way of cutting the sorted rows into runs within the budget."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 40, size=10)
    budget, overhead = 96, 20
    cuts = micro_batches(lengths, budget, overhead)
    order = np.sort(lengths)
    best = min(
        _cost(order, [np.arange(a, b) for a, b in zip((0, *ends), (*ends, len(order)))], overhead)
        for k in range(len(order))
        for ends in itertools.combinations(range(1, len(order)), k)
        if all(
            (b - a) * order[b - 1] <= budget or b - a == 1 for a, b in zip((0, *ends), (*ends, len(order)))
        )
    )
    assert _cost(lengths, cuts, overhead) == best


def test_micro_batches_cut_between_clients_length_groups():
    """A step's rows cluster by the clients' length groups: greedy filling would pad the short
    cluster to the long one; the cut falls between them."""
    lengths = np.array([40] * 16 + [6] * 16)
    cuts = micro_batches(lengths, 1024)
    assert [sorted(set(lengths[mb].tolist())) for mb in cuts] == [[6], [40]]


@pytest.mark.parametrize(
    "settings",
    [
        {"optimizer": "sgd", "momentum": 0.9, "weight_decay": 0.1},
        {"optimizer": "sgd"},
        {"optimizer": "adamw", "weight_decay": 0.1},
    ],
)
def test_stacked_optimizer_is_each_clients_torch_optimizer(settings):
    """Slot by slot the torch update, with each slot's own lr; a slot not stepped is untouched;
    a slot's state_dict loads into a torch optimizer that carries on identically."""
    cfg = TrainConfig(lr=0.1, **settings)
    g = torch.Generator().manual_seed(0)
    shapes = {"a": (3, 4), "b": (5,)}
    stacks = {n: torch.randn(3, *s, generator=g).requires_grad_(True) for n, s in shapes.items()}
    mine = [{n: torch.nn.Parameter(stacks[n][i].detach().clone()) for n in shapes} for i in range(3)]
    from sfedlora.federated.client import make_optimizer

    theirs = [make_optimizer(list(p.values()), cfg) for p in mine]
    stacked = StackedOptimizer(cfg, stacks, list(shapes))
    lrs = [0.1, 0.03, 0.2]
    for step in range(3):
        active = [0, 2] if step == 1 else [0, 1, 2]
        for n in shapes:
            stacks[n].grad = torch.randn(stacks[n].shape, generator=g)
        for i in active:
            for n, p in mine[i].items():
                p.grad = stacks[n].grad[i].clone()
            for group in theirs[i].param_groups:
                group["lr"] = lrs[i]
            theirs[i].step()
        stacked.step(list(shapes), torch.tensor(active), torch.tensor([lrs[i] for i in active]))
        for i in range(3):
            for n in shapes:
                torch.testing.assert_close(stacks[n][i].detach(), mine[i][n].detach(), atol=1e-7, rtol=1e-6)
    for i in range(3):
        reloaded = make_optimizer(list(mine[i].values()), cfg)
        reloaded.load_state_dict(stacked.state_dict(i))
        assert str(reloaded.state_dict()["state"]) == str(theirs[i].state_dict()["state"])


def test_fused_outputs_are_each_models_own(tiny_config):
    fed = federation(tiny_config(*SGD, "method=sfed-lora"))
    run_round(fed)
    jobs = [EvalJob(fed.personal_tensors(k), k) for k in range(3)]
    alone = list(InProcess(fed).outputs(jobs))
    together = list(Fused(fed).outputs(jobs))
    assert not np.allclose(alone[0], alone[1])  # the clients' own B differ
    for x, y in zip(alone, together):
        np.testing.assert_allclose(y, x, atol=1e-5)


def test_fused_engine_split_between_worker_processes(tiny_config):
    """simulator.workers=2 with the fused engine: each worker fuses its share of the clients;
    the same adapters as the per-client engine."""
    cfg = tiny_config(*SGD, "method=sfed-lora", "federation.n_clients=4")
    a = federation(cfg)
    run_round(a, InProcess(a))
    b = federation(cfg)
    workers = Fused(b, 2)
    try:
        record = run_round(b, workers)
        scores = evaluate(b, ScoredHere(workers))
    finally:
        workers.close()
    assert record["aggregated"] == 4 and "personal_accuracy_mean" in scores
    assert_same(a, b, [], [])


def test_auto_picks_the_fused_engine_where_clients_take_one_step_on_a_cpu(tiny_config):
    cfg = tiny_config("simulator.engine=auto", "federation.local_steps=1")
    fed = build_federation(cfg, load_task(cfg.data, seed=cfg.seed))
    executor = make_executor(fed)
    try:  # split over one worker process per torch thread, as the per-client engine is
        assert isinstance(executor, Fused)
        assert executor.n == min(torch.get_num_threads(), len(fed.clients))
    finally:
        executor.close()
    fed.cfg.federation.local_steps = 3  # more steps: the per-client workers were faster here
    fed.cfg.simulator.workers = 1
    assert isinstance(make_executor(fed), InProcess)


def test_client_dp_sgd_fused(tiny_config):
    """Poisson batches, per-example clipping (the clip bites), and each client's own noise
    stream: the per-client engine's DP-SGD step, client by client."""
    cfg = tiny_config(
        *SGD,
        "method=sfed-lora",
        "privacy.dp=client",
        "privacy.noise_multiplier=0.5",
        "privacy.clip_norm=0.05",
    )
    a, b, ra, rb = both(cfg)
    assert_same(a, b, ra, rb)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here)")
def test_fused_on_cuda_matches_the_per_client_engine(tiny_config):
    a, b, ra, rb = both(tiny_config(*SGD, "method=sfed-lora", "model.device=cuda"))
    assert_same(a, b, ra, rb)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here)")
def test_fp16_is_refused_by_the_fused_engine(tiny_config):
    cfg = tiny_config("simulator.engine=fused", "model.device=cuda", "model.precision=fp16")
    fed = build_federation(cfg, load_task(cfg.data, seed=cfg.seed))
    with pytest.raises(SfedloraError, match="no fp16 loss scaling: use model.precision=bf16"):
        make_executor(fed)


def test_each_client_is_scored_on_its_own_held_out_share(tiny_config):
    """eval.client_test_fraction: a share of each partition is held out (not trained on) and each
    personalised model is scored on its own client's share, on either engine alike."""
    from sfedlora.federated.evaluation import outputs_of
    from sfedlora.federated.shared import client_parts

    cfg = tiny_config(*SGD, "method=sfed-lora", "eval.client_test_fraction=0.25", "partition.kind=dirichlet")
    a, b, ra, rb = both(cfg, rounds=1)
    data = load_task(cfg.data, seed=cfg.seed)
    for k, (train, test) in enumerate(client_parts(cfg, data.train.labels)):
        assert len(test) == round(0.25 * (len(train) + len(test))) and not set(train) & set(test)
        assert a.client_sizes[k] == len(train) and len(a.client_tests[k]) == len(test)
    own = [
        a.task.scores(outputs_of(a, a.personal_tensors(k), k, a.client_tests[k]), a.client_tests[k])[
            "accuracy"
        ]
        for k in range(3)
    ]
    assert ra[-1]["client_test_accuracy_mean"] == pytest.approx(np.mean(own))
    assert ra[-1]["client_test_accuracy_min"] == pytest.approx(min(own))
    sizes = [len(t) for t in a.client_tests]
    assert ra[-1]["client_test_accuracy_weighted"] == pytest.approx(np.average(own, weights=sizes))
    assert rb[-1]["client_test_accuracy_mean"] == pytest.approx(ra[-1]["client_test_accuracy_mean"])
    assert "personal_accuracy_mean" in ra[-1]  # the dev-set scores stay beside them


def test_client_test_scores_cover_every_client_when_eval_samples_a_few(tiny_config):
    """eval.clients bounds the dev-set passes; each client's own share is scored regardless."""
    from sfedlora.federated.evaluation import evaluate, outputs_of

    cfg = tiny_config(*SGD, "eval.client_test_fraction=0.25", "partition.kind=dirichlet", "eval.clients=1")
    fed = build_federation(cfg, load_task(cfg.data, seed=cfg.seed))
    run_round(fed)
    scores = evaluate(fed)
    own = [
        fed.task.scores(
            outputs_of(fed, fed.personal_tensors(k), k, fed.client_tests[k]), fed.client_tests[k]
        )["accuracy"]
        for k in range(len(fed.clients))
    ]
    assert len(scores["evaluated_clients"]) == 1 and len(own) == 3
    assert scores["client_test_accuracy_mean"] == pytest.approx(np.mean(own))
    assert scores["client_test_accuracy_min"] == pytest.approx(min(own))
