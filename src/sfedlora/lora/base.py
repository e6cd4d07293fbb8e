"""The server-owned change ΔW to the frozen base weights of the LoRA layers.

Some federated methods change the shared base model itself (FedEx-LoRA folds a residual
into it, FLoRA merges each round's stacked adapter): every LoRA layer's base weight becomes
W0 + ΔW, with ΔW owned by the server and the same for every client. ΔW travels as a flat
name → tensor dict keyed by the weight it changes (``<layer>.base_layer.weight``), in that
weight's own orientation ((out, in) for ``nn.Linear``, (in, out) for GPT-2's ``Conv1D``).

The layer's weight is always recomputed as W0 + ΔW from a kept copy of W0, never updated in
place round after round: so the weights do not depend on the path that led to ΔW, and a
resumed run, a Flower node that skipped rounds and an exported model compute the same bits.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import SfedloraError, reading

BASE_FILE = "base_change.safetensors"  # beside a run's saved adapters, when the base changed


def folded(weight: torch.Tensor, change: torch.Tensor) -> torch.Tensor:
    """W0 + ΔW in the weight's dtype and device: the one formula every consumer uses."""
    return weight + change.to(weight.device, weight.dtype)


def set_base_change(model: torch.nn.Module, change: Mapping[str, torch.Tensor]) -> None:
    """Make every LoRA layer's base weight W0 + ``change[<layer>.base_layer.weight]``, and W0
    again where ``change`` has no entry for a layer it changed before."""
    from peft.tuners.lora import LoraLayer

    left = set(change)
    for name, layer in model.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        key = f"{name}.base_layer.weight"
        delta = change.get(key)
        left.discard(key)
        origin = getattr(layer, "sfedlora_origin", None)
        if (delta is None and origin is None) or getattr(layer, "sfedlora_applied", None) is delta:
            continue
        weight = layer.get_base_layer().weight
        if not weight.is_floating_point():
            raise SfedloraError(
                f"the method changes the base weights, which are quantized here ({name}): "
                "set model.quantization=none"
            )
        if origin is None:
            origin = weight.detach().clone()
            layer.register_buffer("sfedlora_origin", origin, persistent=False)
        with torch.no_grad():
            weight.copy_(origin if delta is None else folded(origin, delta))
        layer.sfedlora_applied = delta  # the same tensor next time: nothing to recompute
    if left:
        raise SfedloraError(
            f"a base change names weights this model does not have ({sorted(left)[:2]}): "
            "it belongs to another model or run"
        )


def plain_name(name: str) -> str:
    """The name of a changed weight in the plain (adapter-free) model."""
    return name.removeprefix("base_model.model.").replace(".base_layer.weight", ".weight")


def save_base_change(directory: Path, change: Mapping[str, torch.Tensor]) -> Path:
    """Write ΔW beside saved adapters, keyed by the plain model's weight names."""
    from safetensors.torch import save_file

    path = Path(directory) / BASE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {plain_name(n): t.contiguous().cpu() for n, t in change.items()}, path, metadata={"format": "pt"}
    )
    return path


def fold_saved_base_change(model: torch.nn.Module, directory: Path) -> bool:
    """Add the ΔW saved in ``directory`` (if any) to the plain ``model``'s weights; whether there was one."""
    from safetensors.torch import load_file

    path = Path(directory) / BASE_FILE
    if not path.is_file():
        return False
    with reading(path, "base change", "restore it from a copy, or run the run again"):
        change = load_file(path)
    with torch.no_grad():
        for name, delta in change.items():
            weight = model.get_parameter(name)
            weight.copy_(folded(weight, delta))
    return True


def transposed_weights(model: torch.nn.Module) -> frozenset[str]:
    """The base weights stored (in, out) rather than (out, in): GPT-2's ``Conv1D`` layers,
    which PEFT marks ``fan_in_fan_out``. A change to them is the transposed product."""
    from peft.tuners.lora import LoraLayer

    return frozenset(
        f"{name}.base_layer.weight"
        for name, layer in model.named_modules()
        if isinstance(layer, LoraLayer) and getattr(layer, "fan_in_fan_out", False)
    )
