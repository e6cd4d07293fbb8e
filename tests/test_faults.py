"""Client faults: drop-outs, poisoned updates, non-finite training; the server's refusals."""

import json

import numpy as np
import pytest
import torch

from sfedlora.data import load_task
from sfedlora.driver.experiment import run
from sfedlora.engine.simulator import run_round
from sfedlora.federated.federation import build_federation
from sfedlora.federated.robust import check_update, corrupt, norm_outliers

REF = {"a.lora_A.w": torch.zeros(2, 3), "a.lora_B.w": torch.zeros(3, 2)}


def good():
    return {n: torch.ones_like(t) for n, t in REF.items()}


@pytest.mark.parametrize(
    "kind, reason", [("nan", "non-finite values"), ("inf", "non-finite values"), ("shape", "wrong shape")]
)
def test_corrupted_updates_are_refused_with_a_reason(kind, reason):
    assert check_update(good(), REF) is None
    bad = corrupt(good(), REF, kind, np.random.default_rng(0))
    assert reason in check_update(bad, REF)


def test_missing_tensor_and_scaled_update():
    update = good()
    del update["a.lora_B.w"]
    assert "wrong tensors" in check_update(update, REF)
    scaled = corrupt(good(), REF, "scale", np.random.default_rng(0))
    assert check_update(scaled, REF) is None  # finite and well-shaped: only the norm rule can tell
    assert torch.equal(scaled["a.lora_A.w"], torch.full((2, 3), 1e6))


def test_median_rule():
    assert norm_outliers([1.0, 1.2, 0.9, 1e6], 10) == [False, False, False, True]
    assert norm_outliers([1.0, 1e6], 10) == [False, True]  # lower median: judged against the sound one
    assert norm_outliers([5.0], 10) == [False]


def test_drop_outs_and_poisoned_updates(tiny_overrides, tmp_path):
    from sfedlora.config import build_config

    cfg = build_config(
        overrides=[
            *tiny_overrides,
            "name=faulty",
            "federation.n_clients=10",
            "federation.rounds=6",
            "federation.local_steps=1",
            "data.max_train_examples=200",
            "eval.every=6",
            "faults.dropout=0.3",
            "faults.bad_update=0.1",
            "server.outlier_rule=median",
            "method=sfed-lora",
            "train.lr=0.005",
        ]
    )
    result = run(cfg)
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    injected = {(r["round"], i["client"]) for r in records for i in r["injected"]}
    rejected = {(r["round"], x["client"]) for r in records for x in r["rejected"]}
    dropped = sum(len(r["dropped"]) for r in records)
    kinds = {i["kind"] for r in records for i in r["injected"]}
    assert len(injected) >= 3 and len(kinds) >= 2 and 5 <= dropped <= 35  # ~6 and ~18 expected of 60
    assert rejected == injected  # every poisoned update refused, no sound one
    for r in records:
        assert r["aggregated"] == len(r["clients"]) - len(r["dropped"]) - len(r["rejected"])
        assert np.isfinite(r["train_loss"])
    assert np.isfinite(records[-1]["personal_accuracy_mean"])
    from safetensors.torch import load_file

    for path in (result.run_dir / "adapters").glob("*/adapter_model.safetensors"):
        assert all(torch.isfinite(t).all() for t in load_file(path).values())


def test_non_finite_training_restores_the_client_and_drops_its_update(tiny_config):
    cfg = tiny_config(
        "train.optimizer=sgd", "train.lr=1e30", "train.max_grad_norm=null", "federation.local_steps=3"
    )
    fed = build_federation(cfg, load_task(cfg.data, seed=cfg.seed))
    server = {n: t.clone() for n, t in fed.server.items()}
    before = [{n: t.clone() for n, t in c.tensors.items()} for c in fed.clients]
    rec = run_round(fed)
    assert rec["aggregated"] == 0
    assert [r["reason"] for r in rec["rejected"]] == ["non-finite training loss; client state restored"] * 3
    assert all(torch.equal(server[n], fed.server[n]) for n in server)
    for b, c in zip(before, fed.clients):
        assert all(torch.equal(b[n], c.tensors[n]) for n in b) and c.steps == 0 and c.optimizer is None


def test_too_few_sound_replies_leave_the_server_unchanged(tiny_config):
    cfg = tiny_config("server.min_replies=3", "faults.bad_update=1", "faults.bad_kinds=[nan]")
    fed = build_federation(cfg, load_task(cfg.data, seed=cfg.seed))
    server = {n: t.clone() for n, t in fed.server.items()}
    rec = run_round(fed)  # every reply poisoned: none sound
    assert rec["aggregated"] == 0 and len(rec["rejected"]) == 3
    fed.cfg.faults.bad_update = 0.0
    fed.cfg.server.min_replies = 4  # more than the 3 clients can send
    rec = run_round(fed)
    assert rec["aggregated"] == 0 and rec["rejected"] == [] and rec["update_norm"] == 0.0
    assert all(torch.equal(server[n], fed.server[n]) for n in server)
    fed.cfg.server.min_replies = 3
    rec = run_round(fed)
    assert rec["aggregated"] == 3 and not all(torch.equal(server[n], fed.server[n]) for n in server)


def test_unreachable_min_replies_is_refused(tiny_config):
    from sfedlora.errors import SfedloraError

    with pytest.raises(
        SfedloraError, match=r"server.min_replies \(4\) exceeds the 3 clients sampled per round"
    ):
        tiny_config("server.min_replies=4")
