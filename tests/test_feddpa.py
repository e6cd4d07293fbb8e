"""FedDPA: a layer adds its two adapters' outputs, W0·x + (1 − a)·γ·B_g A_g x + a·γ·B_l A_l x (by
hand, under every scaling rule); the global branch passes no gradient while the personal adapter
trains; the clients send the global adapter only and keep the personal one (in the simulator and
in a Flower reply); the server takes the plain mean; the settings it cannot run are refused."""

import math

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict

from sfedlora.config import build_config
from sfedlora.data import load_task
from sfedlora.engine.executors import auto_engine
from sfedlora.engine.fused import check_fused
from sfedlora.engine.simulator import run_round
from sfedlora.errors import SfedloraError
from sfedlora.federated.client import client_round
from sfedlora.federated.evaluation import evaluate
from sfedlora.federated.federation import build_federation
from sfedlora.federated.kinds import PERSONAL_KINDS, tensor_kind
from sfedlora.federated.methods import get_method
from sfedlora.federated.ranks import RankPlan
from sfedlora.federated.server import server_aggregate
from sfedlora.flower import client_app
from sfedlora.flower.records import STATE_TENSORS, UPDATE, read_train_reply
from sfedlora.lora.dual import GLOBAL, GLOBAL_ONLY, PERSONAL, Mix, add_personal
from sfedlora.peft import lora_config

ALPHA, R, N = 8.0, 2, 4
# γ by hand at α = 8, r = 2, N = 4: α/r, α/√r, α·√(N/r).
GAMMA = {"lora": 4.0, "rslora": 8.0 / math.sqrt(2.0), "sfed": 8.0 * math.sqrt(2.0)}


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q = torch.nn.Linear(3, 2)  # non-square: B·A is (2 × 3)

    def forward(self, x):
        return self.q(x)


def dual(rule):
    from peft import get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(Tiny(), lora_config(R, ALPHA, N, rule, target_modules=["q"]))
    add_personal(model)
    with torch.no_grad():  # PEFT starts B at zero: give every factor a value
        for n, p in model.named_parameters():
            if ".lora_" in n:
                p.copy_(torch.randn_like(p))
    layer = model.base_model.model.q
    w0, b0 = layer.base_layer.weight.detach(), layer.base_layer.bias.detach()
    ag, bg = layer.lora_A[GLOBAL].weight.detach(), layer.lora_B[GLOBAL].weight.detach()
    al, bl = layer.lora_A[PERSONAL].weight.detach(), layer.lora_B[PERSONAL].weight.detach()
    return model, w0, b0, bg @ ag, bl @ al


@pytest.mark.parametrize("rule", list(GAMMA))
def test_the_model_adds_the_two_adapters_outputs_under_each_rules_gamma(rule):
    model, w0, b0, global_product, personal_product = dual(rule)
    plan = RankPlan.build(rule, ALPHA, R, None, N, N)
    x = torch.randn(5, 3)
    g = GAMMA[rule]
    plan.use(model, 0, Mix(0.3))
    expected = x @ (w0 + 0.7 * g * global_product + 0.3 * g * personal_product).T + b0
    torch.testing.assert_close(model(x), expected)
    plan.use(model, None, GLOBAL_ONLY)  # the global model: its adapter alone, at the full γ
    torch.testing.assert_close(model(x), x @ (w0 + g * global_product).T + b0)


def test_the_global_branch_passes_no_gradient_while_the_personal_adapter_trains():
    model, w0, _, global_product, personal_product = dual("lora")
    plan, g = RankPlan.build("lora", ALPHA, R, None, N, N), GAMMA["lora"]
    for mix, through in ((Mix(0.3, detached=GLOBAL), 0.0), (Mix(0.3), 0.7)):
        plan.use(model, 0, mix)
        x = torch.randn(5, 3, requires_grad=True)
        model(x).sum().backward()
        # d(sum)/dx: W0 and the personal branch, and the global branch only where it is not detached.
        weight = w0 + 0.3 * g * personal_product + through * g * global_product
        torch.testing.assert_close(x.grad, weight.sum(0).expand(5, 3))
        layer = model.base_model.model.q
        assert (layer.lora_A[GLOBAL].weight.grad is None) == (through == 0.0)
        model.zero_grad(set_to_none=True)


def test_rounds_train_the_personal_adapter_first_then_the_global_one_alone():
    cfg = build_config(overrides=["method=feddpa", "federation.feddpa_weight=0.25"])
    method = get_method("feddpa")
    (first,) = method.phases(1, cfg)  # round 1: the global adapter only, as the reference's epoch 0
    assert first.trained == {"A", "B", "head"} and first.mix == GLOBAL_ONLY
    personal, shared = method.phases(2, cfg)
    assert personal.trained == PERSONAL_KINDS and personal.mix == Mix(0.25, detached=GLOBAL)
    assert shared.trained == {"A", "B", "head"} and shared.mix == GLOBAL_ONLY
    mixed = build_config(overrides=["method=feddpa", "federation.feddpa_global_training=mixed"])
    assert method.phases(2, mixed)[1].mix == Mix(0.5, detached=PERSONAL)
    assert method.mix(3, cfg) == Mix(0.25) and method.mix(None, cfg) == GLOBAL_ONLY
    assert method.reference_weights == "uniform" and method.has_global_model()


def kind_sizes(tensors):
    sizes = {}
    for n, t in tensors.items():
        sizes[tensor_kind(n)] = sizes.get(tensor_kind(n), 0) + 4 * t.numel()
    return sizes


def personal_of(tensors):
    return {n: t for n, t in tensors.items() if tensor_kind(n) in PERSONAL_KINDS}


def test_clients_send_the_global_adapter_and_keep_the_personal_one(tiny_config):
    cfg = tiny_config("method=feddpa", "train.lr=0.01", "lora.dropout=0.1")
    fed = build_federation(cfg, load_task(cfg.data, seed=cfg.seed))
    sizes = kind_sizes(fed.initial)
    assert {tensor_kind(n) for n in fed.server} == {"A", "B", "head"}
    rec = run_round(fed)
    assert rec["bytes_up"] == rec["bytes_down"] == 3 * (sizes["A"] + sizes["B"] + sizes["head"])
    initial = personal_of(fed.initial)
    for c in fed.clients:  # round 1 trains no personal adapter
        assert all(torch.equal(c.tensors[n], t) for n, t in initial.items())
    rec = run_round(fed)
    assert rec["bytes_up"] == 3 * (sizes["A"] + sizes["B"] + sizes["head"])
    name = next(n for n in initial if tensor_kind(n) == "personal_B")
    kept = [c.tensors[name] for c in fed.clients]
    assert not torch.equal(kept[0], initial[name]) and not torch.equal(kept[0], kept[1])
    assert not any(tensor_kind(n) in PERSONAL_KINDS for n in fed.server)
    # The global adapter trains alone: the client's personal adapter does not change what it sends.
    state = fed.clients[0]
    other = type(state)(
        {**state.tensors, **{n: t + 1.0 for n, t in personal_of(state.tensors).items()}}, state.rng
    )
    sent = [client_round(fed, fed.client(0), s, fed.download(0), 3).update for s in (state, other)]
    assert sent[0].keys() == sent[1].keys() and all(torch.equal(sent[0][n], sent[1][n]) for n in sent[0])
    scores = evaluate(fed)  # the global adapter alone, and each client's two adapters
    assert "global_accuracy" in scores and "personal_accuracy_mean" in scores
    # The server's mean of the global adapters is plain, as the reference's; by examples on request.
    fed.client_sizes[:] = [10, 20, 70]
    updates = [{n: torch.full_like(t, float(k)) for n, t in fed.server.items()} for k in range(3)]
    for rule, expected in (("reference", 1.0), ("examples", 0.2 + 1.4)):
        fed.cfg.federation.client_weights = rule
        new = server_aggregate(fed, 3, updates, [0, 1, 2], fed.server)
        assert all(torch.allclose(t, torch.full_like(t, expected)) for t in new.values())


def test_a_flower_client_sends_the_global_adapter_and_keeps_the_personal_one(tiny_config, server_identity):
    from test_flower import _message

    cfg = tiny_config("method=feddpa")
    fed = build_federation(cfg, load_task(cfg.data, seed=cfg.seed))
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 1}, state=RecordDict(), run_config={})
    state = fed.clients[1]
    for round_ in (1, 2):
        download = fed.download(1)
        reply = client_app.train(_message(cfg, 1, round_, download), context)
        assert {tensor_kind(n) for n in reply.content.array_records[UPDATE]} == {"A", "B", "head"}
        expected = client_round(fed, fed.client(1), state, download, round_)
        _, update = read_train_reply(reply)
        assert all(torch.equal(update[n], expected.update[n]) for n in expected.update)
        state = expected.state
    kept = context.state.array_records[STATE_TENSORS]
    assert {tensor_kind(n) for n in kept} >= PERSONAL_KINDS
    assert all(torch.equal(torch.from_numpy(kept[n].numpy()), state.tensors[n]) for n in personal_of(kept))


def test_settings_feddpa_cannot_run_are_refused_in_one_line(tiny_config):
    with pytest.raises(SfedloraError, match="set train.optimizer_state=fresh"):
        get_method("feddpa").check(tiny_config("method=feddpa", "train.optimizer_state=persistent"))
    cfg = tiny_config("method=feddpa", "lora.rank=2")
    fed = build_federation(cfg, load_task(cfg.data, seed=cfg.seed))
    with pytest.raises(SfedloraError, match="feddpa two: set simulator.engine=per-client"):
        check_fused(fed)
    assert auto_engine(fed) == "per-client"


def test_a_causal_lm_scores_the_global_adapter_and_each_clients_two(lm_overrides):
    from sfedlora.driver.experiment import run

    result = run(build_config(overrides=[*lm_overrides, "method=feddpa", "lora.scaling=rslora"]))
    last = result.records[-1]
    assert any(k.startswith("global_") for k in last) and any(k.startswith("personal_") for k in last)
    saved = result.run_dir / "adapters"
    assert (saved / "global" / "adapter_model.safetensors").is_file()
    assert not (saved / "global" / PERSONAL).exists()
    assert (saved / "client_01" / PERSONAL / "adapter_model.safetensors").is_file()


def test_a_finished_run_scores_and_exports_each_clients_two_adapters(tiny_config, tmp_path):
    from sfedlora.data import bundled_sst2_dir
    from sfedlora.driver.experiment import run
    from sfedlora.results.export import export
    from sfedlora.results.finished import load_model, open_run
    from sfedlora.results.rescore import evaluate_run

    result = run(tiny_config("method=feddpa", "model.precision=fp32", "train.lr=0.01"))
    lines = (bundled_sst2_dir() / "dev.tsv").read_text().splitlines()[: 1 + 48]  # the run's dev set
    (tmp_path / "glue").mkdir()
    (tmp_path / "glue" / "dev.tsv").write_text("\n".join(lines) + "\n")
    scores = evaluate_run(result.run_dir, tmp_path / "glue" / "dev.tsv")
    last = result.records[-1]
    assert scores["global"]["accuracy"] == pytest.approx(last["global_accuracy"], abs=1e-6)
    assert scores["mean"]["accuracy"] == pytest.approx(last["personal_accuracy_mean"], abs=1e-6)
    assert scores["mean"]["mcc"] == pytest.approx(last["personal_mcc_mean"], abs=1e-6)
    # A client's merged model computes what its two adapters compute.
    model, tokenizer = load_model(open_run(result.run_dir), 1)
    batch = tokenizer(["a fine film", "dull and long"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
        merged = export(result.run_dir, tmp_path / "m", client=1, merge=True)
        again = type(model.base_model.model).from_pretrained(merged)(**batch).logits
    torch.testing.assert_close(again, logits, atol=1e-5, rtol=0)


def test_dp_sgd_charges_a_round_for_both_phases_steps(tiny_config):
    from sfedlora.federated.shared import privacy_plan

    dp = ("privacy.dp=client", "privacy.noise_multiplier=0.5", "federation.local_steps=3")
    sizes = np.array([40, 40, 40])
    fedit, dpa = (privacy_plan(tiny_config(f"method={m}", *dp), sizes) for m in ("fedit", "feddpa"))
    assert fedit.steps_per_round.tolist() == [3, 3, 3] and dpa.steps_per_round.tolist() == [6, 6, 6]
