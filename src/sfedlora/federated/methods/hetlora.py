"""HetLoRA (Cho et al., arXiv 2401.06432): heterogeneous ranks by zero-padding, aggregation
weighted by the size of each client's update.

No official code; from the paper. Client k of rank r_k trains the first r_k rows of the
global A and columns of B (its truncation); the server zero-pads every update to the largest
rank and averages it with weight ‖γ_k B_k A_k‖_F (its "sparsity-weighted aggregation"),
layer by layer, so a client whose update is near zero weighs little. Unlike the row-wise mean
of the other methods (each row over the clients that hold it), a row few clients hold is
shrunk towards zero by the padding of the others: that is HetLoRA's own choice. The head is
averaged by ``federation.client_weights``. The paper's local rank self-pruning (a
regulariser on the highest-rank part, which a client then drops) is not implemented.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..kinds import KINDS, aggregate
from ..ranks import pad
from .method import Method, Replies, always
from .products import head_mean, layers, refuse_unsupported

if TYPE_CHECKING:
    from ...config import RunConfig


def norm_weights(replies: Replies, a: str, b: str) -> list[float]:
    """Each client's ‖γ_k B_k A_k‖_F over their sum (its example share where all are zero)."""
    norms = [
        float(torch.linalg.matrix_norm(replies.plan.layer_gamma(k) * (u[b].double() @ u[a].double())))
        for k, u in zip(replies.clients, replies.updates)
    ]
    total = sum(norms)
    return [n / total for n in norms] if total > 0 else replies.shares


@dataclass(frozen=True)
class HetLoRA(Method):
    def aggregate(self, replies: Replies) -> dict[str, torch.Tensor]:
        new = head_mean(replies)
        for _, (a, b) in layers(replies.updates[0]).items():
            full = {a: replies.server[a], b: replies.server[b]}
            padded = [pad({a: u[a], b: u[b]}, full) for u in replies.updates]
            new.update(aggregate(padded, norm_weights(replies, a, b)))
        return new

    def check(self, cfg: RunConfig) -> None:
        refuse_unsupported(cfg, self.name, mixed_ranks=True)


HETLORA = HetLoRA(
    "hetlora",
    frozenset(KINDS),
    always("A", "B", "head"),
    "HetLoRA: updates zero-padded to the largest rank, averaged by ‖γ_k B_k A_k‖_F, cut to each rank.",
)
