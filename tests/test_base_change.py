"""The server-owned change to the base weights: folded into the layers exactly, undone
exactly, saved beside the adapters and folded into a plain model the same way."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from sfedlora.errors import SfedloraError
from sfedlora.federated.kinds import BASE, split_base, tensor_kind
from sfedlora.lora.base import fold_saved_base_change, save_base_change, set_base_change


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(5, 3)  # non-square: (out, in) = (3, 5)
        self.out = torch.nn.Linear(3, 2)

    def forward(self, x):
        return self.out(self.proj(x))


def peft_net():
    torch.manual_seed(0)
    return get_peft_model(Net(), LoraConfig(r=2, lora_alpha=2, target_modules=["proj"]))


NAME = "base_model.model.proj.base_layer.weight"


def test_the_base_change_is_a_kind_of_its_own_and_splits_off():
    assert tensor_kind(NAME) == BASE
    adapter, base = split_base({NAME: torch.ones(3, 5), "m.proj.lora_A.default.weight": torch.ones(2, 5)})
    assert list(base) == [NAME] and list(adapter) == ["m.proj.lora_A.default.weight"]


def test_the_layer_runs_w0_plus_the_change_and_w0_again_without_it():
    model = peft_net()
    weight = model.base_model.model.proj.base_layer.weight
    w0 = weight.detach().clone()
    first, second = torch.randn(3, 5), torch.randn(3, 5)
    set_base_change(model, {NAME: first})
    assert torch.equal(weight, w0 + first)
    set_base_change(model, {NAME: second})  # from W0, not on top of the first change
    assert torch.equal(weight, w0 + second)
    set_base_change(model, {})
    assert torch.equal(weight, w0)
    assert not any("origin" in n for n in model.base_model.model.proj.state_dict())


def test_a_saved_change_folds_into_the_plain_model_bit_for_bit(tmp_path):
    model = peft_net()
    change = {NAME: torch.randn(3, 5)}
    set_base_change(model, change)
    save_base_change(tmp_path, change)
    plain = peft_net().unload()
    assert fold_saved_base_change(plain, tmp_path)
    assert torch.equal(plain.proj.weight, model.base_model.model.proj.base_layer.weight)
    assert not fold_saved_base_change(plain, tmp_path / "none")


def test_a_change_for_a_weight_the_model_lacks_is_refused():
    with pytest.raises(SfedloraError, match="does not have"):
        set_base_change(peft_net(), {"base_model.model.other.base_layer.weight": torch.zeros(3, 5)})


def test_a_damaged_saved_change_is_one_error_line(tmp_path):
    (tmp_path / "base_change.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(SfedloraError, match="base change .* is damaged, truncated or from another version"):
        fold_saved_base_change(peft_net().unload(), tmp_path)
