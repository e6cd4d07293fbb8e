"""The base change on the wire: each round's change to it, the server's history of those
changes, and how a node that skipped rounds catches up.

A method that changes the base (FLoRA, FedEx-LoRA) makes, each round, a :class:`Change` to
each adapted layer's base weight: the stacked product U·diag(c)·V of the round's factors
(FLoRA: Σ p_k γ_k B_k A_k, rank ≤ Σ r_k; FedEx-LoRA: that minus γ B̄ Ā, rank ≤ Σ r_k + r),
kept as those factors where they are smaller than the d_out × d_in matrix, else as the
matrix. The server's ΔW is the fold of its rounds' changes, in round order, by :func:`fold`;
a node folds the same changes the same way, so both hold the same bits.

A node's download carries a :class:`CatchUp`: the changes of the rounds after the one whose
ΔW its node holds, or the whole ΔW where that is smaller (a node that missed many rounds, or
one the server knows nothing of). :class:`BaseHistory` is what the server keeps for it: the
round each client's node holds, and the changes some node may still need, never more than
the size of ΔW itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

from ..errors import SfedloraError

FACTORS = ("u", "c", "v")


def nbytes(tensors: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def change_bytes(d_out: int, d_in: int, rank: int) -> int:
    """What a change of ``rank`` to a d_out × d_in fp32 weight costs on the wire: its factors
    (fp32 U and V, float64 weights c) or the matrix, whichever is smaller."""
    return min(4 * rank * (d_out + d_in) + 8 * rank, 4 * d_out * d_in)


@dataclass(frozen=True)
class Change:
    """One round's change to one base weight, in the weight's orientation: ``parts`` is either
    ``{"dense": matrix}`` (fp32) or the factors ``{"u": U, "c": c, "v": V}`` of U·diag(c)·V
    (U and V fp32, c float64, so that the clients' factors and weights travel exactly)."""

    parts: dict[str, torch.Tensor]

    @classmethod
    def of(cls, u: torch.Tensor, c: torch.Tensor, v: torch.Tensor) -> Change:
        """U·diag(c)·V as the cheaper of its factors and its matrix."""
        if change_bytes(u.shape[0], v.shape[1], c.numel()) < 4 * u.shape[0] * v.shape[1]:
            return cls({"u": u.float().contiguous(), "c": c.double(), "v": v.float().contiguous()})
        return cls({"dense": product(u, c, v).float()})

    def value(self) -> torch.Tensor:
        """The change as a float64 matrix."""
        if "dense" in self.parts:
            return self.parts["dense"].double()
        return product(*(self.parts[p] for p in FACTORS))

    @property
    def T(self) -> Change:  # noqa: N802 (as torch's)
        """The change to a weight stored (in, out): GPT-2's Conv1D."""
        if "dense" in self.parts:
            return Change({"dense": self.parts["dense"].T.contiguous()})
        p = self.parts
        return Change({"u": p["v"].T.contiguous(), "c": p["c"], "v": p["u"].T.contiguous()})

    @property
    def nbytes(self) -> int:
        return nbytes(self.parts)


def product(u: torch.Tensor, c: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """U·diag(c)·V in float64."""
    return (u.double() * c.double()) @ v.double()


def fold(prior: torch.Tensor | None, change: Change) -> torch.Tensor:
    """ΔW after ``change``: the one formula of the server and every node (kept in fp32)."""
    return (change.value() if prior is None else prior.double() + change.value()).float()


@dataclass(frozen=True)
class CatchUp:
    """The base change as one download carries it: ΔW as of round ``upto``, either ``whole``
    (``since`` None) or as the ``steps`` (round, changes by weight) after round ``since``."""

    upto: int
    since: int | None = None
    whole: dict[str, torch.Tensor] = field(default_factory=dict)
    steps: tuple[tuple[int, dict[str, Change]], ...] = ()

    @property
    def nbytes(self) -> int:
        return nbytes(self.whole) + sum(c.nbytes for _, changes in self.steps for c in changes.values())

    def flat(self) -> dict[str, torch.Tensor]:
        """As name → tensor (a message's record): ``<round>/<part>/<weight>`` for a step."""
        steps = {f"{r}/{p}/{n}": t for r, ch in self.steps for n, c in ch.items() for p, t in c.parts.items()}
        return {**self.whole, **steps}

    @classmethod
    def from_flat(cls, upto: int, since: int | None, tensors: Mapping[str, torch.Tensor]) -> CatchUp:
        if since is None:
            return cls(upto, None, dict(tensors))
        steps: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
        for name, t in tensors.items():
            r, part, weight = name.split("/", 2)
            steps.setdefault(int(r), {}).setdefault(weight, {})[part] = t
        return cls(
            upto,
            since,
            steps=tuple((r, {n: Change(p) for n, p in steps[r].items()}) for r in sorted(steps)),
        )

    def onto(self, held: Mapping[str, torch.Tensor], round_: int | None) -> dict[str, torch.Tensor]:
        """ΔW as of round ``upto`` from ``held``, a node's ΔW as of round ``round_`` (None:
        it holds none). A node ahead of ``since`` skips the changes it already folded."""
        if self.since is None:
            return dict(self.whole)
        if round_ is None or not self.since <= round_ <= self.upto:
            had = "none" if round_ is None else f"that of round {round_}"
            raise SfedloraError(
                f"the server sent the base change's steps after round {self.since}, and this node holds "
                f"{had}: its state-dir was lost or belongs to another run; the server sends the whole "
                "base change next round"
            )
        out = dict(held)
        for r, changes in self.steps:
            if r > round_:
                out.update({n: fold(out.get(n), c) for n, c in changes.items()})
        return out


@dataclass
class BaseHistory:
    """The server's side of the catch-up: the round whose ΔW each client's node holds (as far
    as the server knows: it took a training download) and the changes of the rounds after
    ``start`` that some node may still need."""

    changes: dict[int, dict[str, Change]] = field(default_factory=dict)
    held: dict[int, int] = field(default_factory=dict)
    start: int = 0  # every change of a round after it is in ``changes``

    def catch_up(self, k: int, whole: Mapping[str, torch.Tensor], now: int) -> CatchUp:
        """What brings client ``k``'s node to ``whole``, the ΔW after round ``now``: the steps
        since the round it holds, or the whole where that is no larger."""
        since = self.held.get(k)
        if since is not None and since >= self.start:
            steps = CatchUp(
                now, since, steps=tuple((r, c) for r, c in sorted(self.changes.items()) if r > since)
            )
            if steps.nbytes < nbytes(whole) or not steps.steps:
                return steps
        return CatchUp(now, None, dict(whole))

    def add(self, round_: int, changes: Mapping[str, Change]) -> None:
        if changes:
            self.changes[round_] = dict(changes)

    def close(self, round_: int, asked: Iterable[int], took: Iterable[int], whole_bytes: int) -> None:
        """After round ``round_``: the clients that ``took`` its download hold ΔW as of the
        round before; of the others ``asked``, the server knows nothing now. The changes no
        node can need any more are dropped: those of rounds every known node holds, and the
        oldest while the kept ones are no smaller than ΔW (a node that far behind gets the whole)."""
        for k in asked:
            self.held.pop(k, None)
        self.held.update({k: round_ - 1 for k in took})
        floor = min(self.held.values(), default=round_)
        for r in sorted(self.changes):
            kept = sum(c.nbytes for ch in self.changes.values() for c in ch.values())
            if r > floor and kept < whole_bytes:
                break
            del self.changes[r]
            self.start = max(self.start, r)
        self.start = max(self.start, floor)

    def rejoin(self, k: int, held: object, now: int) -> None:
        """Client ``k``'s node says it holds ΔW as of round ``held`` (None: none): believed
        up to the server's round ``now``; beyond it (rounds a resumed server has not played
        again) its ΔW may differ, so it gets the whole, as it does where ``held`` is no round."""
        if not isinstance(held, int) or isinstance(held, bool) or not 0 <= held <= now:
            self.held.pop(k, None)
        else:
            self.held[k] = held

    def state_dict(self) -> dict:
        return {
            "start": self.start,
            "held": dict(self.held),
            "changes": {r: {n: c.parts for n, c in ch.items()} for r, ch in self.changes.items()},
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> BaseHistory:
        changes = {r: {n: Change(p) for n, p in ch.items()} for r, ch in state["changes"].items()}
        return cls(changes, dict(state["held"]), state["start"])
