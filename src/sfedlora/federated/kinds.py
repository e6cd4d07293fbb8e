"""The kinds of tensor a federated method moves, and the weighted mean over clients.

Every trainable tensor is one of three kinds: ``A`` (LoRA down-projection), ``B`` (LoRA
up-projection) or ``head`` (the task head, e.g. the classifier). A fourth kind, ``base``,
is not trained by anyone: it is the server-owned change ΔW to a frozen base weight
(:mod:`sfedlora.lora.base`), named after the weight it changes
(``….base_layer.weight``), which methods such as FedEx-LoRA fold into the shared model.
Two more, ``personal_A`` and ``personal_B``, are the factors of a second adapter that a
method keeps on each client beside the one it shares (FedDPA's personal adapter,
:mod:`sfedlora.lora.dual`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..lora.dual import PERSONAL

KINDS: tuple[str, ...] = ("A", "B", "head")
PERSONAL_KINDS = frozenset({"personal_A", "personal_B"})
BASE = "base"
BASE_SUFFIX = ".base_layer.weight"


def tensor_kind(name: str) -> str:
    """The kind of a flat adapter tensor, from its (PEFT) name."""
    if f".{PERSONAL}." in name and (".lora_A." in name or ".lora_B." in name):
        return "personal_A" if ".lora_A." in name else "personal_B"
    if ".lora_A." in name or ".lora_embedding_A." in name:
        return "A"
    if ".lora_B." in name or ".lora_embedding_B." in name:
        return "B"
    if name.endswith(BASE_SUFFIX):
        return BASE
    return "head"


def select(tensors: Mapping[str, torch.Tensor], kinds: frozenset[str]) -> dict[str, torch.Tensor]:
    """The entries of a flat name → tensor dict whose kind is in ``kinds``."""
    return {n: t for n, t in tensors.items() if tensor_kind(n) in kinds}


def split_base(
    tensors: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``tensors`` as (adapter tensors, base change)."""
    base = select(tensors, frozenset({BASE}))
    return {n: t for n, t in tensors.items() if n not in base}, base


def common_names(updates: Sequence[Mapping[str, torch.Tensor]]) -> list[str]:
    """The tensor names every update carries, in the first's order; refused where they differ."""
    if not updates:
        raise ValueError("cannot aggregate zero updates")
    names = list(updates[0])
    for k, update in enumerate(updates):
        if set(update) != set(names):
            raise ValueError(
                f"update {k} carries tensors {sorted(set(update) ^ set(names))[:3]} that the others do not"
            )
    return names


def aggregate(
    updates: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]
) -> dict[str, torch.Tensor]:
    """Weighted mean of client tensors, name by name: Σ w_k x_k / Σ w_k.

    Every update must carry the same names and shapes.
    """
    if not updates:
        raise ValueError("cannot aggregate zero updates")
    if len(updates) != len(weights):
        raise ValueError(f"{len(updates)} updates but {len(weights)} weights")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("aggregation weights must sum to a positive number")
    names = common_names(updates)
    out: dict[str, torch.Tensor] = {}
    for name in names:
        acc = torch.zeros_like(updates[0][name], dtype=torch.float64)
        for update, w in zip(updates, weights):
            acc += update[name].to(torch.float64) * (w / total)
        out[name] = acc.to(updates[0][name].dtype)
    return out
