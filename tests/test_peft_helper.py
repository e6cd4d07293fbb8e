"""``sfedlora.peft``: a LoraConfig realising a scaling rule in someone else's PEFT model, and its check."""

import math
import re
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

from sfedlora.lora.scaling import power_rule
from sfedlora.lora.tiny_llama import tiny_llama_config
from sfedlora.peft import check_model, config_gamma, layer_gammas, lora_config


class TwoLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second = torch.nn.Linear(6, 6), torch.nn.Linear(6, 2)

    def forward(self, x):
        return self.second(self.first(x))


def peft_model(config):
    torch.manual_seed(0)
    return get_peft_model(TwoLayers(), config)


TARGETS = {"target_modules": ["first", "second"]}


@pytest.mark.parametrize(
    "rule, rank, alpha, n, expected",
    [
        ("sfed", 16, 16, 10, 4 * math.sqrt(10)),  # 16·√(10/16)
        ("sfed", 8, 16, 2, 8.0),  # 16·√(2/8)
        ("rslora", 4, 16, 10, 8.0),  # 16/√4, whatever N
        ("lora", 8, 16, 10, 2.0),  # 16/8
        (power_rule(0.25, 0.75), 16, 1, 16, 0.25),  # 1·16^¼/16^¾ = 2/8
    ],
)
def test_every_layer_of_a_peft_model_computes_the_hand_computed_gamma(rule, rank, alpha, n, expected):
    config = lora_config(rank, alpha, n, rule, **TARGETS)
    model = peft_model(config)
    assert config_gamma(config) == pytest.approx(expected, rel=1e-12)
    assert check_model(model, alpha, n, rule) == pytest.approx(
        {"base_model.model.first": expected} | {"base_model.model.second": expected}
    )


def test_the_check_names_a_layer_built_with_plain_lora_scaling():
    model = peft_model(LoraConfig(r=8, lora_alpha=16, **TARGETS))  # α/r = 2, not 16·√(10/8)
    with pytest.raises(ValueError, match=r"layer base_model.model.first \(r=8\) computes γ=2.0.*lora_config"):
        check_model(model, alpha=16, n_clients=10)
    assert set(layer_gammas(model).values()) == {2.0}


def test_layers_of_different_ranks_are_each_checked_at_their_own_rank():
    # lora_alpha = 16·√2 with rsLoRA is sfed's γ at N = 2 for every rank: 8·√2 at r = 4, 4·√2 at r = 16.
    config = LoraConfig(
        r=4, lora_alpha=16 * math.sqrt(2), use_rslora=True, rank_pattern={"second": 16}, **TARGETS
    )
    gammas = check_model(peft_model(config), alpha=16, n_clients=2)
    assert gammas == pytest.approx(
        {"base_model.model.first": 8 * math.sqrt(2), "base_model.model.second": 4 * math.sqrt(2)}
    )
    config.alpha_pattern = {"second": 16}  # 16/√4 = 8 on the second layer only
    with pytest.raises(ValueError, match=r"layer base_model.model.second \(r=16\) computes γ=4.0"):
        check_model(peft_model(config), alpha=16, n_clients=2)


def test_the_config_refuses_scaling_settings_of_its_own():
    with pytest.raises(TypeError, match="lora_alpha"):
        lora_config(8, 16, 10, lora_alpha=32)
    with pytest.raises(ValueError, match="n_clients"):
        lora_config(8, 16, 0)
    with pytest.raises(ValueError, match="no LoRA layers"):
        check_model(TwoLayers(), alpha=16, n_clients=2)


def test_the_documented_example_runs_on_a_llama():
    from transformers import LlamaForCausalLM

    page = (Path(__file__).resolve().parents[1] / "docs" / "own-pipeline.md").read_text()
    example = re.findall(r"```python\n(.*?)```", page, re.S)[0]
    assert len(example.strip().splitlines()) == 6  # two imports, a blank line, three calls
    scope = {"base_model": LlamaForCausalLM(tiny_llama_config())}
    exec(example, scope)
    gammas = scope["check_model"](scope["model"], alpha=16, n_clients=10)
    # q_proj and v_proj of 2 layers, each at 16·√(10/16) = 4·√10
    assert list(gammas.values()) == pytest.approx([4 * math.sqrt(10)] * 4)
