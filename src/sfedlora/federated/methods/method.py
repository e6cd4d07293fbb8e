"""The method interface: what a federated LoRA method decides, on each side of a round.

A method is a policy over the kinds of tensor (:mod:`sfedlora.federated.kinds`): for a
round, which kinds the clients *train* and which are *global* (downloaded from the server
at the start of the round, overwriting the client's copy; a trained global kind is
uploaded). So FedSA-LoRA's B never leaves the client, and FFA-LoRA's A never moves.

On the server, :meth:`Method.aggregate` is the method's aggregation function: from the
round's accepted replies (each client's upload at its own rank r_k, its example count,
its γ_k through the rank plan) it computes the server's new tensors, which may include the
round's change to the frozen base weights (kind ``base``: a
:class:`sfedlora.federated.catchup.Change`, which the server folds into its ΔW). The default is the
row-wise weighted mean of :meth:`sfedlora.federated.ranks.RankPlan.aggregate`; a method
with its own server math subclasses :class:`Method` (one module per method) and overrides
it. :meth:`Method.check` refuses the settings a method cannot run.

On the client, :meth:`Method.phases` is a round's local training: by default one phase that
trains the round's kinds; a method with a second, personal adapter (FedDPA) trains in several
phases, each with its own kinds and its own :class:`~sfedlora.lora.dual.Mix` of the adapters.
:meth:`Method.mix` is how a client's (or the global) model combines them when it is scored.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from ...lora.dual import GLOBAL_ONLY, Mix
from ..kinds import select

if TYPE_CHECKING:
    from ...config import RunConfig
    from ..catchup import Change
    from ..ranks import RankPlan


@dataclass(frozen=True)
class Replies:
    """What the server aggregates in a round: the accepted replies, in client order."""

    round: int  # 1-based
    clients: Sequence[int]
    updates: Sequence[Mapping[str, torch.Tensor]]  # client k's upload, at its own rank r_k
    weights: Sequence[float]  # each client's weight (federation.client_weights: examples or 1)
    plan: RankPlan  # r_k and γ_k of every client (plan.ranks[k], plan.layer_gamma(k))
    server: Mapping[str, torch.Tensor]  # the server's tensors before the round (full rank)
    cfg: RunConfig  # the run's settings: its seed, a method's own options
    transposed: frozenset[str] = frozenset()  # base weights stored (in, out): GPT-2's Conv1D

    @property
    def shares(self) -> list[float]:
        """p_k: each reply's weight over their sum."""
        total = float(sum(self.weights))
        return [w / total for w in self.weights]


@dataclass(frozen=True)
class Phase:
    """Part of a client's local training in a round: the kinds it trains, the adapters' mix."""

    trained: frozenset[str]
    mix: Mix = GLOBAL_ONLY


@dataclass(frozen=True)
class Method:
    """One federated method: what is global, what is trained in round ``t`` (1-based), and
    how the server aggregates."""

    name: str
    global_kinds: frozenset[str]
    trained_kinds: Callable[[int], frozenset[str]]
    description: str
    # How the reference code weighs clients in the server's mean: "examples" or "uniform".
    reference_weights: str = "examples"
    # Rounds of linear probing first: only the head trains; afterwards it stays frozen, so
    # what the adapter learns is not blurred by a head that keeps learning too.
    probe_rounds: int = 0
    # Whether the shared model carries a second adapter, kept on every client (FedDPA).
    personal_adapter: bool = False

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

    def client_view(self, tensors: Mapping[str, torch.Tensor], k: int | None, plan: RankPlan) -> dict:
        """What client ``k`` (None: the global model) holds of the server's full-rank ``tensors``:
        by default their first r_k rows of A and columns of B."""
        return plan.view(tensors, k)

    def aggregate(self, replies: Replies) -> dict[str, torch.Tensor | Change]:
        """The server's new tensors (those that change) from the round's accepted replies:
        by default their weighted mean, row by row where client ranks differ. A base weight's
        entry is the round's change to it."""
        return replies.plan.aggregate(replies.updates, replies.weights, replies.clients, replies.server)

    def check(self, cfg: RunConfig) -> None:
        """Refuse, in one line naming the setting, a config this method cannot run."""

    def base_change_rank(self, ranks: Sequence[int]) -> int:
        """The rank of a round's change to the base weights from replies at ``ranks`` (0: the
        method never changes the base)."""
        return 0

    def phases(self, round_: int, cfg: RunConfig) -> list[Phase]:
        """A client's local training in round ``round_``, phase after phase."""
        return [Phase(self.trained(round_))]

    def most_phases(self, cfg: RunConfig) -> int:
        """The most phases of any round (what a round's DP-SGD steps are counted by)."""
        return max(len(self.phases(t, cfg)) for t in range(1, self.probe_rounds + 3))

    def mix(self, k: int | None, cfg: RunConfig) -> Mix:
        """How the model of client ``k`` (None: the global model) combines its adapters."""
        return GLOBAL_ONLY

    def ever_trained(self) -> frozenset[str]:
        # Policies are periodic with period at most 2 (RoLoRA) once probing is over.
        return frozenset().union(*(self.trained(t) for t in range(1, self.probe_rounds + 3)))

    def has_local_state(self) -> bool:
        """True when some trained tensor stays on the client, so personalised models differ."""
        return bool(self.ever_trained() - self.global_kinds)

    def has_global_model(self) -> bool:
        """True when the global tensors alone make a model worth scoring: where nothing trained
        stays on the clients, or where what stays is an adapter of its own (FedDPA's)."""
        return self.personal_adapter or not self.has_local_state()

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


def always(*kinds: str) -> Callable[[int], frozenset[str]]:
    """A policy that trains ``kinds`` in every round."""
    fixed = frozenset(kinds)
    return lambda round_: fixed
