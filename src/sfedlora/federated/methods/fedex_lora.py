"""FedEx-LoRA (Singhal et al., arXiv 2410.09432): exact aggregation, the averaging error
folded into the base weights.

Reference: ``CERT-Lab/fedex-lora``, ``fed_agg.py`` ``aggregate_models_ours`` (commit
2fa2e4a). The server averages A, B and the head (plainly, 1/K, as the reference does) and
adds to each layer's base weight the residual Σ_k p_k γ_k B_k A_k − γ B̄ Ā, so that the
global model W0 + ΔW + γ B̄ Ā is exactly the weighted mean of the clients' models. Two
departures from the reference, both corrections: each client's own γ_k inside the sum (the
same γ for all with one rank), and the residual in the base weight's own orientation (the
reference transposes it, which is right for GPT-2's Conv1D only). The reference sends the
residual as a full d_out × d_in matrix per layer; here it goes as its factors (rank at most
(K+1)·r) where they are smaller (:mod:`sfedlora.federated.catchup`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..catchup import Change
from ..kinds import BASE, KINDS
from .method import Method, Replies, always
from .products import layers, oriented, refuse_unsupported, stacked

if TYPE_CHECKING:
    from ...config import RunConfig


@dataclass(frozen=True)
class FedExLoRA(Method):
    def aggregate(self, replies: Replies) -> dict[str, torch.Tensor | Change]:
        new = super().aggregate(replies)  # Ā, B̄ and the head: the weighted means
        gamma = replies.plan.layer_gamma(None)
        for key, (a, b) in layers(new).items():
            u, c, v = stacked(replies, a, b)  # the residual's factors: the clients' and −γ B̄ Ā
            minus = torch.full((new[a].shape[0],), -gamma, dtype=torch.float64)
            residual = Change.of(torch.cat([u, new[b]], 1), torch.cat([c, minus]), torch.cat([v, new[a]]))
            new[key] = oriented(residual, key, replies.transposed)
        return new

    def check(self, cfg: RunConfig) -> None:
        # With mixed ranks client k runs the first r_k rows of Ā under its own γ_k: not the
        # global model the residual makes exact.
        refuse_unsupported(cfg, self.name, mixed_ranks=False, changes_base=True)

    def base_change_rank(self, ranks: Sequence[int]) -> int:
        return sum(ranks) + max(ranks)  # the clients' stacked factors and B̄ Ā


FEDEX_LORA = FedExLoRA(
    "fedex-lora",
    frozenset({*KINDS, BASE}),
    always("A", "B", "head"),
    "FedEx-LoRA: A, B and head averaged; the residual mean(γ B_k A_k) − γ B̄ Ā folded into the base.",
    reference_weights="uniform",
)
