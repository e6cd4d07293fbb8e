"""Federated LoRA methods as policies over three kinds of adapter tensor.

Every trainable tensor is one of three kinds: ``A`` (LoRA down-projection), ``B`` (LoRA
up-projection) or ``head`` (the task head, e.g. the classifier). A method says, for a
round, which kinds are *trained* by the clients and which are *global*: downloaded from
the server at the start of the round, overwriting the client's copy. A trained global
kind is uploaded and averaged (weighted by client example count); everything else stays
on the client. So FedSA-LoRA's B never leaves the client, and FFA-LoRA's A never moves.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import torch

KINDS: tuple[str, ...] = ("A", "B", "head")


def tensor_kind(name: str) -> str:
    """The kind of a trainable PEFT parameter, from its name."""
    if ".lora_A." in name or ".lora_embedding_A." in name:
        return "A"
    if ".lora_B." in name or ".lora_embedding_B." in name:
        return "B"
    return "head"


@dataclass(frozen=True)
class Method:
    """One federated method: what is global, and what is trained in round ``t`` (1-based)."""

    name: str
    global_kinds: frozenset[str]
    trained_kinds: Callable[[int], frozenset[str]]
    description: str
    # Rounds of linear probing first: only the head trains; afterwards it stays frozen, so
    # what the adapter learns is not blurred by a head that keeps learning too.
    probe_rounds: int = 0

    def trained(self, round_: int) -> frozenset[str]:
        if round_ <= self.probe_rounds:
            return frozenset({"head"})
        # Count the adapter's rounds from the end of probing, so RoLoRA still starts with B.
        kinds = self.trained_kinds(round_ - self.probe_rounds)
        return kinds - {"head"} if self.probe_rounds else kinds

    def uploaded(self, round_: int) -> frozenset[str]:
        return self.trained(round_) & self.global_kinds

    def download(self, server: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What the server sends a client at the start of a round."""
        return select(server, self.global_kinds)

    def upload(self, tensors: Mapping[str, torch.Tensor], round_: int) -> dict[str, torch.Tensor]:
        """What a client sends back after training in round ``round_``."""
        return select(tensors, self.uploaded(round_))

    def ever_trained(self) -> frozenset[str]:
        # Policies are periodic with period at most 2 (RoLoRA) once probing is over.
        return frozenset().union(*(self.trained(t) for t in range(1, self.probe_rounds + 3)))

    def has_local_state(self) -> bool:
        """True when some trained tensor stays on the client, so personalised models differ."""
        return bool(self.ever_trained() - self.global_kinds)

    def with_local_head(self) -> Method:
        """The same method with the task head trained but never sent."""
        return replace(
            self,
            global_kinds=self.global_kinds - {"head"},
            description=self.description + " Task head kept local.",
        )

    def with_head_probe(self, rounds: int) -> Method:
        """The same method after ``rounds`` of head-only training, with the head frozen after."""
        return replace(
            self,
            probe_rounds=rounds,
            description=self.description + f" Head trained alone for {rounds} rounds, then frozen.",
        )


def _always(*kinds: str) -> Callable[[int], frozenset[str]]:
    fixed = frozenset(kinds)
    return lambda round_: fixed


def _rolora(round_: int) -> frozenset[str]:
    # Odd rounds freeze A and train B; even rounds the reverse.
    return frozenset({"B", "head"} if round_ % 2 == 1 else {"A", "head"})


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "fedit",
            frozenset(KINDS),
            _always("A", "B", "head"),
            "FedIT: FedAvg on LoRA; A and B trained and averaged.",
        ),
        Method(
            "ffa-lora",
            frozenset({"B", "head"}),
            _always("B", "head"),
            "FFA-LoRA: A frozen at its shared random init; B trained and averaged.",
        ),
        Method(
            "fedsa-lora",
            frozenset({"A", "head"}),
            _always("A", "B", "head"),
            "FedSA-LoRA: A and B trained; only A averaged; B stays on each client.",
        ),
        Method(
            "rolora",
            frozenset(KINDS),
            _rolora,
            "RoLoRA: odd rounds train and average B (A frozen), even rounds A.",
        ),
    )
}

# A preset names a method and the scaling rule that defines it in the literature.
PRESETS: dict[str, tuple[str, str | None]] = {
    "fedit": ("fedit", None),
    "ffa-lora": ("ffa-lora", None),
    "fedsa-lora": ("fedsa-lora", None),
    "rolora": ("rolora", None),
    "fedsa-rslora": ("fedsa-lora", "rslora"),
    "sfed-lora": ("fedsa-lora", "sfed"),
}


def get_method(name: str, local_head: bool = False, head_probe_rounds: int = 0) -> Method:
    try:
        method = METHODS[PRESETS[name][0]]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(PRESETS)}") from None
    if local_head:
        method = method.with_local_head()
    return method.with_head_probe(head_probe_rounds) if head_probe_rounds else method


def select(tensors: Mapping[str, torch.Tensor], kinds: frozenset[str]) -> dict[str, torch.Tensor]:
    """The entries of a flat name → tensor dict whose kind is in ``kinds``."""
    return {n: t for n, t in tensors.items() if tensor_kind(n) in kinds}


def aggregate(
    updates: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]
) -> dict[str, torch.Tensor]:
    """Weighted mean of client tensors, name by name: Σ w_k x_k / Σ w_k.

    Weights are client example counts. Every update must carry the same names and shapes.
    """
    if not updates:
        raise ValueError("cannot aggregate zero updates")
    if len(updates) != len(weights):
        raise ValueError(f"{len(updates)} updates but {len(weights)} weights")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("aggregation weights must sum to a positive number")
    names = list(updates[0])
    for k, update in enumerate(updates):
        if set(update) != set(names):
            raise ValueError(
                f"update {k} carries tensors {sorted(set(update) ^ set(names))[:3]} that the others do not"
            )
    out: dict[str, torch.Tensor] = {}
    for name in names:
        acc = torch.zeros_like(updates[0][name], dtype=torch.float64)
        for update, w in zip(updates, weights):
            acc += update[name].to(torch.float64) * (w / total)
        out[name] = acc.to(updates[0][name].dtype)
    return out
