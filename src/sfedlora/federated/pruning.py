"""HetLoRA's local rank self-pruning (Cho et al., arXiv 2401.06432, section 3): a client
shrinks its own LoRA rank when its highest rank components carry little.

Client k of current rank r_k keeps the first ``kept(r_k)`` = max(min_rank, ⌊γ r_k⌋)
components (γ the decay) and calls the rest, components kept(r_k) … r_k − 1, its tail. In local
training it adds λ·Σ_layers ‖B_tail A_tail‖_F to its loss; after training, if that sum is
smaller than it was before (the tail shrank under the regulariser), it prunes to kept(r_k)
and from then on trains, keeps and sends the smaller adapter. The server needs nothing new:
HetLoRA zero-pads every update to the largest rank.

``norm="factors"`` uses ‖B_tail‖_F·‖A_tail‖_F instead, as a public re-implementation does
(docs/method.md). The γ_k a client runs with stays that of its assigned rank: cutting
components whose product is near zero then changes its model little, which is the
paper's reason for pruning (α/r at the smaller rank would rescale every kept component).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..config import RunConfig
from ..errors import SfedloraError
from .kinds import tensor_kind
from .methods.products import layers


@dataclass(frozen=True)
class Pruning:
    """The pruning rule of a run: decay γ, regulariser weight λ, minimum rank, tail norm."""

    decay: float
    weight: float
    min_rank: int
    norm: str  # "product": ‖B_tail A_tail‖_F; "factors": ‖B_tail‖_F·‖A_tail‖_F

    def kept(self, rank: int) -> int:
        """The rank a client of ``rank`` prunes to: ⌊γ·rank⌋, never below the minimum (nor above
        ``rank``). The tolerance keeps ⌊0.9·10⌋ at 9 whatever the float rounding."""
        return min(rank, max(self.min_rank, math.floor(self.decay * rank + 1e-9)))

    def tail(self, tensors: Mapping[str, torch.Tensor], rank: int) -> torch.Tensor:
        """Σ over layers of the tail's norm, components kept(rank) … rank − 1 of each layer's
        A rows and B columns (``tensors`` may be wider than ``rank``: the padding is not counted)."""
        low = self.kept(rank)
        total = torch.zeros((), dtype=torch.float64)
        for a, b in layers(tensors).values():
            tail_a, tail_b = tensors[a][low:rank].double(), tensors[b][:, low:rank].double()
            if self.norm == "product":
                total = total + torch.linalg.matrix_norm(tail_b @ tail_a)
            else:
                total = total + torch.linalg.matrix_norm(tail_b) * torch.linalg.matrix_norm(tail_a)
        return total

    def penalty(self, tensors: Mapping[str, torch.Tensor], rank: int) -> torch.Tensor:
        """λ times the tail's norm: the term local training adds to the loss."""
        return self.weight * self.tail(tensors, rank)

    def decide(self, before: float, after: float, rank: int) -> int:
        """The rank after a round whose tail norm went from ``before`` to ``after``."""
        return self.kept(rank) if after < before else rank

    def rank_after(
        self, before: float, trained: Mapping[str, torch.Tensor], rank: int, held: int | None
    ) -> int | None:
        """A client state's rank after training to ``trained`` from a tail norm ``before`` at
        ``rank``: the pruned rank, or ``held`` (None: the plan's) where it did not prune."""
        kept = self.decide(before, float(self.tail(trained, rank)), rank)
        return kept if kept < rank else held


def pruning_of(cfg: RunConfig) -> Pruning | None:
    """The run's pruning rule, or None where it is off (the default)."""
    f = cfg.federation
    if f.hetlora_prune_decay is None:
        return None
    if cfg.method != "hetlora":
        raise SfedloraError(
            f"federation.hetlora_prune_decay is HetLoRA's rank self-pruning, not {cfg.method}'s: "
            "set method=hetlora or unset federation.hetlora_prune_decay"
        )
    return Pruning(f.hetlora_prune_decay, f.hetlora_prune_weight, f.hetlora_min_rank, f.hetlora_prune_norm)


def held_rank(tensors: Mapping) -> int | None:
    """The rank an adapter holds: the rows of its LoRA A tensors (anything with a ``shape``,
    a tensor or a Flower array); None where it holds no A."""
    for name, t in tensors.items():
        if tensor_kind(name) == "A":
            shape = tuple(t.shape)  # a node's reply is not trusted: its array may be of any shape
            return int(shape[0]) if len(shape) == 2 else None
    return None
