"""FlexLoRA (Bai et al., arXiv 2402.11505): the clients' full updates averaged, then cut back
to each client's rank by SVD.

Reference: ``alibaba/FederatedScope`` branch ``FlexLoRA``, ``fed_utils/model_aggregation.py``
``FlexLoRA`` and ``fed_utils/adaptive_peft.py`` ``distribute_weight_fast``. The server forms
each layer's full update W = Σ_k p_k s_k B_k A_k (p_k: example shares; s_k: client k's
scaling, its own γ_k here), takes its SVD W = U Σ Vᵀ, and gives client k of rank r_k the
factors A = Vᵀ_{r_k} and B = U_{r_k} Σ_{r_k} / γ_k, so that γ_k B A is exactly W truncated to
rank r_k, singular values kept. The server holds A = Vᵀ_r and B = U_r Σ_r / γ at the global
model's rank and γ; a client's view is their first r_k rows and columns with B rescaled to its
own γ_k. The base weights never change.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..kinds import KINDS, select
from .method import Method, Replies, always
from .products import head_mean, layers, refuse_unsupported, weighted_product

if TYPE_CHECKING:
    from ...config import RunConfig
    from ..ranks import RankPlan


def svd_factors(update: torch.Tensor, rank: int, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of rank ``rank`` with γ B A the best rank-``rank`` approximation of ``update``:
    A = Vᵀ_r, B = U_r Σ_r / γ (zero rows and columns beyond the update's own rank)."""
    u, s, vh = torch.linalg.svd(update, full_matrices=False)
    k = min(rank, s.numel())
    a = update.new_zeros(rank, update.shape[1])
    b = update.new_zeros(update.shape[0], rank)
    a[:k] = vh[:k]
    b[:, :k] = u[:, :k] * (s[:k] / gamma)
    return a, b


@dataclass(frozen=True)
class FlexLoRA(Method):
    def aggregate(self, replies: Replies) -> dict[str, torch.Tensor]:
        new = head_mean(replies)
        gamma = replies.plan.layer_gamma(None)
        for _, (a, b) in layers(replies.updates[0]).items():
            full = replies.server[a].shape[0]
            new_a, new_b = svd_factors(weighted_product(replies, a, b), full, gamma)
            new[a], new[b] = new_a.to(replies.server[a].dtype), new_b.to(replies.server[b].dtype)
        return new

    def client_view(self, tensors: Mapping[str, torch.Tensor], k: int | None, plan: RankPlan) -> dict:
        view = super().client_view(tensors, k, plan)
        ratio = plan.layer_gamma(None) / plan.layer_gamma(k)
        if ratio != 1.0:  # B = U Σ / γ_k at client k's own γ
            view.update({n: t * ratio for n, t in select(view, frozenset({"B"})).items()})
        return view

    def check(self, cfg: RunConfig) -> None:
        refuse_unsupported(cfg, self.name, mixed_ranks=True)


FLEXLORA = FlexLoRA(
    "flexlora",
    frozenset(KINDS),
    always("A", "B", "head"),
    "FlexLoRA: W = Σ p_k γ_k B_k A_k, SVD; client k gets A = Vᵀ and B = U Σ / γ_k at its own rank.",
)
