"""Clients with different LoRA ranks: row-wise aggregation, per-client γ, rank-cut traffic, adapters."""

import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from sfedlora.cli import app
from sfedlora.config import build_config
from sfedlora.data import load_task
from sfedlora.data.encoding import collate
from sfedlora.driver.experiment import run
from sfedlora.engine.simulator import run_round
from sfedlora.errors import SfedloraError
from sfedlora.federated.client import client_round
from sfedlora.federated.federation import build_federation
from sfedlora.federated.methods import aggregate, tensor_kind
from sfedlora.federated.ranks import RankPlan, aggregate_rows, holders, pad, truncate
from sfedlora.lora.models import resolve_model_path
from sfedlora.lora.scaling import power_rule
from sfedlora.peft import layer_gammas

A = "base_model.model.layer.0.query.lora_A.default.weight"  # (r × d_in)
B = "base_model.model.layer.0.query.lora_B.default.weight"  # (d_out × r)
HEAD = "base_model.model.classifier.modules_to_save.default.weight"
MIXED = ("lora.rank=8", "lora.client_ranks=[2, 4, 8]")


def _update(rank: int, value: float) -> dict[str, torch.Tensor]:
    return {
        A: torch.full((rank, 3), value),
        B: torch.full((2, rank), -value),
        HEAD: torch.full((2, 2), value),
    }


def test_rows_are_averaged_over_the_clients_that_hold_them():
    # Three clients of ranks 2, 4, 8 with example counts 1, 1, 2; the server's A is 8 rows.
    updates = [_update(2, 1.0), _update(4, 2.0), _update(8, 4.0)]
    current = {A: torch.full((8, 3), 9.0), B: torch.full((2, 8), 9.0), HEAD: torch.zeros(2, 2)}
    new = aggregate_rows(updates, [1.0, 1.0, 2.0], [2, 4, 8], current)
    # rows 0-1: all three hold them: (1·1 + 1·2 + 2·4) / 4; rows 2-3: clients 2 and 3: (2 + 8) / 3;
    # rows 4-7: client 3.
    expected_rows = torch.tensor([2.75, 2.75, 10 / 3, 10 / 3, 4, 4, 4, 4])
    torch.testing.assert_close(new[A], expected_rows[:, None].expand(8, 3))
    torch.testing.assert_close(new[B], -expected_rows[None, :].expand(2, 8))  # B: the same, by columns
    torch.testing.assert_close(new[HEAD], torch.full((2, 2), 2.75))  # the head: over everyone


def test_rows_no_replying_client_holds_keep_their_value():
    current = {A: torch.arange(24.0).reshape(8, 3), B: torch.zeros(2, 8), HEAD: torch.zeros(2, 2)}
    new = aggregate_rows([_update(2, 1.0), _update(4, 3.0)], [3.0, 1.0], [2, 4], current)
    torch.testing.assert_close(new[A][:2], torch.full((2, 3), 1.5))  # (3·1 + 1·3) / 4
    torch.testing.assert_close(new[A][2:4], torch.full((2, 3), 3.0))
    assert torch.equal(new[A][4:], current[A][4:])


def test_one_rank_for_all_is_the_plain_weighted_mean():
    updates = [{A: torch.randn(4, 3), B: torch.randn(2, 4), HEAD: torch.randn(2, 2)} for _ in range(3)]
    plain = aggregate(updates, [1.0, 2.0, 5.0])
    rows = aggregate_rows(
        updates, [1.0, 2.0, 5.0], [4, 4, 4], {n: torch.zeros_like(t) for n, t in updates[0].items()}
    )
    assert all(torch.equal(plain[n], rows[n]) for n in plain)


def test_truncate_and_pad_cut_rows_of_a_and_columns_of_b():
    full = {A: torch.randn(8, 3), B: torch.randn(2, 8), HEAD: torch.randn(2, 2)}
    cut = truncate(full, 2)
    assert cut[A].shape == (2, 3) and cut[B].shape == (2, 2) and cut[HEAD] is full[HEAD]
    back = pad(cut, full)
    assert torch.equal(back[A][:2], full[A][:2]) and not back[A][2:].any() and not back[B][:, 2:].any()


@pytest.mark.parametrize(
    "rule, expected",
    [
        ("lora", [16 / 2, 16 / 4, 16 / 8]),
        ("rslora", [16 / math.sqrt(2), 16 / 2, 16 / math.sqrt(8)]),
        # n_k: clients with rank ≥ r_k: 3, 2, 1.
        ("sfed", [16 * math.sqrt(3 / 2), 16 * math.sqrt(2 / 4), 16 * math.sqrt(1 / 8)]),
        (power_rule(1, 0), [16 * 3, 16 * 2, 16 * 1]),  # α·n_k
        (power_rule(0.5, 1), [16 * math.sqrt(3) / 2, 16 * math.sqrt(2) / 4, 16 / 8]),
    ],
)
def test_gamma_per_client_against_hand_computed(rule, expected):
    plan = RankPlan.build(rule, 16.0, 8, [2, 4, 8], n_clients=3, n_sampled=3)
    assert [plan.gamma(k) for k in range(3)] == pytest.approx(expected, rel=1e-12)


def test_holder_counts_with_partial_participation():
    # 4 clients, 2 sampled per round: m_k = 4, 3, 2, 2 clients hold client k's rows; in a
    # round with k sampled, k plus the other one's chance of being a holder, (m_k − 1) / 3.
    assert holders([2, 4, 8, 8], n_sampled=2) == pytest.approx([2, 1 + 2 / 3, 1 + 1 / 3, 1 + 1 / 3])
    assert holders([8, 8, 8], n_sampled=3) == (3, 3, 3)  # one rank: n_k = N
    plan = RankPlan.build("sfed", 16.0, 8, [8] * 5, n_clients=5, n_sampled=5)
    assert plan.gamma(0) == pytest.approx(16 * math.sqrt(5 / 8))


def test_unset_client_ranks_keep_the_uniform_plan():
    plan = RankPlan.build("sfed", 16.0, 8, None, n_clients=3, n_sampled=3)
    assert not plan.mixed and plan.ranks == (8, 8, 8) and plan.gamma() == pytest.approx(16 * math.sqrt(3 / 8))
    assert plan.record([0, 1]) == {} and plan.summary() == {}
    plan = RankPlan.build("sfed", 16.0, 8, [2, 4], n_clients=3, n_sampled=3)
    assert plan.ranks == (2, 4, 2)  # cycled
    gammas = [plan.gamma(k) for k in range(3)]
    assert gammas == pytest.approx([16 * math.sqrt(3 / 2), 16 * math.sqrt(1 / 4), 16 * math.sqrt(3 / 2)])
    assert plan.global_rank == 4 and plan.gamma() == gammas[1]


def test_a_power_rule_plan_realises_each_clients_gamma():
    # b = ¼ has no divisor in PEFT: each client's lora_alpha is γ_k·r_k, checked at build.
    plan = RankPlan.build(power_rule(0.75, 0.25), 16.0, 8, [2, 4, 8], n_clients=3, n_sampled=3)
    expected = [16 * 3**0.75 / 2**0.25, 16 * 2**0.75 / 4**0.25, 16 / 8**0.25]
    assert [plan.gamma(k) for k in range(3)] == pytest.approx(expected, rel=1e-12)
    for k, r in enumerate([2, 4, 8]):
        config = plan.lora_config(k)
        assert (config.r, config.lora_alpha, config.use_rslora) == (r, pytest.approx(expected[k] * r), False)
        assert plan.layer_gamma(k) == pytest.approx(plan.gamma(k), rel=1e-15)


@pytest.mark.parametrize(
    "value, message",
    [
        ("[]", "lora.client_ranks: empty list"),
        ("[4, 0]", "lora.client_ranks: every rank must be a positive integer, got 0"),
        ("[4, -2]", "lora.client_ranks: every rank must be a positive integer, got -2"),
        (
            "[4, 16]",
            "lora.client_ranks: rank 16 exceeds lora.rank=8, the rank the server keeps A at; "
            "set lora.rank=16",
        ),
    ],
)
def test_bad_client_ranks_are_refused_with_one_line(value, message):
    with pytest.raises(SfedloraError, match=message.replace("[", r"\[")):
        build_config(overrides=["lora.rank=8", f"lora.client_ranks={value}"])
    result = CliRunner().invoke(
        app, ["config", "--set", "lora.rank=8", "--set", f"lora.client_ranks={value}"]
    )
    assert result.exit_code == 2 and result.output.count("\n") == 1 and message.split(":")[0] in result.output


@pytest.mark.parametrize("method", ["sfed-lora", "fedit"])
def test_a_client_receives_and_sends_only_rows_within_its_rank(tiny_config, method):
    cfg = tiny_config(*MIXED, f"method={method}", "model.precision=fp32")
    fed = build_federation(cfg, load_task(cfg.data, seed=cfg.seed))
    assert fed.ranks.ranks == (2, 4, 8)
    for k, r in enumerate(fed.ranks.ranks):
        own = fed.clients[k].tensors
        assert all(t.shape[0] == r for n, t in own.items() if tensor_kind(n) == "A")
        assert all(t.shape[1] == r for n, t in own.items() if tensor_kind(n) == "B")  # B has r_k columns
        download = fed.download(k)
        assert {tensor_kind(n) for n in download} >= {"A"}
        for n, t in download.items():
            if tensor_kind(n) in ("A", "B"):
                assert t.shape[0 if tensor_kind(n) == "A" else 1] == r, (k, n)
        outcome = client_round(fed, fed.client(k), fed.clients[k], download, 1)
        assert outcome.result is not None and outcome.result.loss > 0
        for n, t in outcome.update.items():
            assert t.shape == download[n].shape  # the upload is cut like the download
        for n, t in outcome.state.tensors.items():
            assert t.shape == own[n].shape
        changed = [
            n
            for n, t in outcome.state.tensors.items()
            if tensor_kind(n) == "A" and not torch.equal(t, own[n])
        ]
        assert changed  # it trained its own rows
    # The model ran each client at its own γ; the shared model now holds the last one's.
    gammas = list(layer_gammas(fed.model).values())
    assert gammas == pytest.approx([fed.ranks.gamma(2)] * len(gammas))


def test_a_round_aggregates_rows_over_their_holders(tiny_config):
    cfg = tiny_config(*MIXED, "method=sfed-lora", "model.precision=fp32")
    fed = build_federation(cfg, load_task(cfg.data, seed=cfg.seed))
    before = {n: t.clone() for n, t in fed.server.items()}
    record = run_round(fed)
    assert record["client_ranks"] == [2, 4, 8] and record["aggregated"] == 3
    assert record["client_gammas"] == pytest.approx(
        [16 * math.sqrt(3 / 2), 16 * math.sqrt(2 / 4), 16 * math.sqrt(1 / 8)]
    )
    a = next(n for n in fed.server if tensor_kind(n) == "A")
    sizes = fed.client_sizes.astype(float)
    got = [fed.clients[k].tensors[a] for k in range(3)]  # after training; A was sent as it is
    rows_2_4 = (sizes[1] * got[1][2:4] + sizes[2] * got[2][2:4]) / (sizes[1] + sizes[2])
    torch.testing.assert_close(fed.server[a][2:4], rows_2_4)
    torch.testing.assert_close(fed.server[a][4:], got[2][4:])
    assert not torch.equal(fed.server[a], before[a])
    # bytes: each client receives and sends only its own rows
    assert record["bytes_down"] == sum(sum(t.numel() * 4 for t in fed.download(k).values()) for k in range(3))


# sfed, and a rule PEFT has no divisor for (b = ¼): lora_alpha = γ_k·r_k in each saved adapter.
@pytest.mark.parametrize(
    "rule",
    [
        ("method=sfed-lora",),
        ("method=fedsa-lora", "lora.scaling=power", "lora.n_exponent=0.75", "lora.rank_exponent=0.25"),
    ],
    ids=["sfed", "power"],
)
def test_a_mixed_rank_run_writes_a_peft_adapter_per_client_at_its_rank(tiny_config, rule):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    held = {}
    result = run(
        tiny_config(*MIXED, *rule, "name=mixed", "train.lr=0.01", "model.precision=fp32"),
        on_start=lambda fed, run_dir: held.update(fed=fed),
    )
    fed, d = held["fed"], result.run_dir
    records = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2] and all(r["client_ranks"] == [2, 4, 8] for r in records)
    assert result.summary["client_ranks"] == [2, 4, 8] and len(result.summary["client_gammas"]) == 3
    batch = collate(fed.eval_data, np.arange(12), fed.tokenizer)
    batch.pop("labels")
    fed.model.eval()
    for k, (r, g) in enumerate(zip([2, 4, 8], result.summary["client_gammas"])):
        path = d / "adapters" / f"client_{k:02d}"
        assert json.loads((path / "adapter_config.json").read_text())["r"] == r
        base = AutoModelForSequenceClassification.from_pretrained(resolve_model_path("minilm"), num_labels=2)
        reloaded = PeftModel.from_pretrained(base, path).eval()
        scalings = list(layer_gammas(reloaded).values())
        assert scalings and scalings == pytest.approx([g] * len(scalings), rel=1e-9)
        shapes = {n: tuple(p.shape) for n, p in reloaded.named_parameters() if ".lora_" in n}
        assert shapes and all(s[0] == r for n, s in shapes.items() if ".lora_A." in n)
        assert all(s[1] == r for n, s in shapes.items() if ".lora_B." in n)
        fed.ranks.load(fed.model, fed.params, fed.personal_tensors(k), k)
        with torch.no_grad():
            ours, theirs = fed.model(**batch).logits, reloaded(**batch).logits
        torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_one_listed_rank_equal_to_lora_rank_reproduces_the_uniform_run(tiny_config):
    # The mixed-rank path (cuts, padding, row-wise mean, γ set per client) with one rank
    # for all is the uniform run: same losses and scores, up to the last bits of γ.
    common = ("method=sfed-lora", "model.precision=fp32", "save_adapters=false")
    uniform = run(tiny_config(*common, "name=uniform")).records
    listed = run(tiny_config(*common, "name=listed", "lora.client_ranks=[4]")).records
    for a, b in zip(uniform, listed):
        assert b["client_ranks"] == [4, 4, 4] and b["client_gammas"] == pytest.approx(
            [a["gamma"]] * 3, rel=1e-12
        )
        for key in ("train_loss", "update_norm", "personal_accuracy_mean"):
            assert b[key] == pytest.approx(a[key], abs=1e-6), key


def test_fedit_with_mixed_ranks_saves_the_global_adapter_and_one_per_client(tiny_config):
    result = run(tiny_config(*MIXED, "name=fedit-mixed", "method=fedit", "federation.rounds=1"))
    saved = sorted(p.name for p in (result.run_dir / "adapters").iterdir())
    assert saved == ["client_00", "client_01", "client_02", "global"]
    ranks = [
        json.loads((result.run_dir / "adapters" / n / "adapter_config.json").read_text())["r"] for n in saved
    ]
    assert ranks == [2, 4, 8, 8]
    assert result.records[0]["aggregated"] == 3 and "personal_accuracy_min" in result.records[0]


def test_a_mixed_rank_run_resumes_exactly(tiny_config):
    # Checkpoints hold each client's tensors at its own rank; partial participation makes
    # n_k an expectation (4 clients, 2 sampled per round).
    common = (
        *MIXED,
        "federation.n_clients=4",
        "federation.clients_per_round=2",
        "federation.rounds=3",
        "save_adapters=false",
    )

    class Stop(Exception):
        pass

    def stop(record):
        if record["round"] == 1:
            raise Stop

    with pytest.raises(Stop):
        run(tiny_config(*common, "name=stopped"), on_record=stop)
    stopped = tiny_config(*common, "name=stopped")
    resumed = run(None, resume=f"{stopped.output_dir}/stopped").records
    whole = run(tiny_config(*common, "name=whole")).records
    timing = {"seconds", "eval_seconds"}
    assert [{k: v for k, v in r.items() if k not in timing} for r in resumed] == [
        {k: v for k, v in r.items() if k not in timing} for r in whole
    ]
    assert all(len(r["client_ranks"]) == 2 for r in whole)
    # ranks 2, 4, 8, 2: m_k = 4, 2, 1, 4 clients with r ≥ r_k; n_k = 1 + (2 − 1)(m_k − 1)/(4 − 1)
    n = [1 + 3 / 3, 1 + 1 / 3, 1.0, 1 + 3 / 3]
    got = run_gammas(whole)
    assert len(got) >= 3 and got == pytest.approx({k: 16 * math.sqrt(n[k] / [2, 4, 8, 2][k]) for k in got})


def run_gammas(records) -> dict[int, float]:
    return {k: g for r in records for k, g in zip(r["clients"], r["client_gammas"])}
