"""Two LoRA adapters on one model, their outputs mixed: FedDPA's global and personal adapters.

A layer with both computes W0·x + (1 − a)·γ·B_g A_g x + a·γ·B_l A_l x: the sum of the two
adapters' outputs (not an adapter of blended matrices), as the reference's LoRA layer does
(``Lydia-yang/FedDPA``, ``code/peft/tuners/lora/layer.py``). Both are PEFT adapters of the
one shared model, ``default`` (the global one) and ``personal``, both active where the personal
one takes part, so PEFT sums their outputs; a and 1 − a are folded into each adapter's
scaling. Where the reference detaches a branch (the global one while the personal adapter
trains), a forward hook on that adapter's B cuts the gradient through its output, so neither
its factors nor the layers below receive any gradient through it.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from pathlib import Path

GLOBAL = "default"
PERSONAL = "personal"


@dataclass(frozen=True)
class Mix:
    """How the shared model combines its adapters' outputs."""

    personal: float | None = (
        None  # a: the personal adapter's weight (the global one's 1 − a); None: global alone
    )
    detached: str | None = None  # the adapter whose output passes no gradient back

    def weights(self) -> dict[str, float]:
        if self.personal is None:
            return {GLOBAL: 1.0}
        return {GLOBAL: 1.0 - self.personal, PERSONAL: self.personal}


GLOBAL_ONLY = Mix()


def lora_layers(model) -> list:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def _cut(layer, adapter: str, module, args, output):
    # A forward hook on ``adapter``'s B: its output without a gradient while the layer says so.
    return output.detach() if layer.sfedlora_detached == adapter else output


def add_personal(model) -> None:
    """Give ``model`` (a PEFT model with its ``default`` adapter) a ``personal`` adapter of the same
    rank, scaling, targets and dropout, initialised as PEFT initialises one (A drawn from torch's
    stream, B zero), with no copy of the task head; it starts inactive."""
    from peft import PeftModel

    config = copy.deepcopy(model.peft_config[GLOBAL])
    config.modules_to_save = None  # the task head stays one module: the method decides where it lives
    # PeftModel's own add_adapter: a sequence classifier's would add a second head.
    PeftModel.add_adapter(model, PERSONAL, config)
    for layer in lora_layers(model):
        layer.sfedlora_detached = None
        for name in (GLOBAL, PERSONAL):
            layer.lora_B[name].register_forward_hook(functools.partial(_cut, layer, name))
    set_mix(model, 1.0, GLOBAL_ONLY)


def load_personal(model, path: Path, name: str) -> list[str]:
    """Where the adapter ``name`` loaded from ``path`` has a personal adapter saved beside it
    (``path/personal``, :meth:`sfedlora.federated.ranks.RankPlan.save`), load that too, as
    ``<name>_personal``; return the names to :func:`activate` together, ``name`` first (each
    one's weight in the personalised model is in its saved ``lora_alpha``)."""
    from peft import LoraConfig, PeftModel, set_peft_model_state_dict
    from safetensors.torch import load_file

    folder = Path(path) / PERSONAL
    if not (folder / "adapter_config.json").is_file():
        return [name]
    names = [name, f"{name}_{PERSONAL}"]
    PeftModel.add_adapter(model, names[1], LoraConfig.from_pretrained(str(folder)))
    set_peft_model_state_dict(model, load_file(folder / "adapter_model.safetensors"), adapter_name=names[1])
    return names


def activate(model, names: list[str]) -> None:
    """Make ``names`` the active adapters of every LoRA layer (their outputs summed)."""
    for layer in lora_layers(model):
        layer.set_adapter(names)


def has_personal(model) -> bool:
    return PERSONAL in getattr(model, "peft_config", {})


def set_mix(model, gamma: float, mix: Mix) -> None:
    """Every LoRA layer's adapters: those of ``mix`` active, each scaled by γ times its weight,
    ``mix.detached`` passing no gradient. A model without a personal adapter takes γ alone."""
    weights = mix.weights()
    dual = has_personal(model)
    for layer in lora_layers(model):
        for adapter in layer.scaling:
            layer.scaling[adapter] = gamma * weights.get(adapter, 1.0)
        if dual:
            layer.set_adapter(list(weights))
            layer.sfedlora_detached = mix.detached
