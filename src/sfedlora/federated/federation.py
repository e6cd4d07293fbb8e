"""The federation's state. :class:`ServerState` is what a run's server holds in every runtime
(the shared model, the global tensors, the run's random streams); :class:`Federation` adds
every client's data and state, as the embedded runtime holds them; :class:`Node` is what one
Flower SuperNode holds. Built once from the config; mutated by the server step
(:func:`sfedlora.federated.server.conclude_round`) and saved by :mod:`sfedlora.driver.checkpoint`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from ..config import RunConfig
from ..data import TaskData
from ..privacy import PrivacyPlan
from .catchup import BaseHistory, CatchUp, Change, fold, nbytes
from .client import ClientState, new_client_state, offload_state
from .kinds import BASE, split_base
from .methods import select
from .pruning import held_rank, pruning_of
from .ranks import truncate
from .shared import (
    ClientSpec,
    Shared,
    build_shared,
    client_dp,
    client_models_differ,
    client_parts,
    privacy_plan,
    split_clients,
    split_test,
)


def client_seed(cfg: RunConfig, k: int) -> int:
    """The seed of client ``k``'s own random stream (batch order, dropout)."""
    return cfg.seed * 100_003 + k + 1


@dataclass(kw_only=True)
class ServerState(Shared):
    """What a run's server holds in every runtime: the shared parts, the global tensors and the
    run's random streams, each client's size and label histogram, never a client's state."""

    server: dict[str, torch.Tensor]  # latest aggregate of every global tensor
    client_sizes: np.ndarray  # each client's example count: its weight in the mean
    histograms: np.ndarray  # per client: label counts (classification), else its size
    sampler: np.random.Generator  # which clients take part in each round
    fault_rng: np.random.Generator  # injected faults (drop-outs, bad updates), apart from sampling
    round: int = 0  # rounds completed
    privacy: PrivacyPlan | None = None  # the DP mechanism (None without DP)
    dp_ledger: np.ndarray | None = (
        None  # DP steps (dp=client) or releases (dp=server) each client is charged for
    )
    dp_rng: np.random.Generator | None = None  # the server's DP noise (dp=server)
    base_history: BaseHistory = field(default_factory=BaseHistory)  # for the nodes' catch-up
    # HetLoRA's self-pruning: client → the rank of its last accepted reply, where below its own
    pruned: dict[int, int] = field(default_factory=dict)

    @property
    def n_clients(self) -> int:
        return len(self.client_sizes)

    def download(self, k: int) -> dict[str, torch.Tensor]:
        """What the server sends client ``k``: the global tensors, cut to the client's rank (the
        rank it last replied at, once it pruned)."""
        view = self.method.client_view(self.method.download(self.server), k, self.ranks)
        return truncate(view, self.pruned[k]) if k in self.pruned else view

    def wire(self, k: int) -> tuple[dict[str, torch.Tensor], CatchUp | None]:
        """What client ``k``'s download carries over a wire: the global adapter tensors at its
        rank, and the base change as its node catches up on it (None: the method never changes
        the base)."""
        adapter, base = split_base(self.download(k))
        if BASE not in self.method.global_kinds:
            return adapter, None
        return adapter, self.base_history.catch_up(k, base, self.round)

    def take(self, round_: int, new: Mapping[str, torch.Tensor | Change]) -> None:
        """The server's ``new`` tensors of round ``round_``; a change to a base weight is folded
        into ΔW and kept for the nodes that have yet to catch up on it."""
        changes = {n: c for n, c in new.items() if isinstance(c, Change)}
        self.server.update({n: fold(self.server.get(n), c) if n in changes else c for n, c in new.items()})
        self.base_history.add(round_, changes)

    def close_round(self, round_: int, asked: list[int], took: list[int]) -> None:
        """The round's download reached the clients that ``took`` it (they replied)."""
        self.base_history.close(round_, asked, took, nbytes(split_base(self.server)[1]))

    def personal(self, own: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
        """Client ``k``'s model: its ``own`` tensors with the server's global ones on top, as
        the client sees them (at its rank)."""
        return {**own, **self.at_rank_of(self.method.client_view(self.server, k, self.ranks), k, own)}

    def reply_view(self, tensors: dict[str, torch.Tensor], k: int) -> Callable[[Mapping], dict]:
        """What client ``k``'s reply must hold of ``tensors``, as a function of the reply:
        :meth:`at_rank_of` its rank view."""
        return lambda sent: self.at_rank_of(self.ranks.view(tensors, k), k, sent)

    def at_rank_of(self, view: dict, k: int, update) -> dict:
        """Client ``k``'s ``view`` of server tensors cut to the rank ``update`` holds, where
        HetLoRA's self-pruning lets clients shrink their rank (to no less than
        ``federation.hetlora_min_rank``); else ``view`` itself, which a reply of another rank
        then fails to match. The reply says the rank: the server keeps no record of it."""
        rule = pruning_of(self.cfg)
        held = None if rule is None else held_rank(update)
        if held is None or not rule.min_rank <= held < self.ranks.rank_of(k):
            return view
        return truncate(view, held)

    def heard(self, k: int, update: Mapping) -> None:
        """Client ``k``'s accepted reply: where it is cut below the client's rank (it pruned), the
        rank its downloads are sent at from now on."""
        held = held_rank(update) if pruning_of(self.cfg) is not None else None
        if held is not None and held < self.ranks.rank_of(k):
            self.pruned[k] = held

    def served_tensors(self, k: int) -> dict[str, torch.Tensor]:
        """Client ``k``'s model as the server alone knows it: the initial adapter with the
        global tensors on top, at the client's rank (its model, where it keeps nothing local)."""
        return self.personal(self.ranks.view(self.initial, k), k)

    def client_models_differ(self) -> bool:
        return client_models_differ(self.cfg)

    def global_tensors(self) -> dict[str, torch.Tensor]:
        return {**self.initial, **self.server}

    @functools.cached_property
    def evaluated_clients(self) -> list[int]:
        """The clients whose personalised models are scored: every client, or ``eval.clients``
        of them drawn once from the seed (its own stream, so sampling and faults are unchanged)."""
        n, k = self.n_clients, self.cfg.eval.clients
        if k is None or k >= n:
            return list(range(n))
        return sorted(int(i) for i in np.random.default_rng([self.cfg.seed, 4]).choice(n, k, replace=False))

    def state_dict(self) -> dict:
        """The server's mutable state, for a checkpoint (:mod:`sfedlora.driver.checkpoint`)."""
        return {
            "round": self.round,
            "server": self.server,
            "sampler": self.sampler.bit_generator.state,
            "fault_rng": self.fault_rng.bit_generator.state,
            "dp_ledger": torch.from_numpy(self.dp_ledger),
            "dp_rng": self.dp_rng.bit_generator.state,
            # Nodes with their own data report their sizes, which later rounds weight by.
            "client_sizes": torch.from_numpy(self.client_sizes),
            "base_history": self.base_history.state_dict(),
            "pruned": dict(self.pruned),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` saved (its shape checked by the caller)."""
        self.round = state["round"]
        self.server = self.compute.offload(state["server"])
        self.sampler.bit_generator.state = state["sampler"]
        self.fault_rng.bit_generator.state = state["fault_rng"]
        if "dp_ledger" in state:  # checkpoints from before DP have neither
            self.dp_ledger = state["dp_ledger"].cpu().numpy()
            self.dp_rng.bit_generator.state = state["dp_rng"]
        # Checkpoints from before Flower resume have no sizes: the config's are theirs.
        if "client_sizes" in state:
            self.client_sizes = state["client_sizes"].cpu().numpy()
        # Checkpoints from before the catch-up: every node gets the whole base change once.
        self.base_history = BaseHistory.from_state_dict(state.get("base_history", BaseHistory().state_dict()))
        self.pruned = dict(state.get("pruned", {}))


@dataclass(kw_only=True)
class Federation(ServerState):
    """Everything the embedded runtime holds: the server's state and every client's."""

    clients: list[ClientState]
    client_data: list  # each client's training data, encoded by the task
    client_tests: list | None = None  # each client's own test share (eval.client_test_fraction), encoded

    def client(self, k: int) -> ClientSpec:
        return ClientSpec(
            k, self.client_data[k], int(self.client_sizes[k]), client_dp(self.cfg, self.privacy, k)
        )

    def personal_tensors(self, k: int) -> dict[str, torch.Tensor]:
        """Client ``k``'s model from the state this process holds for it."""
        return self.personal(self.clients[k].tensors, k)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "clients": [c.state_dict() for c in self.clients]}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.clients = [offload_state(ClientState.from_state_dict(c), self.compute) for c in state["clients"]]


def server_parts(cfg: RunConfig, shared: Shared, labels: np.ndarray, parts: list[np.ndarray]) -> dict:
    """The server's side of a new run: the initial global tensors, sizes, histograms, streams."""
    sizes = np.array([len(p) for p in parts])
    # With secure_noise the server's noise is seeded by the OS, so the config cannot replay it.
    dp_rng = np.random.default_rng(None if cfg.privacy.secure_noise else [cfg.seed, 3])
    return dict(
        **vars(shared),
        # On a GPU run the server's tensors live with the clients' updates, in host memory.
        server=shared.compute.offload(select(shared.initial, shared.method.global_kinds)),
        client_sizes=sizes,
        histograms=shared.task.histograms(labels, parts),
        sampler=np.random.default_rng([cfg.seed, 1]),
        fault_rng=np.random.default_rng([cfg.seed, 2]),
        privacy=privacy_plan(cfg, sizes),
        dp_ledger=np.zeros(len(parts), dtype=np.int64),
        dp_rng=dp_rng,
    )


def build_server(cfg: RunConfig, data: TaskData) -> ServerState:
    """The server of ``cfg`` on ``data``, for a runtime whose clients live elsewhere (Flower):
    no client's data is encoded and no client's state is built."""
    shared = build_shared(cfg, data)
    return ServerState(**server_parts(cfg, shared, data.train.labels, split_clients(cfg, data.train.labels)))


def build_federation(cfg: RunConfig, data: TaskData) -> Federation:
    """The federation of ``cfg`` on ``data``: one shared model, every client's data and state."""
    shared = build_shared(cfg, data)
    parts, tests = zip(*client_parts(cfg, data.train.labels))
    train = shared.task.encode(data.train, shared.tokenizer, cfg.model.max_length, "training")
    return Federation(
        **server_parts(cfg, shared, data.train.labels, list(parts)),
        clients=[
            offload_state(
                new_client_state(shared.ranks.view(shared.initial, k), client_seed(cfg, k)), shared.compute
            )
            for k in range(cfg.federation.n_clients)
        ],
        client_data=[train.subset(p) for p in parts],
        client_tests=[train.subset(t) for t in tests] if cfg.eval.client_test_fraction else None,
    )


@dataclass
class Node:
    """What one Flower SuperNode holds: the shared parts and its own client, nothing of the others."""

    shared: Shared
    client: ClientSpec
    histogram: np.ndarray  # its training data's label counts (its size, without classes)
    fresh: ClientState  # its state before its first round


def build_node(cfg: RunConfig, data: TaskData, k: int, local: bool = False) -> Node:
    """Client ``k`` of ``cfg``: only its own partition is encoded, only its state is built,
    so a node's memory and start-up do not grow with the number of clients. With ``local``,
    ``data`` is the node's own (all of it is the client's), not the run's whole dataset."""
    shared = build_shared(cfg, data)
    part = (
        split_test(cfg, np.arange(len(data.train)), k)[0]
        if local
        else split_clients(cfg, data.train.labels)[k]
    )
    train = shared.task.encode(data.train.subset(part), shared.tokenizer, cfg.model.max_length, "training")
    sizes = np.array([len(part)])
    return Node(
        shared=shared,
        client=ClientSpec(k, train, len(part), client_dp(cfg, privacy_plan(cfg, sizes), 0)),
        histogram=shared.task.histograms(data.train.labels, [part])[0],
        fresh=new_client_state(shared.ranks.view(shared.initial, k), client_seed(cfg, k)),
    )
