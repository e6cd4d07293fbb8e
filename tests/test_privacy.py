"""Differential privacy: clipping bounds, noise scale, accounting, end-to-end runs, bad configs."""

import json

import numpy as np
import pytest
import torch

from sfedlora.config import build_config
from sfedlora.driver.experiment import run
from sfedlora.driver.rundir import read_metrics
from sfedlora.errors import SfedloraError
from sfedlora.lora.models import build_classifier, trainable_parameters
from sfedlora.privacy import (
    clip_per_example,
    clip_update,
    epsilon,
    noise_multiplier_for,
    per_example_gradients,
    per_example_norms,
    plan_privacy,
    poisson_batches,
    private_gradient,
    user_level_mean,
)


def test_per_example_gradients_are_clipped_to_the_bound():
    """Opacus's per-example gradients of the real LoRA model, clipped over all tensors together."""
    model, tok = build_classifier("minilm", 2, 4, 16, "sfed", 3)
    params = trainable_parameters(model)
    batch = tok(
        ["a fine film", "dull and far too long , with nothing to say", "bad", "great fun"],
        padding=True,
        return_tensors="pt",
    )
    model.train()
    with per_example_gradients(model):
        model(**batch, labels=torch.tensor([1, 0, 0, 1])).loss.backward()
        samples = {n: p.grad_sample for n, p in params.items()}
    assert not any(hasattr(p, "grad_sample") for p in params.values())  # the hooks' traces are gone
    assert all(g.shape == (4, *params[n].shape) for n, g in samples.items())
    # The per-example gradients average to the batch gradient: Opacus saw every LoRA layer.
    for n, p in params.items():
        torch.testing.assert_close(samples[n].mean(0), p.grad, atol=1e-6, rtol=1e-4)
    before = per_example_norms(samples)
    bound = float(before.min()) / 2  # every example must be clipped ...
    after = per_example_norms(clip_per_example(samples, bound))
    assert (after <= bound * (1 + 1e-6)).all()
    torch.testing.assert_close(after, torch.full_like(after, bound), rtol=1e-5, atol=0)
    loose = float(before.max()) * 2  # ... or none of them
    torch.testing.assert_close(per_example_norms(clip_per_example(samples, loose)), before)


def test_clipping_keeps_each_examples_direction():
    g = {"a": torch.tensor([[3.0, 4.0], [0.3, 0.4]]), "b": torch.tensor([[[0.0]], [[0.0]]])}
    out = clip_per_example(g, 1.0)
    torch.testing.assert_close(out["a"], torch.tensor([[0.6, 0.8], [0.3, 0.4]]), atol=1e-6, rtol=0)


def test_dp_sgd_noise_has_the_configured_standard_deviation():
    sigma, clip, expected_batch = 1.5, 0.8, 4.0
    g = torch.Generator().manual_seed(1234)
    # No example in the batch: the gradient is the noise alone, N(0, (σC / B)²).
    noise = private_gradient({}, {"w": torch.Size([300, 300])}, clip, sigma, expected_batch, g)["w"]
    # 90,000 draws: the sample std is within 1% of the true one with overwhelming probability.
    assert float(noise.std()) == pytest.approx(sigma * clip / expected_batch, rel=0.01)
    assert abs(float(noise.mean())) < 5 * sigma * clip / expected_batch / 300
    # With examples, the noise rides on the sum of the clipped gradients.
    samples = {"w": torch.ones(2, 300, 300)}
    g.manual_seed(1234)
    noisy = private_gradient(samples, {"w": torch.Size([300, 300])}, clip, sigma, expected_batch, g)["w"]
    torch.testing.assert_close(
        noisy - noise, torch.full((300, 300), 2 * clip / 300 / expected_batch), atol=1e-5, rtol=0
    )


def test_server_dp_noise_has_the_configured_standard_deviation():
    reference = {"w": torch.zeros(300, 300)}
    updates = [{"w": torch.zeros(300, 300)} for _ in range(4)]
    out = user_level_mean(
        updates, reference, clip_norm=2.0, noise_multiplier=0.9, rng=np.random.default_rng(7)
    )
    # Flower's compute_stdv: σ C / m for a mean of m clipped updates.
    assert float(out["w"].std()) == pytest.approx(0.9 * 2.0 / 4, rel=0.01)


def test_server_side_clipping_and_mean_on_hand_made_tensors():
    reference = {"a": torch.tensor([1.0, 1.0]), "b": torch.tensor([[0.0]])}
    big = {"a": torch.tensor([4.0, 1.0]), "b": torch.tensor([[4.0]])}  # change (3, 0, 4): norm 5
    small = {"a": torch.tensor([1.3, 1.0]), "b": torch.tensor([[0.4]])}  # change (0.3, 0, 0.4): norm 0.5
    clipped = clip_update(big, reference, 1.0)
    torch.testing.assert_close(clipped["a"], torch.tensor([1.6, 1.0]))
    torch.testing.assert_close(clipped["b"], torch.tensor([[0.8]]))
    torch.testing.assert_close(clip_update(small, reference, 1.0)["a"], small["a"])
    # σ = 0: the uniform (not example-weighted) mean of the clipped updates.
    mean = user_level_mean([big, small], reference, 1.0, 0.0, np.random.default_rng(0))
    torch.testing.assert_close(mean["a"], torch.tensor([(1.6 + 1.3) / 2, 1.0]))
    torch.testing.assert_close(mean["b"], torch.tensor([[(0.8 + 0.4) / 2]]))


def test_server_clipping_matches_flowers_strategy_math():
    """The same numbers as Flower's own functions, called here on numpy copies."""
    from flwr.supercore.differential_privacy import compute_clip_model_update, compute_stdv

    rng = np.random.default_rng(3)
    reference = {"x": torch.from_numpy(rng.normal(size=(5, 3))), "y": torch.from_numpy(rng.normal(size=7))}
    update = {n: t + torch.from_numpy(rng.normal(size=t.shape)) for n, t in reference.items()}
    ours = clip_update(update, reference, 0.7)
    theirs = [update[n].numpy().copy() for n in sorted(update)]
    compute_clip_model_update(theirs, [reference[n].numpy() for n in sorted(update)], 0.7)
    for n, t in zip(sorted(update), theirs):
        np.testing.assert_allclose(ours[n].numpy(), t, rtol=1e-12)
    assert compute_stdv(1.3, 0.7, 5) == pytest.approx(1.3 * 0.7 / 5)


def test_accountant_matches_opacus_computed_independently():
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    sigma, q, steps, delta = 1.1, 0.01, 500, 1e-5
    acc = RDPAccountant()
    for _ in range(steps):  # step by step, the way Opacus's optimizer hook records them
        acc.step(noise_multiplier=sigma, sample_rate=q)
    assert epsilon(sigma, q, steps, delta, "rdp") == pytest.approx(acc.get_epsilon(delta), rel=1e-9)
    orders = RDPAccountant.DEFAULT_ALPHAS
    eps, _ = get_privacy_spent(
        orders=orders, rdp=compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=orders), delta=delta
    )
    assert epsilon(sigma, q, steps, delta, "rdp") == pytest.approx(eps, rel=1e-9)
    assert 0.5 < eps < 2.0  # sanity: the regime of Abadi et al.'s MNIST example
    assert epsilon(sigma, q, 0, delta) == 0.0


def test_calibrated_noise_reaches_but_does_not_exceed_the_target():
    for target in (1.0, 3.0, 8.0):
        sigma = noise_multiplier_for(target, 1e-5, 0.04, 50, "rdp")
        eps = epsilon(sigma, 0.04, 50, 1e-5, "rdp")
        assert target * 0.97 < eps <= target
    assert noise_multiplier_for(1.0, 1e-5, 0.04, 50) > noise_multiplier_for(8.0, 1e-5, 0.04, 50)


def test_plan_calibrates_each_client_to_its_own_data_for_the_whole_run():
    cfg = build_config(
        overrides=[
            "privacy.dp=client",
            "privacy.epsilon=2",
            "federation.n_clients=2",
            "federation.rounds=4",
            "train.batch_size=8",
        ]
    )
    plan = plan_privacy(cfg, np.array([100, 400]), np.array([3, 3]))
    assert plan.sample_rate.tolist() == [0.08, 0.02]
    assert plan.noise_multiplier[0] > plan.noise_multiplier[1]  # a smaller client needs more noise
    ledger = np.zeros(2, dtype=np.int64)
    for _ in range(4):
        ledger = plan.spend(ledger, [0, 1])
    assert ledger.tolist() == [12, 12]
    assert (plan.epsilons(ledger) <= 2.0).all() and (plan.epsilons(ledger) > 1.9).all()
    server = plan_privacy(
        build_config(
            overrides=[
                "privacy.dp=server",
                "privacy.noise_multiplier=1",
                "federation.n_clients=10",
                "federation.clients_per_round=5",
            ]
        ),
        np.full(10, 50),
        np.full(10, 10),
    )
    assert server.sample_rate.tolist() == [0.5] * 10
    assert server.spend(np.zeros(10, dtype=np.int64), [0]).tolist() == [1] * 10  # every client: one release


def test_poisson_batches_sample_each_example_independently():
    g = torch.Generator().manual_seed(0)
    batches = poisson_batches(1000, 0.05, 200, g)
    sizes = np.array([len(b) for b in batches])
    assert sizes.mean() == pytest.approx(50, rel=0.05) and sizes.std() > 3  # variable size, as Poisson
    assert all(len(set(b.tolist())) == len(b) for b in batches)


def test_two_round_client_dp_run_writes_epsilon_to_metrics(tiny_config):
    result = run(tiny_config("privacy.dp=client", "privacy.epsilon=8", "name=dp"))
    records = read_metrics(result.run_dir)
    eps = [r["epsilon_max"] for r in records]
    assert [r["round"] for r in records] == [1, 2]
    assert 0 < eps[0] < eps[1] <= 8.0  # every client was sampled every round: the last one spends ~all of it
    assert eps[1] > 7.5
    assert all(r["delta"] == 1e-5 and r["epsilon_mean"] <= r["epsilon_max"] for r in records)
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["epsilon"] == eps[1] and summary["noise_multiplier"] > 0
    assert np.isfinite([r["train_loss"] for r in records]).all()


def test_client_dp_leaves_frozen_tensors_alone_and_replays_exactly(tiny_config):
    """FFA-LoRA's frozen A gets no gradient and so no noise; the same seed gives the same run."""
    a = run(
        tiny_config(
            "method=ffa-lora",
            "privacy.dp=client",
            "privacy.noise_multiplier=1.0",
            "name=a",
            "model.precision=fp32",
        )
    )
    b = run(
        tiny_config(
            "method=ffa-lora",
            "privacy.dp=client",
            "privacy.noise_multiplier=1.0",
            "name=b",
            "model.precision=fp32",
        )
    )
    drop = ("seconds", "eval_seconds")
    assert [{k: v for k, v in r.items() if k not in drop} for r in a.records] == [
        {k: v for k, v in r.items() if k not in drop} for r in b.records
    ]
    assert a.records[0]["grad_norm_A"] is None


def test_server_dp_run_adds_noise_of_std_sigma_c_over_the_clients_averaged(tiny_config):
    from sfedlora.federated.server import expected_update

    sigma, clip = 0.5, 0.01
    held = {}
    result = run(
        tiny_config(
            "method=fedit",
            "privacy.dp=server",
            f"privacy.noise_multiplier={sigma}",
            f"privacy.clip_norm={clip}",
            "federation.rounds=4",
            "faults.dropout=0.4",  # rounds that average 3, 2 and 1 of the 3 clients
            "eval.every=4",
            "name=server-dp",
        ),
        on_start=lambda fed, run_dir: held.update(fed=fed),
    )
    records = result.records
    entries = sum(t.numel() for t in expected_update(held["fed"], 1).values())
    averaged = [r for r in records if r["aggregated"]]
    assert len({r["aggregated"] for r in averaged}) >= 2, [r["aggregated"] for r in records]
    for r in averaged:
        # The server's change is the mean of n clipped changes (norm <= C) plus N(0, (σC/n)²) on
        # each of its ~185,000 entries: its norm is the noise's, to well under 1%, as C² is
        # under 0.1% of its square.
        measured_std = r["update_norm"] / entries**0.5
        assert measured_std == pytest.approx(sigma * clip / r["aggregated"], rel=0.02), r["round"]
    assert (
        records[0]["epsilon_max"] == pytest.approx(records[0]["epsilon_mean"])
        and records[0]["epsilon_max"] > 0
    )
    assert records[1]["epsilon_max"] > records[0]["epsilon_max"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["privacy.dp=client", "privacy.epsilon=0"], "privacy.epsilon: Input should be greater than 0"),
        (["privacy.dp=client", "privacy.epsilon=-1"], "privacy.epsilon: Input should be greater than 0"),
        (
            ["privacy.dp=client", "privacy.epsilon=3", "privacy.delta=1"],
            "privacy.delta: Input should be less than 1",
        ),
        (
            ["privacy.dp=client", "privacy.epsilon=3", "privacy.noise_multiplier=1"],
            "set epsilon or noise_multiplier, not both",
        ),
        (["privacy.dp=client"], "dp=client needs a target epsilon or a noise_multiplier"),
        (["privacy.epsilon=3"], "need dp=client or dp=server"),
        (["privacy.dp=server", "privacy.noise_multiplier=1", "privacy.secagg=true"], "SecAgg\\+ hides"),
        (
            ["privacy.dp=client", "privacy.noise_multiplier=1", "model.precision=fp16"],
            "does not support model.precision=fp16",
        ),
    ],
)
def test_bad_privacy_config_is_one_clear_line(overrides, message):
    with pytest.raises(SfedloraError, match=message) as err:
        build_config(overrides=overrides)
    assert "\n" not in str(err.value)


def test_bad_privacy_config_on_the_command_line_exits_2():
    from typer.testing import CliRunner

    from sfedlora.cli import app

    result = CliRunner().invoke(
        app,
        [
            "run",
            "--set",
            "privacy.dp=client",
            "--set",
            "privacy.epsilon=3",
            "--set",
            "privacy.noise_multiplier=1",
        ],
    )
    assert result.exit_code == 2
    assert "set epsilon or noise_multiplier, not both" in result.output


def test_secagg_is_refused_on_the_embedded_simulator(tiny_config):
    with pytest.raises(SfedloraError, match="privacy.secagg needs the Flower runtime"):
        run(tiny_config("privacy.secagg=true"))


FLOWER_COMPARED = ("train_loss", "personal_accuracy_mean", "personal_accuracy_min", "update_norm")


def _flower_run(tiny_overrides, *overrides):
    from typer.testing import CliRunner

    from sfedlora.cli import app

    sets = [a for o in [*tiny_overrides, *overrides] for a in ("--set", o)]
    result = CliRunner().invoke(app, ["run", "--runtime", "flower", *sets])
    assert result.exit_code == 0, result.output
    return result


def test_secagg_on_flower_gives_the_plain_weighted_mean(tiny_config, tiny_overrides):
    """SecAgg+ on Flower's simulation engine against the embedded simulator's plain average
    (which the Flower runtime matches without SecAgg, tests/test_flower.py)."""
    overrides = ("federation.rounds=2", "model.precision=fp32", "method=fedit")
    embedded = run(tiny_config("name=plain", *overrides))
    # Changes stay far below 0.05 here: quantisation steps of 0.1 / 2^22 leave float error only.
    _flower_run(
        tiny_overrides, *overrides, "privacy.secagg=true", "privacy.secagg_clipping_range=0.05", "name=secagg"
    )
    secure = read_metrics(embedded.run_dir.parent / "secagg")
    assert [r["round"] for r in secure] == [1, 2]
    for a, b in zip(embedded.records, secure):
        assert a["clients"] == b["clients"] and b["aggregated"] == 3 and b["update_norm"] > 0
        for key in FLOWER_COMPARED:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (a["round"], key)


def test_client_dp_on_flower_is_the_simulators_client_round(tiny_config, server_identity):
    """The ClientApp trains with the same DP-SGD code: the same noise, the same bits."""
    from flwr.app import Context, Message, MessageType, RecordDict

    from sfedlora.data import load_task
    from sfedlora.federated.client import client_round
    from sfedlora.federated.federation import build_federation
    from sfedlora.flower import client_app
    from sfedlora.flower.records import config_text, read_train_reply, request

    cfg = tiny_config("method=sfed-lora", "privacy.dp=client", "privacy.epsilon=3", "model.precision=fp32")
    fed = build_federation(cfg, load_task(cfg.data, seed=cfg.seed))
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 1}, state=RecordDict(), run_config={})
    download = fed.method.download(fed.server)
    msg = Message(
        request(config_text(cfg), "run-a", 1, 1, download), dst_node_id=7, message_type=MessageType.TRAIN
    )
    result, update = read_train_reply(client_app.train(msg, context))
    expected = client_round(fed, fed.client(1), fed.clients[1], download, 1)
    assert result.grad_norm == expected.result.grad_norm  # the private gradients' norms: noise included
    assert all(torch.equal(update[n], expected.update[n]) for n in expected.update)
    plain_fed = build_federation(
        tiny_config("method=sfed-lora", "model.precision=fp32"), load_task(cfg.data, seed=cfg.seed)
    )
    plain = client_round(plain_fed, plain_fed.client(1), fed.clients[1], download, 1)
    assert not all(torch.equal(plain.update[n], expected.update[n]) for n in expected.update)  # DP changed it


def test_resumed_dp_run_reports_the_same_epsilon(tiny_config):
    """The privacy ledger and the server's noise RNG are checkpointed: resume changes nothing."""
    overrides = (
        "method=fedit",
        "privacy.dp=server",
        "privacy.noise_multiplier=2",
        "privacy.clip_norm=0.05",
        "model.precision=fp32",
    )
    whole = run(tiny_config("name=whole", *overrides))

    class Stop(Exception):
        pass

    def stop(record):
        raise Stop

    with pytest.raises(Stop):
        run(tiny_config("name=cut", *overrides), on_record=stop)
    resumed = run(None, resume=whole.run_dir.parent / "cut")
    drop = ("seconds", "eval_seconds")
    assert [{k: v for k, v in r.items() if k not in drop} for r in resumed.records] == [
        {k: v for k, v in r.items() if k not in drop} for r in whole.records
    ]


def test_mixed_ranks_refuse_privacy():
    for extra in (
        ["privacy.dp=server", "privacy.noise_multiplier=1"],
        ["privacy.dp=client", "privacy.epsilon=1"],
        ["privacy.secagg=true"],
    ):
        with pytest.raises(SfedloraError, match=r"does not support lora.client_ranks \(mixed ranks\)"):
            build_config(overrides=["lora.client_ranks=[2,8]", "federation.n_clients=3", *extra])
