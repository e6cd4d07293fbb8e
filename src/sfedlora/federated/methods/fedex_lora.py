"""FedEx-LoRA (Singhal et al., arXiv 2410.09432): exact aggregation, the averaging error
folded into the base weights.

Reference: ``CERT-Lab/fedex-lora``, ``fed_agg.py`` ``aggregate_models_ours`` (commit
2fa2e4a). The server averages A, B and the head (plainly, 1/K, as the reference does) and
adds to each layer's base weight the residual Σ_k p_k γ_k B_k A_k − γ B̄ Ā, so that the
global model W0 + ΔW + γ B̄ Ā is exactly the weighted mean of the clients' models. Two
departures from the reference, both corrections: each client's own γ_k inside the sum (the
same γ for all with one rank), and the residual in the base weight's own orientation (the
reference transposes it, which is right for GPT-2's Conv1D only). The residual is a full
d_out × d_in matrix per layer, so clients download the cumulative base change each round.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..kinds import BASE, KINDS
from .method import Method, Replies, always
from .products import added_to_base, layers, oriented, refuse_unsupported, weighted_product

if TYPE_CHECKING:
    from ...config import RunConfig


@dataclass(frozen=True)
class FedExLoRA(Method):
    def aggregate(self, replies: Replies) -> dict[str, torch.Tensor]:
        new = super().aggregate(replies)  # Ā, B̄ and the head: the weighted means
        gamma = replies.plan.layer_gamma(None)
        for key, (a, b) in layers(new).items():
            residual = weighted_product(replies, a, b) - gamma * (new[b].double() @ new[a].double())
            new[key] = added_to_base(replies.server, key, oriented(residual, key, replies.transposed))
        return new

    def check(self, cfg: RunConfig) -> None:
        # With mixed ranks client k runs the first r_k rows of Ā under its own γ_k: not the
        # global model the residual makes exact.
        refuse_unsupported(cfg, self.name, mixed_ranks=False, changes_base=True)


FEDEX_LORA = FedExLoRA(
    "fedex-lora",
    frozenset({*KINDS, BASE}),
    always("A", "B", "head"),
    "FedEx-LoRA: A, B and head averaged; the residual mean(γ B_k A_k) − γ B̄ Ā folded into the base.",
    reference_weights="uniform",
)
