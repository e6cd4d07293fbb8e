"""FLoRA (Wang et al., arXiv 2409.05976): stacking, each round's update merged into the base.

Reference: ``ATP-1010/FederatedLLM``, ``fed_utils/model_aggregation.py`` ``FedAvg(stacking=
True)`` driven by ``main.py`` (commit 1b0cc9b). The server stacks A as concat_k(p_k A_k) and
B as concat_k(B_k), so the stacked product is Σ_k p_k B_k A_k, with p_k the clients' example
shares; it merges the stacked adapter into the base and the clients start the next round
from a new LoRA (A drawn afresh, B zero). Here the merge is the base change ΔW += Σ_k p_k
γ_k B_k A_k with each client's own γ_k inside (the reference's server scales the stack by
α·K/(r·K), the clients' α/r only when all ranks are equal: its issue #16), in the weight's
own orientation; it goes to the clients as the reference's does, as the stacked factors
(:mod:`sfedlora.federated.catchup`). Client ranks may differ: the sum needs no padding. The fresh A is one
seeded draw per round, shared by the round's clients (the reference's clients each draw
their own, as its process's RNG happens to run); ``federation.flora_reinit=initial`` starts
every round from the run's initial A instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..catchup import Change
from ..kinds import BASE, KINDS
from .method import Method, Replies, always
from .products import head_mean, layers, oriented, refuse_unsupported, stacked

if TYPE_CHECKING:
    from ...config import RunConfig


def fresh_lora_a(like: torch.Tensor, seed: int, round_: int, index: int) -> torch.Tensor:
    """A new LoRA A as PEFT initialises one (Kaiming-uniform with a = √5), drawn from a stream
    of the run's seed, the round and the layer, so every runtime draws the same."""
    g = torch.Generator().manual_seed(
        int(np.random.SeedSequence([seed, 7, round_, index]).generate_state(1)[0])
    )
    out = torch.empty(like.shape, dtype=torch.float32)
    torch.nn.init.kaiming_uniform_(out, a=math.sqrt(5), generator=g)
    return out.to(like.dtype)


@dataclass(frozen=True)
class FLoRA(Method):
    def aggregate(self, replies: Replies) -> dict[str, torch.Tensor | Change]:
        new = head_mean(replies)
        fresh = replies.cfg.federation.flora_reinit == "fresh"
        # The layers whose factors came up this round (none while a head probe runs).
        for i, (key, (a, b)) in enumerate(sorted(layers(replies.updates[0]).items())):
            new[key] = oriented(Change.of(*stacked(replies, a, b)), key, replies.transposed)
            new[b] = torch.zeros_like(replies.server[b])
            if fresh:
                new[a] = fresh_lora_a(replies.server[a], replies.cfg.seed, replies.round, i)
        return new

    def check(self, cfg: RunConfig) -> None:
        refuse_unsupported(cfg, self.name, mixed_ranks=True, changes_base=True)

    def base_change_rank(self, ranks: Sequence[int]) -> int:
        return sum(ranks)  # the stacked adapter


FLORA = FLoRA(
    "flora",
    frozenset({*KINDS, BASE}),
    always("A", "B", "head"),
    "FLoRA: Σ p_k γ_k B_k A_k (stacking) merged into the base every round; LoRA re-initialised.",
)
