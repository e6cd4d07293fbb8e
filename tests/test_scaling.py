import json
import math

import pytest
from typer.testing import CliRunner

from sfedlora.cli import app
from sfedlora.config import build_config
from sfedlora.errors import SfedloraError
from sfedlora.lora.models import build_classifier
from sfedlora.lora.scaling import (
    NAMED,
    check_realised,
    exponents,
    gamma,
    peft_gamma,
    peft_scaling_kwargs,
    power_rule,
)
from sfedlora.peft import layer_gammas
from sfedlora.results.grid import cell_name, cell_overrides, grid_cells
from sfedlora.results.sweep import load_sweep, run_sweep

POWER = ("method=fedsa-lora", "lora.scaling=power")


@pytest.mark.parametrize(
    "rule, alpha, rank, n, expected",
    [
        ("lora", 16, 8, 10, 2.0),
        ("lora", 8, 32, 1, 0.25),
        ("rslora", 16, 4, 10, 8.0),
        ("rslora", 3, 9, 5, 1.0),
        ("sfed", 16, 8, 2, 8.0),  # 16 * sqrt(2/8)
        ("sfed", 2, 2, 8, 4.0),  # 2 * sqrt(8/2)
        ("sfed", 1, 512, 20, math.sqrt(20 / 512)),
        # 16 · 20^¾ / 512^¼ = 16 · 8000^¼ / (4 · 2^¼) = 4 · 4000^¼ = 31.8108291...
        (power_rule(0.75, 0.25), 16, 512, 20, 4 * 4000**0.25),
        (power_rule(0.25, 0.75), 1, 16, 16, 0.25),  # 2 / 8
        (power_rule(1, 0), 2, 7, 9, 18.0),  # α·N whatever the rank
        (power_rule(0, 0), 3, 64, 20, 3.0),  # plain α
    ],
)
def test_gamma_against_hand_computed(rule, alpha, rank, n, expected):
    assert gamma(rule, alpha, rank, n) == pytest.approx(expected, rel=1e-12)


def test_the_three_point_hand_value_to_eight_digits():
    assert gamma(power_rule(0.75, 0.25), 16, 512, 20) == pytest.approx(31.81082915, abs=1e-8)


def test_sfed_equals_rslora_times_sqrt_n_and_lora_at_n_equals_r():
    assert gamma("sfed", 16, 64, 9) == pytest.approx(3 * gamma("rslora", 16, 64))
    assert gamma("sfed", 16, 8, 8) == pytest.approx(16.0)


# Ranks and counts where C's pow(x, 0.5) is not the correctly rounded √x (2921), and holder
# counts that are not integers (partial participation).
CASES = [(16.0, 8, 10), (16.0, 2921, 20), (0.7, 512, 5), (13.0, 3, 1 + 2 / 3), (16.0, 1000, 2921)]


@pytest.mark.parametrize("name", NAMED)
@pytest.mark.parametrize("alpha, rank, n", CASES)
def test_named_rules_are_their_points_to_the_last_bit(name, alpha, rank, n):
    a, b = NAMED[name]
    assert gamma(name, alpha, rank, n) == gamma(power_rule(a, b), alpha, rank, n)
    assert peft_scaling_kwargs(name, alpha, rank, n) == peft_scaling_kwargs(power_rule(a, b), alpha, rank, n)


@pytest.mark.parametrize("alpha, rank, n", CASES)
def test_named_rules_are_what_peft_computes_to_the_last_bit(alpha, rank, n):
    assert gamma("lora", alpha, rank, n) == alpha / rank
    assert gamma("rslora", alpha, rank, n) == alpha / math.sqrt(rank)
    assert gamma("sfed", alpha, rank, n) == alpha * math.sqrt(n) / math.sqrt(rank)
    for rule in NAMED:
        assert peft_gamma(peft_scaling_kwargs(rule, alpha, rank, n), rank) == gamma(rule, alpha, rank, n)


@pytest.mark.parametrize("a", [0, 0.25, 0.5, 0.75, 1])
@pytest.mark.parametrize("b", [0, 0.25, 0.5, 0.75, 1, 1.5])
@pytest.mark.parametrize("alpha, rank, n", CASES)
def test_every_power_rule_is_realised_by_peft(a, b, alpha, rank, n):
    rule = power_rule(a, b)
    kwargs = peft_scaling_kwargs(rule, alpha, rank, n)
    realised = peft_gamma(kwargs, rank)
    check_realised(rule, alpha, rank, n, realised)
    if b in (0.5, 1):  # PEFT's own divisors: exact
        assert realised == gamma(rule, alpha, rank, n) and kwargs["use_rslora"] == (b == 0.5)
    else:  # lora_alpha = γ·r over r: γ up to one rounding
        assert not kwargs["use_rslora"] and realised == pytest.approx(gamma(rule, alpha, rank, n), rel=1e-15)


def test_a_power_rule_name_carries_its_exponents_exactly():
    for a, b in [(0.1, 1 / 3), (0.75, 0.25), (0, 1), (2.5e-7, 3)]:
        assert exponents(power_rule(a, b)) == (a, b)
    assert power_rule(0.75, 0.25) == "power(a=0.75, b=0.25)"
    assert exponents("sfed") == (0.5, 0.5)


@pytest.mark.parametrize(
    "bad",
    [
        dict(rule="foo"),
        dict(rule="power(a=-1.0, b=0.5)"),
        dict(rule="power(a=0.5)"),
        dict(rank=0),
        dict(n_clients=0),
    ],
)
def test_gamma_rejects_bad_arguments(bad):
    args = dict(rule="sfed", alpha=16, rank=8, n_clients=4) | bad
    with pytest.raises(ValueError, match="rule|rank|n_clients|exponents"):
        gamma(**args)


@pytest.mark.parametrize("a, b", [(-0.5, 0.5), (0.5, -1), (math.nan, 0.5), (0.5, math.inf)])
def test_power_rule_refuses_negative_and_non_finite_exponents(a, b):
    with pytest.raises(ValueError, match="exponents must be finite and >= 0"):
        power_rule(a, b)


@pytest.mark.parametrize("rule", ["lora", "rslora", "sfed", power_rule(0.75, 0.25)])
def test_peft_kwargs_reproduce_gamma(rule):
    kw = peft_scaling_kwargs(rule, 16, 32, 10)
    peft_scale = kw["lora_alpha"] / (math.sqrt(32) if kw["use_rslora"] else 32)
    assert peft_scale == pytest.approx(gamma(rule, 16, 32, 10), rel=1e-15)


@pytest.mark.parametrize(
    "rule, rank, n",
    [("lora", 8, 10), ("rslora", 16, 5), ("sfed", 8, 10), ("sfed", 32, 3), (power_rule(0.75, 0.25), 12, 20)],
)
def test_every_lora_layer_of_the_built_model_has_scaling_gamma(rule, rank, n):
    model, _ = build_classifier("minilm", 2, rank, 16.0, rule, n)
    scalings = list(layer_gammas(model).values())
    assert len(scalings) == 12  # query and value in each of MiniLM's 6 layers
    assert all(s == pytest.approx(gamma(rule, 16.0, rank, n), rel=1e-12) for s in scalings)


@pytest.mark.parametrize("name", NAMED)
def test_a_built_model_of_a_named_rule_has_the_layers_of_its_point(name):
    named, _ = build_classifier("minilm", 2, 6, 16.0, name, 7)
    point, _ = build_classifier("minilm", 2, 6, 16.0, power_rule(*NAMED[name]), 7)
    assert (
        list(layer_gammas(named).values())
        == list(layer_gammas(point).values())
        == [gamma(name, 16.0, 6, 7)] * 12
    )


def test_the_config_selects_the_power_rule():
    cfg = build_config(overrides=[*POWER, "lora.n_exponent=0.75", "lora.rank_exponent=0.25"])
    assert cfg.scaling == "power(a=0.75, b=0.25)" and cfg.lora.scaling == "power"
    assert gamma(cfg.scaling, 16, 512, 20) == pytest.approx(4 * 4000**0.25, rel=1e-12)
    # An unset exponent is sfed's ½: a sweep's base may leave both to its grid.
    assert build_config(overrides=[*POWER, "lora.rank_exponent=1"]).scaling == "power(a=0.5, b=1.0)"
    assert build_config(overrides=[*POWER]).scaling == "power(a=0.5, b=0.5)"
    # Integer exponents from YAML name the same rule as their floats.
    cfg = build_config(overrides=[*POWER, "lora.n_exponent=0", "lora.rank_exponent=1"])
    assert gamma(cfg.scaling, 16, 8, 5) == gamma("lora", 16, 8, 5)


EXPONENT = "must be a number >= 0 ({} in γ = α·N^a/r^b): set e.g. lora.{}=0.5"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["lora.n_exponent=-1"],
            "config lora.n_exponent: " + EXPONENT.format("a", "n_exponent") + " (got -1)",
        ),
        (["lora.rank_exponent=half"], "config lora.rank_exponent: " + EXPONENT.format("b", "rank_exponent")),
        (["lora.rank_exponent=true"], "config lora.rank_exponent: " + EXPONENT.format("b", "rank_exponent")),
        (["lora.n_exponent=.nan"], "config lora.n_exponent: " + EXPONENT.format("a", "n_exponent")),
        (["lora.n_exponent=[0.5]"], "config lora.n_exponent: " + EXPONENT.format("a", "n_exponent")),
        (
            ["lora.scaling=sfed", "lora.rank_exponent=0.5"],
            "config lora.rank_exponent: only the power rule has exponents, and this run's rule is sfed: "
            "set lora.scaling=power",
        ),
    ],
)
def test_bad_exponents_are_refused_with_one_line(overrides, message):
    sets = ["method=fedsa-lora", "lora.scaling=power", *overrides]
    with pytest.raises(SfedloraError) as err:
        build_config(overrides=sets)
    assert str(err.value).startswith(message)
    result = CliRunner().invoke(app, ["config", *(a for s in sets for a in ("--set", s))])
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.startswith("error: " + message) and result.stderr.count("\n") == 1


def test_a_sweep_grid_varies_the_exponents(tmp_path):
    # The ablation's shape: a varies with b fixed, in a YAML grid under the short names a and b.
    sweep = tmp_path / "ablation.yaml"
    sweep.write_text(
        "method: fedsa-lora\nlora: {scaling: power, rank: 512}\nfederation: {n_clients: 20}\n"
        "grid:\n  a: [0, 0.25, 0.5, 0.75, 1]\n  b: [0.5]\n"
    )
    base, grid = load_sweep(sweep, None)
    cells = grid_cells(grid)
    assert [cell_name(c) for c in cells][:2] == ["a-0_b-0.5", "a-0.25_b-0.5"]
    rules = [build_config(base, cell_overrides(c)).scaling for c in cells]
    assert rules[0] == "power(a=0.0, b=0.5)" and rules[-1] == "power(a=1.0, b=0.5)"
    assert gamma(rules[2], 16, 512, 20) == gamma("sfed", 16, 512, 20)
    # --grid text, with the full keys: a product of both exponents.
    _, grid = load_sweep(None, "lora.n_exponent=0.25,0.75 lora.rank_exponent=0.5,1", [*POWER])
    cells = grid_cells(grid)
    assert cell_name(cells[0]) == "n_exponent-0.25_rank_exponent-0.5"
    assert [build_config({}, [*POWER, *cell_overrides(c)]).scaling for c in cells] == [
        "power(a=0.25, b=0.5)",
        "power(a=0.25, b=1.0)",
        "power(a=0.75, b=0.5)",
        "power(a=0.75, b=1.0)",
    ]
    # A cell that cannot run stops the sweep before any runs, named.
    with pytest.raises(SfedloraError, match=r"grid cell a--0.25_b-0.5: config lora.n_exponent: must be"):
        load_sweep(None, "a=0.5,-0.25 b=0.5", [*POWER])


def test_a_sweep_cell_runs_with_its_exponents(tiny_overrides, tmp_path):
    base, grid = load_sweep(
        None, "a=0.75 b=0.25", [*tiny_overrides, *POWER, "federation.rounds=1", "save_adapters=false"]
    )
    (done,) = run_sweep(base, grid, tmp_path / "s")
    summary = json.loads((done / "summary.json").read_text())
    assert done.name == "a-0.75_b-0.25" and summary["scaling"] == "power(a=0.75, b=0.25)"
    assert summary["gamma"] == pytest.approx(16 * 3**0.75 / 4**0.25, rel=1e-12)  # 3 clients, rank 4
