"""The methods that are policies over tensor kinds alone, with the server's weighted mean:
FedIT, FFA-LoRA, FedSA-LoRA, RoLoRA."""

from __future__ import annotations

from ..kinds import KINDS
from .method import Method, always


def _rolora(round_: int) -> frozenset[str]:
    # Odd rounds freeze A and train B; even rounds the reverse.
    return frozenset({"B", "head"} if round_ % 2 == 1 else {"A", "head"})


FEDIT = Method(
    "fedit",
    frozenset(KINDS),
    always("A", "B", "head"),
    "FedIT: FedAvg on LoRA; A and B trained and averaged.",
)
FFA_LORA = Method(
    "ffa-lora",
    frozenset({"B", "head"}),
    always("B", "head"),
    "FFA-LoRA: A frozen at its shared random init; B trained and averaged.",
)
FEDSA_LORA = Method(
    "fedsa-lora",
    frozenset({"A", "head"}),
    always("A", "B", "head"),
    "FedSA-LoRA: A and B trained; only A averaged; B stays on each client.",
)
ROLORA = Method(
    "rolora", frozenset(KINDS), _rolora, "RoLoRA: odd rounds train and average B (A frozen), even rounds A."
)
