"""Scaling rules for the LoRA update ``W0 x + γ · B A x``.

N is the number of client updates averaged in one round: with partial participation it is
the number of clients sampled per round, not the size of the federation, because that is
how many updates the server's mean divides by (and so how much it shrinks the update).
"""

from __future__ import annotations

import math
from typing import Literal

ScalingRule = Literal["lora", "rslora", "sfed"]
SCALING_RULES: tuple[str, ...] = ("lora", "rslora", "sfed")


def gamma(rule: str, alpha: float, rank: int, n_clients: float = 1) -> float:
    """The LoRA scaling factor γ.

    - ``lora``:   α / r            (Hu et al., 2021)
    - ``rslora``: α / √r           (Kalajdzievski, 2023)
    - ``sfed``:   α · √(N / r)     (SFed-LoRA, the federated-optimal factor)
    """
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if n_clients < 1:
        raise ValueError(f"n_clients must be >= 1, got {n_clients}")
    if rule == "lora":
        return alpha / rank
    if rule == "rslora":
        return alpha / math.sqrt(rank)
    if rule == "sfed":
        return alpha * math.sqrt(n_clients / rank)
    raise ValueError(f"unknown scaling rule {rule!r}; choose one of {', '.join(SCALING_RULES)}")


def peft_scaling_kwargs(rule: str, alpha: float, rank: int, n_clients: float = 1) -> dict:
    """The ``LoraConfig`` arguments that make PEFT compute exactly ``gamma(...)``.

    PEFT's scaling is ``lora_alpha / r`` or, with ``use_rslora``, ``lora_alpha / √r``;
    α·√(N/r) is the latter with ``lora_alpha = α·√N``.
    """
    gamma(rule, alpha, rank, n_clients)  # validates the arguments
    if rule == "lora":
        return {"lora_alpha": alpha, "use_rslora": False}
    if rule == "rslora":
        return {"lora_alpha": alpha, "use_rslora": True}
    return {"lora_alpha": alpha * math.sqrt(n_clients), "use_rslora": True}


def peft_gamma(kwargs: dict, rank: int) -> float:
    """The γ PEFT computes for a layer of rank ``rank`` from ``kwargs``: the value a saved
    adapter loads with, so the value every layer is given (``models.set_gamma``)."""
    if kwargs["use_rslora"]:
        return kwargs["lora_alpha"] / math.sqrt(rank)
    return kwargs["lora_alpha"] / rank


def check_realised(rule: str, alpha: float, rank: int, n_clients: float, realised: float) -> None:
    """Raise unless ``realised`` (a γ PEFT computes) is the rule's γ up to float rounding."""
    expected = gamma(rule, alpha, rank, n_clients)
    if abs(realised - expected) > 1e-9 * max(1.0, expected):
        raise RuntimeError(
            f"PEFT did not realise γ={expected} (got {realised}); is this PEFT version supported?"
        )
