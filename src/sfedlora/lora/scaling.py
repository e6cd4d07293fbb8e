"""Scaling rules for the LoRA update ``W0 x + γ · B A x``.

Every rule is a point of one family, γ = α · N^a / r^b: ``lora`` is (a, b) = (0, 1),
``rslora`` (0, ½), ``sfed`` (½, ½), and ``power(a=…, b=…)`` any other point. A rule is
passed around by its name; the general one's name carries its exponents, so that a name
alone fixes γ wherever it travels (config, rank plan, model build, run summary).

N is the number of client updates averaged in one round: with partial participation it is
the number of clients sampled per round, not the size of the federation, because that is
how many updates the server's mean divides by (and so how much it shrinks the update).
"""

from __future__ import annotations

import math
import re
from typing import Literal

ScalingRule = Literal["lora", "rslora", "sfed", "power"]
NAMED: dict[str, tuple[float, float]] = {"lora": (0.0, 1.0), "rslora": (0.0, 0.5), "sfed": (0.5, 0.5)}
_POWER = re.compile(r"power\(a=(?P<a>[^,]+), b=(?P<b>[^)]+)\)")


def _check_exponents(a: float, b: float) -> None:
    if not all(math.isfinite(e) and e >= 0 for e in (a, b)):
        raise ValueError(f"scaling exponents must be finite and >= 0, got a={a}, b={b}")


def power_rule(a: float, b: float) -> str:
    """The name of the rule γ = α · N^a / r^b: ``power(a=0.75, b=0.25)``.

    The exponents are written with ``repr``, which reads back to the same float, so the
    name loses nothing of them.
    """
    _check_exponents(a, b)
    return f"power(a={float(a)!r}, b={float(b)!r})"


def exponents(rule: str) -> tuple[float, float]:
    """(a, b) of ``rule``: a named rule's point, or the exponents a ``power`` name carries."""
    if rule in NAMED:
        return NAMED[rule]
    match = _POWER.fullmatch(rule)
    if match is None:
        raise ValueError(
            f"unknown scaling rule {rule!r}; choose one of {', '.join(NAMED)} or power(a=…, b=…)"
        )
    a, b = float(match["a"]), float(match["b"])
    _check_exponents(a, b)
    return a, b


def _power(x: float, e: float) -> float:
    # PEFT's rslora divides by math.sqrt(r), and C's pow(x, 0.5) is not always the correctly
    # rounded square root (it differs at x = 2921): sqrt keeps rslora and sfed bit-equal to PEFT.
    return math.sqrt(x) if e == 0.5 else x**e


def gamma(rule: str, alpha: float, rank: int, n_clients: float = 1) -> float:
    """The LoRA scaling factor γ = α · N^a / r^b, with (a, b) = ``exponents(rule)``.

    - ``lora``:   α / r            (Hu et al., 2021)
    - ``rslora``: α / √r           (Kalajdzievski, 2023)
    - ``sfed``:   α · √N / √r      (SFed-LoRA, the federated-optimal factor)

    Computed as (α · N^a) / r^b, the order PEFT computes ``lora_alpha / r`` (or ``/ √r``) in,
    so that the named rules are what the layers compute to the last bit.
    """
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if n_clients < 1:
        raise ValueError(f"n_clients must be >= 1, got {n_clients}")
    a, b = exponents(rule)
    return alpha * _power(n_clients, a) / _power(rank, b)


def peft_scaling_kwargs(rule: str, alpha: float, rank: int, n_clients: float = 1) -> dict:
    """The ``LoraConfig`` arguments that make PEFT compute ``gamma(...)``.

    PEFT's scaling is ``lora_alpha / r`` or, with ``use_rslora``, ``lora_alpha / √r``: for
    b = 1 or ½ that is ``lora_alpha = α · N^a``, exactly γ. Any other b has no divisor of its
    own in PEFT, so ``lora_alpha = γ · r`` over r, γ up to one rounding (``check_realised``).
    """
    value = gamma(rule, alpha, rank, n_clients)  # validates the arguments
    a, b = exponents(rule)
    if b in (0.5, 1.0):
        return {"lora_alpha": alpha * _power(n_clients, a), "use_rslora": b == 0.5}
    return {"lora_alpha": value * rank, "use_rslora": False}


def peft_gamma(kwargs: dict, rank: int) -> float:
    """The γ PEFT computes for a layer of rank ``rank`` from ``kwargs``: the value a saved
    adapter loads with, so the value every layer is given (``dual.set_mix``)."""
    if kwargs["use_rslora"]:
        return kwargs["lora_alpha"] / math.sqrt(rank)
    return kwargs["lora_alpha"] / rank


def realises(rule: str, alpha: float, rank: int, n_clients: float, realised: float) -> bool:
    """Whether ``realised`` (a γ PEFT computes) is the rule's γ up to float rounding."""
    expected = gamma(rule, alpha, rank, n_clients)
    return abs(realised - expected) <= 1e-9 * max(1.0, expected)


def check_realised(rule: str, alpha: float, rank: int, n_clients: float, realised: float) -> None:
    """Raise unless ``realised`` (a γ PEFT computes) is the rule's γ up to float rounding."""
    if not realises(rule, alpha, rank, n_clients, realised):
        expected = gamma(rule, alpha, rank, n_clients)
        raise RuntimeError(
            f"PEFT did not realise γ={expected} (got {realised}); is this PEFT version supported?"
        )
