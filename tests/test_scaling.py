import math

import pytest

from sfedlora.models import build_classifier, lora_scalings
from sfedlora.scaling import gamma, peft_scaling_kwargs


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
    ],
)
def test_gamma_against_hand_computed(rule, alpha, rank, n, expected):
    assert gamma(rule, alpha, rank, n) == pytest.approx(expected, rel=1e-12)


def test_sfed_equals_rslora_times_sqrt_n_and_lora_at_n_equals_r():
    assert gamma("sfed", 16, 64, 9) == pytest.approx(3 * gamma("rslora", 16, 64))
    assert gamma("sfed", 16, 8, 8) == pytest.approx(16.0)


@pytest.mark.parametrize("bad", [dict(rule="foo"), dict(rank=0), dict(n_clients=0)])
def test_gamma_rejects_bad_arguments(bad):
    args = dict(rule="sfed", alpha=16, rank=8, n_clients=4) | bad
    with pytest.raises(ValueError, match="rule|rank|n_clients"):
        gamma(**args)


@pytest.mark.parametrize("rule", ["lora", "rslora", "sfed"])
def test_peft_kwargs_reproduce_gamma(rule):
    kw = peft_scaling_kwargs(rule, 16, 32, 10)
    peft_scale = kw["lora_alpha"] / (math.sqrt(32) if kw["use_rslora"] else 32)
    assert peft_scale == pytest.approx(gamma(rule, 16, 32, 10))


@pytest.mark.parametrize(
    "rule, rank, n", [("lora", 8, 10), ("rslora", 16, 5), ("sfed", 8, 10), ("sfed", 32, 3)]
)
def test_every_lora_layer_of_the_built_model_has_scaling_gamma(rule, rank, n):
    model, _ = build_classifier("minilm", 2, rank, 16.0, rule, n)
    scalings = lora_scalings(model)
    assert len(scalings) == 12  # query and value in each of MiniLM's 6 layers
    assert all(s == pytest.approx(gamma(rule, 16.0, rank, n), rel=1e-12) for s in scalings)
