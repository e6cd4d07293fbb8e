"""Clients with different LoRA ranks, and the scaling that follows them.

The server keeps every LoRA A at r_max = ``lora.rank`` rows (and B, where the method
averages it, at r_max columns). Client k has rank r_k ≤ r_max: it holds the first r_k
rows of each A and the first r_k columns of each B, receives only those, and sends only
those. A client's adapter is therefore a true rank-r_k LoRA adapter (it saves and loads
with PEFT at r = r_k); the one base model of the embedded runtime runs it at r_max with
the rows and columns beyond r_k set to zero, which gives the same output and exactly zero
gradients there (each padded row of A meets a zero column of B, and vice versa).

Aggregation is row-wise: row j of A (column j of B) is the weighted mean over the clients
that hold it (r_k > j), and a row no replying client holds keeps its value. That is
zero-padding each update to r_max and dividing every row by the weight of its holders,
not by all clients' weight (which would shrink the rows few clients hold towards zero).

Scaling per client: the rule at the client's own rank and holder count, α·n_k^a/r_k^b
(``lora`` α/r_k, ``rslora`` α/√r_k, ``sfed`` α·√(n_k/r_k)), where n_k is
the number of sampled clients holding all of client k's rows (those with r_j ≥ r_k). The
paper's argument for √N is that the mean of n independent copies of an update is √n
smaller than one copy; client k's rows are averaged over at least n_k copies (its last
row over exactly n_k, its first rows over more), so √n_k restores the size of the
least-shared of them without over-amplifying any. With everyone sampled, n_k counts the
clients with r_j ≥ r_k; with partial participation it is the expected count in a round
in which k takes part, 1 + (N − 1)(m_k − 1)/(n − 1) (m_k: clients with r_j ≥ r_k, n: the
federation), so that γ_k, like the uniform γ, is fixed for the whole run: client k's own
B was trained under γ_k, and a γ that changed from round to round would rescale it.
With one rank for all, n_k = N and γ_k is the uniform α·√(N/r).
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..lora.base import set_base_change
from ..lora.dual import GLOBAL, GLOBAL_ONLY, Mix, set_mix
from ..lora.models import write_tensors
from ..lora.scaling import check_realised, gamma
from ..peft import config_gamma, lora_config
from .kinds import aggregate, common_names, split_base, tensor_kind

# The rank dimension of each kind of LoRA tensor: A is (r × d_in), B is (d_out × r).
RANK_AXIS = {"A": 0, "B": 1, "personal_A": 0, "personal_B": 1}


def rank_axis(name: str) -> int | None:
    """The dimension of ``name`` that runs over LoRA rank, or None for a head tensor."""
    return RANK_AXIS.get(tensor_kind(name))


def assign_ranks(listed: Sequence[int] | None, n_clients: int, rank: int) -> tuple[int, ...]:
    """r_k of every client: ``listed`` cycled over the clients, or ``rank`` for all."""
    if listed is None:
        return (rank,) * n_clients
    return tuple(int(listed[k % len(listed)]) for k in range(n_clients))


def holders(ranks: Sequence[int], n_sampled: int) -> tuple[float, ...]:
    """n_k: how many of a round's sampled clients hold all of client k's rows.

    The expected number in a round in which k is sampled: k itself plus its share of the
    other N − 1, 1 + (N − 1)(m_k − 1)/(n − 1), with m_k the clients with r_j ≥ r_k. With
    everyone sampled (N = n) that is exactly m_k.
    """
    n = len(ranks)
    return tuple(1.0 + (n_sampled - 1) * (sum(1 for s in ranks if s >= r) - 1) / max(1, n - 1) for r in ranks)


def truncate(tensors: Mapping[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """The rank-``rank`` part of an adapter: the first rows of each A, columns of each B."""
    out = {}
    for name, t in tensors.items():
        axis = rank_axis(name)
        out[name] = t if axis is None or t.shape[axis] <= rank else t.narrow(axis, 0, rank).clone()
    return out


def pad(tensors: Mapping[str, torch.Tensor], full: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` widened with zeros to the shapes of ``full`` along the rank dimension."""
    out = {}
    for name, t in tensors.items():
        if t.shape == full[name].shape:
            out[name] = t
            continue
        axis = rank_axis(name)
        out[name] = t.new_zeros(full[name].shape)
        out[name].narrow(axis, 0, t.shape[axis]).copy_(t)
    return out


def aggregate_rows(
    updates: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    ranks: Sequence[int],
    current: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Weighted mean of client updates of different ranks, row by row.

    Update i holds the first ``ranks[i]`` rows of each A (columns of each B). Row j is
    averaged over the updates that hold it, with their weights; rows no update holds keep
    their value in ``current`` (the server's tensors, at full rank). Head tensors are
    averaged over all updates. Rows between two consecutive distinct ranks share their
    holders, so each such block is one call of :func:`kinds.aggregate`; with a single
    rank this is exactly :func:`kinds.aggregate`.
    """
    if len(ranks) != len(updates):
        raise ValueError(f"{len(updates)} updates but {len(ranks)} ranks")
    names = common_names(updates)
    lora = [n for n in names if rank_axis(n) is not None]
    heads = [n for n in names if rank_axis(n) is None]
    out = aggregate([{n: u[n] for n in heads} for u in updates], weights) if heads else {}
    pieces: dict[str, list[torch.Tensor]] = {n: [] for n in lora}
    low = 0
    for high in sorted(set(ranks)):
        held = [i for i, r in enumerate(ranks) if r >= high]
        block = (
            aggregate(
                [{n: updates[i][n].narrow(rank_axis(n), low, high - low) for n in lora} for i in held],
                [weights[i] for i in held],
            )
            if lora
            else {}
        )
        for n, t in block.items():
            pieces[n].append(t)
        low = high
    for n in lora:
        axis, full = rank_axis(n), current[n].shape[rank_axis(n)]
        if low < full:  # rows no replying client holds
            pieces[n].append(current[n].narrow(axis, low, full - low))
        out[n] = pieces[n][0] if len(pieces[n]) == 1 else torch.cat(pieces[n], axis)
    return out


@dataclass(frozen=True)
class RankPlan:
    """Every client's rank, holder count and γ, derived from the config.

    This is the one road from a scaling rule to a LoRA layer: :meth:`peft_kwargs` gives the
    PEFT settings of client ``k`` (None: the global model), from which the γ written into the
    shared model's layers (:meth:`use`) and the adapter config saved with its weights
    (:meth:`save`) both follow; :meth:`build` checks that each realises the rule's γ.
    ``mixed`` is False when ``lora.client_ranks`` is unset: then no tensor is cut or padded.
    """

    rule: str
    alpha: float
    full: int  # r_max = lora.rank: rows of the server's A
    ranks: tuple[int, ...]  # r_k of client k
    holders: tuple[float, ...]  # n_k of client k: the updates its rows are averaged over
    mixed: bool

    @classmethod
    def build(
        cls, rule: str, alpha: float, rank: int, listed: Sequence[int] | None, n_clients: int, n_sampled: int
    ) -> RankPlan:
        if listed is None:
            plan = cls(rule, alpha, rank, (rank,) * n_clients, (n_sampled,) * n_clients, False)
        else:
            ranks = assign_ranks(listed, n_clients, rank)
            plan = cls(rule, alpha, rank, ranks, holders(ranks, n_sampled), True)
        for k in {plan.ranks.index(r) for r in set(plan.ranks)}:
            check_realised(rule, alpha, plan.ranks[k], plan.holders[k], plan.layer_gamma(k))
        return plan

    # Derived once: every round's record reads a γ per sampled client.
    @functools.cached_property
    def top(self) -> int:
        """The client whose γ the global model runs with: one of the highest rank."""
        return max(range(len(self.ranks)), key=lambda k: self.ranks[k])

    @functools.cached_property
    def _gammas(self) -> tuple[float, ...]:
        return tuple(gamma(self.rule, self.alpha, r, n) for r, n in zip(self.ranks, self.holders))

    @property
    def global_rank(self) -> int:
        """The rank of the global model: rows beyond the highest client rank never train."""
        return max(self.ranks)

    def rank_of(self, k: int | None) -> int:
        return self.global_rank if k is None else self.ranks[k]

    def lora_config(self, k: int | None):
        """The ``LoraConfig`` of client ``k`` (None: the global model) at its rank: its scaling is
        what the layers run with (:meth:`use`) and what its saved adapter loads with (:meth:`save`)."""
        k = self.top if k is None else k
        return lora_config(self.ranks[k], self.alpha, self.holders[k], self.rule)

    def gamma(self, k: int | None = None) -> float:
        """γ_k of client ``k``, the rule at its own rank and holder count n_k (None: the global
        model's): the one way to read γ."""
        return self._gammas[self.top if k is None else k]

    def layer_gamma(self, k: int | None) -> float:
        """The γ PEFT computes from :meth:`lora_config` (equal to :meth:`gamma` up to float
        rounding, checked at :meth:`build`): what the layers are written with, not for reading."""
        return self._layer_gammas[self.top if k is None else k]

    @functools.cached_property
    def _layer_gammas(self) -> tuple[float, ...]:
        # Read on every client's turn: the LoraConfig of each client built once.
        return tuple(config_gamma(self.lora_config(k)) for k in range(len(self.ranks)))

    def view(self, tensors: Mapping[str, torch.Tensor], k: int | None) -> dict[str, torch.Tensor]:
        """What client ``k`` (None: the global model) holds of full-rank ``tensors``."""
        return truncate(tensors, self.rank_of(k)) if self.mixed else dict(tensors)

    def aggregate(
        self,
        updates: Sequence[Mapping[str, torch.Tensor]],
        weights: Sequence[float],
        clients: Sequence[int],
        current: Mapping[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """The server's new tensors from the updates of ``clients`` (row-wise when mixed)."""
        if not self.mixed:
            return aggregate(updates, weights)
        return aggregate_rows(updates, weights, [self.ranks[k] for k in clients], current)

    def use(self, model: torch.nn.Module, k: int | None, mix: Mix = GLOBAL_ONLY) -> None:
        """Give the shared model client ``k``'s γ (None: the global model's) before it runs, and
        combine its adapters as ``mix`` says (a model with one adapter: γ alone)."""
        set_mix(model, self.layer_gamma(k), mix)

    def load(
        self,
        model: torch.nn.Module,
        params: Mapping[str, torch.nn.Parameter],
        tensors: Mapping[str, torch.Tensor],
        k: int | None,
        mix: Mix = GLOBAL_ONLY,
    ) -> None:
        """Write client ``k``'s adapter (at its rank) into the shared full-rank model, under
        ``mix``, and set its base weights to the base change among ``tensors`` (none: the original)."""
        adapter, base = split_base(tensors)
        self.use(model, k, mix)
        set_base_change(model, base)
        write_tensors(params, pad(adapter, params))

    def record(self, clients: Sequence[int]) -> dict:
        """Per-round metrics: the rank and γ of each sampled client (in ``clients`` order)."""
        if not self.mixed:
            return {}
        return {
            "client_ranks": [self.ranks[k] for k in clients],
            "client_gammas": [self.gamma(k) for k in clients],
        }

    def summary(self) -> dict:
        return {"client_ranks": list(self.ranks), "client_gammas": list(self._gammas)} if self.mixed else {}

    def save(
        self,
        model: torch.nn.Module,
        params: Mapping[str, torch.nn.Parameter],
        tensors: Mapping[str, torch.Tensor],
        k: int | None,
        path: Path,
        mix: Mix = GLOBAL_ONLY,
    ) -> Path:
        """Save client ``k``'s adapter (None: the global one) in PEFT format at its own rank: the
        adapters of ``mix``, each with its weight folded into its ``lora_alpha`` (a second
        adapter in a folder of its name, where PEFT puts it), so PEFT computes the mix."""
        self.load(model, params, tensors, k, mix)
        weights = mix.weights()
        model.save_pretrained(path, selected_adapters=list(weights))
        for name, weight in weights.items():
            config = copy.copy(self.lora_config(k))
            config.lora_alpha *= weight
            write_adapter_scaling(path if name == GLOBAL else path / name, config)
        return path


def write_adapter_scaling(path: Path, config) -> None:
    """Make a saved PEFT adapter one of the rank and scaling of ``config`` (a ``LoraConfig``).

    The shared model saves at r_max; a client's adapter is its first ``config.r`` rows of A and
    columns of B, and its config says that rank with the client's own lora_alpha, so that PEFT
    computes exactly this client's γ when it loads it.
    """
    from safetensors.torch import load_file, save_file

    rank = config.r
    weights = Path(path) / "adapter_model.safetensors"
    state = load_file(weights)
    if any(rank_axis(n) is not None and t.shape[rank_axis(n)] > rank for n, t in state.items()):
        cut = {n: truncate({n: t}, rank)[n].contiguous() for n, t in state.items()}
        save_file(cut, weights, metadata={"format": "pt"})
    config_path = Path(path) / "adapter_config.json"
    saved = json.loads(config_path.read_text())
    saved.update({key: getattr(config, key) for key in ("r", "lora_alpha", "use_rslora")})
    config_path.write_text(json.dumps(saved, indent=2, sort_keys=True))
