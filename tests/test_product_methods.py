"""Methods with server math of their own (FedEx-LoRA, ...), against hand-computed values:
the global product after a round is the weighted mean of the clients' products, each under
its own γ_k, folded into the base in the weight's own orientation; and in a real run."""

import dataclasses

import pytest
import torch

from sfedlora.config import build_config
from sfedlora.data import load_task
from sfedlora.engine.simulator import run_round
from sfedlora.errors import SfedloraError
from sfedlora.federated.catchup import change_bytes, fold
from sfedlora.federated.federation import build_federation
from sfedlora.federated.kinds import BASE, tensor_kind
from sfedlora.federated.methods import Replies, get_method
from sfedlora.federated.ranks import RankPlan

A, B, HEAD, W = (
    "m.q.lora_A.default.weight",
    "m.q.lora_B.default.weight",
    "m.classifier.modules_to_save.default.weight",
    "m.q.base_layer.weight",
)
D_OUT, D_IN, R = 2, 3, 2  # a non-square nn.Linear: its weight is (2, 3), B·A too


def clients(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        {
            A: torch.randn(R, D_IN, generator=g),
            B: torch.randn(D_OUT, R, generator=g),
            HEAD: torch.randn(4, generator=g),
        }
        for _ in range(n)
    ]


def replies(updates, weights, server, plan=None, transposed=frozenset()):
    plan = plan or RankPlan.build("lora", 8.0, R, None, len(updates), len(updates))  # γ = 8/2 = 4
    return Replies(1, list(range(len(updates))), updates, weights, plan, server, build_config(), transposed)


def test_fedex_folds_the_scaled_residual_into_a_non_square_base_weight():
    ups = clients()
    server = {A: torch.zeros(R, D_IN), B: torch.zeros(D_OUT, R), HEAD: torch.zeros(4)}
    new = get_method("fedex-lora").aggregate(replies(ups, [1.0, 1.0, 1.0], server))
    a_bar = sum(u[A] for u in ups) / 3
    b_bar = sum(u[B] for u in ups) / 3
    mean_product = sum(4.0 * u[B] @ u[A] for u in ups) / 3  # γ = 4 inside
    torch.testing.assert_close(new[A], a_bar)
    torch.testing.assert_close(new[B], b_bar)
    delta = fold(None, new[W])  # the round's change to the base, folded into ΔW = 0
    assert delta.shape == (D_OUT, D_IN)
    torch.testing.assert_close(delta, mean_product - 4.0 * b_bar @ a_bar)
    # The global model's change is exactly the mean of the clients' changes.
    assert (delta + 4.0 * new[B] @ new[A] - mean_product).abs().max() < 1e-6


def test_fedex_residual_accumulates_and_weighs_by_examples_when_asked():
    ups, sizes = clients(), [1.0, 3.0, 6.0]
    prior = torch.full((D_OUT, D_IN), 0.5)
    server = {A: torch.zeros(R, D_IN), B: torch.zeros(D_OUT, R), HEAD: torch.zeros(4), W: prior}
    new = get_method("fedex-lora").aggregate(replies(ups, sizes, server))
    p = [s / 10 for s in sizes]
    a_bar = sum(pk * u[A] for pk, u in zip(p, ups))
    b_bar = sum(pk * u[B] for pk, u in zip(p, ups))
    residual = sum(pk * 4.0 * u[B] @ u[A] for pk, u in zip(p, ups)) - 4.0 * b_bar @ a_bar
    torch.testing.assert_close(fold(prior, new[W]), prior + residual)


def test_fedex_change_to_a_conv1d_weight_is_transposed():
    ups = clients()
    server = {A: torch.zeros(R, D_IN), B: torch.zeros(D_OUT, R), HEAD: torch.zeros(4)}
    linear = get_method("fedex-lora").aggregate(replies(ups, [1.0] * 3, server))
    conv = get_method("fedex-lora").aggregate(replies(ups, [1.0] * 3, server, transposed=frozenset({W})))
    torch.testing.assert_close(conv[W].value(), linear[W].value().T)


def test_fedex_sends_the_base_change_and_keeps_nothing():
    method = get_method("fedex-lora")
    server = {
        A: torch.ones(R, D_IN),
        B: torch.ones(D_OUT, R),
        HEAD: torch.ones(4),
        W: torch.ones(D_OUT, D_IN),
    }
    assert set(method.download(server)) == {A, B, HEAD, W}
    assert set(method.upload({A: server[A], B: server[B], HEAD: server[HEAD]}, 1)) == {A, B, HEAD}
    assert not method.has_local_state() and method.reference_weights == "uniform"


def federation(tiny_config, *extra):
    cfg = tiny_config(*extra, "train.lr=0.01")
    return build_federation(cfg, load_task(cfg.data, seed=cfg.seed))


def layer_weight(fed, key):
    return fed.model.get_parameter(key)


def test_fedex_in_a_run_the_global_model_is_the_mean_of_the_clients(tiny_config):
    fed = federation(tiny_config, "method=fedex-lora")
    first = run_round(fed)
    keys = [n for n in fed.server if tensor_kind(n) == BASE]
    assert keys and len(keys) == len([n for n in fed.initial if tensor_kind(n) == "A"])
    gamma = fed.ranks.layer_gamma(None)
    for key in keys:
        layer = key.removesuffix(".base_layer.weight")
        a, b = f"{layer}.lora_A.default.weight", f"{layer}.lora_B.default.weight"
        mean = sum(gamma * c.tensors[b].double() @ c.tensors[a].double() for c in fed.clients) / 3
        glob = fed.server[key].double() + gamma * fed.server[b].double() @ fed.server[a].double()
        assert (glob - mean).abs().max() < 1e-6
    base_bytes = sum(fed.server[k].numel() * 4 for k in keys)
    second = run_round(fed)
    # Round 2's download carries round 1's change to the base to every client: the residual's
    # factors, of rank (K + 1)·r = 16, smaller than ΔW itself; nothing else changed in size.
    step = sum(change_bytes(*fed.server[k].shape, 4 * 4) for k in keys)
    assert step < base_bytes and second["bytes_down"] - first["bytes_down"] == 3 * step
    assert second["bytes_up"] == first["bytes_up"]
    # The shared model ran its clients on W0 + ΔW: the evaluated global model is W0 + ΔW too.
    from sfedlora.federated.evaluation import outputs_of

    outputs_of(fed, fed.global_tensors())
    key = keys[0]
    origin = fed.model.get_submodule(key.removesuffix(".base_layer.weight")).sfedlora_origin
    assert torch.equal(layer_weight(fed, key), origin + fed.server[key])


@pytest.mark.parametrize(
    "setting, message",
    [
        (("lora.client_ranks=[2,4]",), "fedex-lora needs one rank for every client: unset lora.client_ranks"),
        (("privacy.dp=server", "privacy.noise_multiplier=0.5"), "fedex-lora has its own server aggregation"),
        (("model.quantization=4bit",), "fedex-lora changes the base weights, which model.quantization=4bit"),
    ],
)
def test_fedex_refuses_what_it_cannot_run(tiny_config, setting, message):
    with pytest.raises(SfedloraError, match=message):
        federation(tiny_config, "method=fedex-lora", *setting)


def test_flora_merges_each_clients_product_under_its_own_gamma_and_restarts_lora():
    # Mixed ranks: client 0 at rank 1, client 1 at rank 2, each with its own γ_k (sfed rule).
    plan = RankPlan.build("sfed", 4.0, R, [1, 2], 2, 2)
    assert plan.layer_gamma(0) != plan.layer_gamma(1)
    full = clients(2)
    ups = [{A: full[0][A][:1], B: full[0][B][:, :1], HEAD: full[0][HEAD]}, full[1]]
    prior = torch.full((D_OUT, D_IN), 0.25)
    server = {A: torch.ones(R, D_IN), B: torch.ones(D_OUT, R), HEAD: torch.zeros(4), W: prior}
    new = get_method("flora").aggregate(replies(ups, [1.0, 3.0], server, plan))
    product = (
        0.25 * plan.layer_gamma(0) * ups[0][B] @ ups[0][A]
        + 0.75 * plan.layer_gamma(1) * ups[1][B] @ ups[1][A]
    )
    assert (fold(prior, new[W]) - prior - product).abs().max() < 1e-6
    torch.testing.assert_close(new[HEAD], 0.25 * ups[0][HEAD] + 0.75 * ups[1][HEAD])
    assert torch.equal(new[B], torch.zeros(D_OUT, R))  # the next round starts from B = 0
    assert new[A].shape == (R, D_IN) and not torch.equal(new[A], server[A])  # and a fresh A


def test_flora_can_restart_from_the_initial_a():
    cfg = build_config(overrides=["federation.flora_reinit=initial"])
    server = {A: torch.ones(R, D_IN), B: torch.ones(D_OUT, R), HEAD: torch.zeros(4)}
    r = replies(clients(2), [1.0, 1.0], server)
    new = get_method("flora").aggregate(dataclasses.replace(r, cfg=cfg))
    assert A not in new and torch.equal(new[B], torch.zeros(D_OUT, R))


def test_fedex_run_resumes_bit_for_bit_and_exports_its_base_change(tiny_config, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from sfedlora.driver.experiment import run
    from sfedlora.lora.base import BASE_FILE
    from sfedlora.results.export import export

    settings = ("method=fedex-lora", "federation.rounds=3", "checkpoint_every=1", "train.lr=0.01")
    whole = run(tiny_config("name=whole", *settings))

    class Stop(Exception):
        pass

    def stop(record):
        if record["round"] == 2:
            raise Stop

    with pytest.raises(Stop):
        run(tiny_config("name=cut", *settings), on_record=stop)
    resumed = run(None, resume=whole.run_dir.parent / "cut")

    def timeless(records):
        return [{k: v for k, v in r.items() if "seconds" not in k} for r in records]

    assert timeless(resumed.records) == timeless(whole.records)
    for path in [BASE_FILE, "global/adapter_model.safetensors"]:
        ours, theirs = (
            load_file(whole.run_dir / "adapters" / path),
            load_file(resumed.run_dir / "adapters" / path),
        )
        assert ours.keys() == theirs.keys() and all(ours[n].equal(theirs[n]) for n in ours), path

    # A merged export is W0 + ΔW + γ B A: it scores the dev set as the run scored its global model.
    merged = export(whole.run_dir, tmp_path / "merged", merge=True)
    model = AutoModelForSequenceClassification.from_pretrained(merged).eval()
    tokenizer = AutoTokenizer.from_pretrained(merged)
    dev = load_task(tiny_config().data, seed=0).eval
    batch = tokenizer(dev.texts, truncation=True, max_length=32, padding=True, return_tensors="pt")
    with torch.no_grad():
        accuracy = float((model(**batch).logits.argmax(-1).numpy() == dev.labels).mean())
    assert accuracy == pytest.approx(whole.records[-1]["global_accuracy"], abs=1e-9)
    # A PEFT export carries the base change its adapter needs.
    assert (export(whole.run_dir, tmp_path / "adapter") / BASE_FILE).is_file()


def test_flexlora_factors_are_the_truncated_svd_of_the_mean_update_at_each_clients_rank():
    g = torch.Generator().manual_seed(1)
    d_out, d_in, ranks = 4, 5, [1, 2, 2]
    plan = RankPlan.build("sfed", 4.0, 2, ranks, 3, 3)  # γ_k of rank 1 ≠ that of rank 2
    ups = [
        {
            A: torch.randn(r, d_in, generator=g),
            B: torch.randn(d_out, r, generator=g),
            HEAD: torch.randn(4, generator=g),
        }
        for r in ranks
    ]
    server = {A: torch.zeros(2, d_in), B: torch.zeros(d_out, 2), HEAD: torch.zeros(4)}
    sizes = [2.0, 3.0, 5.0]
    method = get_method("flexlora")
    new = method.aggregate(replies(ups, sizes, server, plan))
    mean = sum(
        s / 10 * plan.layer_gamma(k) * u[B].double() @ u[A].double()
        for k, (s, u) in enumerate(zip(sizes, ups))
    )
    left, singular, right = torch.linalg.svd(mean)
    assert torch.linalg.matrix_rank(mean) == 4  # three updates of rank ≤ 2: truncation bites
    for k, r in enumerate(ranks):
        view = method.client_view(new, k, plan)
        assert view[A].shape == (r, d_in) and view[B].shape == (d_out, r)
        product = plan.layer_gamma(k) * view[B].double() @ view[A].double()
        truncated = left[:, :r] @ torch.diag(singular[:r]) @ right[:r]
        assert (product - truncated).abs().max() < 1e-5
        # The singular values are kept in B: A's rows are orthonormal.
        torch.testing.assert_close(
            view[A].double() @ view[A].double().T, torch.eye(r, dtype=torch.float64), atol=1e-5, rtol=0
        )
    torch.testing.assert_close(new[HEAD], sum(s / 10 * u[HEAD] for s, u in zip(sizes, ups)))
    assert not any(n.endswith("base_layer.weight") for n in new)  # the base never changes


def test_hetlora_zero_pads_and_weighs_each_layer_by_the_norm_of_its_product():
    plan = RankPlan.build("sfed", 4.0, R, [1, 2], 2, 2)
    full = clients(2)
    ups = [{A: full[0][A][:1], B: full[0][B][:, :1], HEAD: full[0][HEAD]}, full[1]]
    server = {A: torch.ones(R, D_IN), B: torch.ones(D_OUT, R), HEAD: torch.zeros(4)}
    new = get_method("hetlora").aggregate(replies(ups, [1.0, 3.0], server, plan))
    norms = [torch.linalg.matrix_norm(plan.layer_gamma(k) * u[B] @ u[A]) for k, u in enumerate(ups)]
    w = [n / sum(norms) for n in norms]
    padded_a0 = torch.cat([ups[0][A], torch.zeros(1, D_IN)])  # client 0's missing row counts as zero
    torch.testing.assert_close(new[A], w[0] * padded_a0 + w[1] * ups[1][A])
    torch.testing.assert_close(
        new[B], w[0] * torch.cat([ups[0][B], torch.zeros(D_OUT, 1)], 1) + w[1] * ups[1][B]
    )
    torch.testing.assert_close(new[HEAD], 0.25 * ups[0][HEAD] + 0.75 * ups[1][HEAD])
    # Client 0 receives the first row and column only: its truncation.
    view = get_method("hetlora").client_view(new, 0, plan)
    assert view[A].shape == (1, D_IN) and torch.equal(view[A], new[A][:1])


@pytest.mark.parametrize("name", ["flora", "flexlora", "hetlora"])
def test_a_head_probe_round_moves_only_the_head(name):
    method = get_method(name, head_probe_rounds=1)
    ups = [method.upload(c, 1) for c in clients(2)]
    server = {A: torch.ones(R, D_IN), B: torch.ones(D_OUT, R), HEAD: torch.zeros(4)}
    assert set(method.aggregate(replies(ups, [1.0, 1.0], server))) == {HEAD}


@pytest.mark.parametrize("name", ["flora", "fedex-lora", "flexlora", "hetlora"])
def test_each_method_trains_a_causal_lm_and_saves_its_base_change(lm_overrides, name):
    """Every task, not only classification: the methods' server math on a LLaMA's LoRA
    layers, ΔW saved beside the adapters where the method has one."""
    from safetensors.torch import load_file

    from sfedlora.driver.experiment import run
    from sfedlora.lora.base import BASE_FILE

    result = run(build_config(overrides=[*lm_overrides, f"method={name}", "lora.scaling=sfed"]))
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in result.records)
    saved = result.run_dir / "adapters" / BASE_FILE
    if name in ("flora", "fedex-lora"):
        change = load_file(saved)
        assert change and all(torch.isfinite(t).all() for t in change.values())
        assert any(t.abs().max() > 0 for t in change.values())
    else:
        assert not saved.exists()
