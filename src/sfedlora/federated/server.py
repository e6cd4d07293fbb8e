"""The server side of a round, shared by every runtime: sampling, checks, aggregation, the record.

A runtime collects what its clients sent into an :class:`Inbox`; :func:`conclude_round`
refuses malformed, non-finite and (optionally) outlying replies, averages the rest into
the federation's global tensors and returns the round's metrics record.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..lora.base import transposed_weights
from ..privacy import user_level_mean
from .catchup import CatchUp, nbytes
from .client import ClientResult
from .federation import ServerState
from .methods import Replies
from .robust import change_norm, check_update, norm_outliers

log = logging.getLogger("sfedlora")


def _mean_of(results: list[ClientResult], kind: str) -> float | None:
    values = [r.grad_norm[kind] for r in results if kind in r.grad_norm]
    return float(np.mean(values)) if values else None


def client_stats(results: list[tuple[int, ClientResult]]) -> list[dict]:
    """Each trained client's loss and gradient norms, for per-client curves; JSON's null
    where a value is not finite (a gradient that overflowed)."""

    def finite(v: float) -> float | None:
        return v if math.isfinite(v) else None

    return [
        {
            "client": k,
            "train_loss": finite(r.loss),
            **{f"grad_norm_{kind}": finite(v) for kind, v in r.grad_norm.items()},
        }
        for k, r in results
    ]


DIVERGED = "non-finite training loss; client state restored"


@dataclass
class Inbox:
    """What reached the server in one round, in client order, before its checks."""

    clients: list[int]  # the sampled clients
    results: list[tuple[int, ClientResult]] = field(default_factory=list)  # clients that trained
    updates: list[tuple[int, dict[str, torch.Tensor]]] = field(default_factory=list)  # replies to check
    dropped: list[int] = field(default_factory=list)  # no reply
    rejected: list[dict] = field(default_factory=list)  # refused before the checks, with a reason
    injected: list[dict] = field(default_factory=list)
    sizes: dict[int, int] = field(default_factory=dict)  # example counts the clients reported
    took: list[int] = field(default_factory=list)  # clients that replied: they took the download
    bytes_up: int = 0
    bytes_down: int = 0
    # SecAgg+: the server never sees an update, only the new tensors the securely summed
    # mean gives, and the clients in that mean.
    secure: tuple[dict[str, torch.Tensor], list[int]] | None = None

    def sent(self, download: dict[str, torch.Tensor], catch: CatchUp | None = None) -> None:
        """A download of these tensors and, where the method changes the base, this catch-up on it."""
        self.bytes_down += nbytes(download) + (catch.nbytes if catch is not None else 0)

    def receive(self, k: int, result: ClientResult | None, update: dict[str, torch.Tensor] | None) -> bool:
        """Client ``k``'s reply: its training statistics (None: its loss diverged, so it sent
        nothing) and its update (None under SecAgg+, where the server sees only the sum).
        Whether it counts towards the round."""
        self.took.append(k)
        if result is None:
            self.rejected.append({"client": k, "reason": DIVERGED})
            return False
        self.results.append((k, result))
        if result.examples:
            # A client that holds its own data (a node with a data-dir) says how much it has.
            self.sizes[k] = result.examples
        if update is not None:
            self.bytes_up += nbytes(update)
            self.updates.append((k, update))
        return True


def expected_update(fed: ServerState, round_: int) -> dict[str, torch.Tensor]:
    """The server's current value of every tensor clients upload in ``round_``."""
    return {n: fed.server[n] for n in fed.method.upload(fed.initial, round_)}


def conclude_round(fed: ServerState, round_: int, inbox: Inbox, start: float) -> dict:
    """Server side of a round, for every runtime: refuse malformed, non-finite and
    (optionally) outlying replies, average the rest, and return the round's record.

    With fewer than ``server.min_replies`` sound replies the server's tensors stay as they were.
    """
    cfg = fed.cfg
    min_replies = cfg.server.min_replies
    for k, n in inbox.sizes.items():
        fed.client_sizes[k] = n
    expected = expected_update(fed, round_)
    replies, rejected, sent = [], list(inbox.rejected), []
    for k, update in inbox.updates:
        # What the client was sent, at the rank it replied with: its update is checked (and
        # measured, below) against it.
        view = fed.at_rank_of(fed.method.client_view(expected, k, fed.ranks), k, update)
        reason = check_update(update, view)
        if reason is None:
            replies.append((k, update))
            sent.append(view)
        else:
            rejected.append({"client": k, "reason": reason})
    rejected.sort(key=lambda r: r["client"])  # one entry per client, in the order clients were asked
    if cfg.server.outlier_rule == "median" and replies:
        norms = [change_norm(u, view) for (_, u), view in zip(replies, sent)]
        outlier = norm_outliers(norms, cfg.server.outlier_factor)
        rejected += [
            {"client": k, "reason": f"change norm {n:.3g} over {cfg.server.outlier_factor:g}x the median"}
            for (k, _), n, bad in zip(replies, norms, outlier)
            if bad
        ]
        replies = [r for r, bad in zip(replies, outlier) if not bad]
    for r in rejected:
        log.warning("round %d: update of client %d rejected: %s", round_, r["client"], r["reason"])
    for k, update in replies:
        fed.heard(k, update)
    if inbox.secure is not None:
        new, contributors = inbox.secure
        reason = check_update(new, expected)
        replies = [(k, None) for k in contributors] if reason is None else []
        if reason is not None:
            log.warning("round %d: the securely aggregated mean was refused: %s", round_, reason)
    update_norm = 0.0
    if expected and replies and len(replies) >= min_replies:
        if inbox.secure is None:
            new = server_aggregate(fed, round_, [u for _, u in replies], [k for k, _ in replies], expected)
        update_norm = change_norm({n: t for n, t in new.items() if n in expected}, expected)
        fed.take(round_, new)
    elif expected and replies:
        log.warning(
            "round %d: %d sound replies, fewer than the %d required; skipping aggregation",
            round_,
            len(replies),
            min_replies,
        )
        replies = []
    elif expected:
        log.warning("round %d: no update accepted; the server's tensors stay as they were", round_)
    fed.round = round_
    fed.close_round(round_, inbox.clients, inbox.took)
    trained = [r for _, r in inbox.results]
    privacy = {}
    if fed.privacy is not None:
        fed.dp_ledger = fed.privacy.spend(fed.dp_ledger, inbox.clients)
        privacy = fed.privacy.metrics(fed.dp_ledger)
    return {
        "round": round_,
        "clients": inbox.clients,
        "train_loss": float(
            np.average([r.loss for r in trained], weights=[fed.client_sizes[k] for k, _ in inbox.results])
        )
        if trained
        else float("nan"),
        "grad_norm_A": _mean_of(trained, "A"),
        "grad_norm_B": _mean_of(trained, "B"),
        "client_stats": client_stats(inbox.results),
        "update_norm": update_norm,
        "gamma": fed.ranks.gamma(),
        **fed.ranks.record(inbox.clients),
        "aggregated": len(replies),
        "dropped": inbox.dropped,
        "rejected": rejected,
        "injected": inbox.injected,
        "bytes_up": inbox.bytes_up,
        "bytes_down": inbox.bytes_down,
        **privacy,
        "seconds": time.perf_counter() - start,
    }


def server_aggregate(
    fed: ServerState,
    round_: int,
    updates: list[dict[str, torch.Tensor]],
    clients: list[int],
    expected: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """The server's new tensors from the accepted updates: the method's aggregation function
    (:meth:`sfedlora.federated.methods.Method.aggregate`) with the clients weighted as
    ``federation.client_weights`` says, or with dp=server the clipped, uniformly weighted,
    noised mean."""
    if fed.privacy is not None and fed.privacy.mode == "server":
        return user_level_mean(
            updates, expected, fed.privacy.clip_norm, float(fed.privacy.noise_multiplier[0]), fed.dp_rng
        )
    rule = fed.cfg.federation.client_weights
    rule = fed.method.reference_weights if rule == "reference" else rule
    weights = [float(fed.client_sizes[k]) if rule == "examples" else 1.0 for k in clients]
    return fed.method.aggregate(
        Replies(
            round_, clients, updates, weights, fed.ranks, fed.server, fed.cfg, transposed_weights(fed.model)
        )
    )


def sample_clients(fed: ServerState) -> list[int]:
    """The clients of the next round, drawn from the federation's seeded sampler."""
    return np.sort(fed.sampler.choice(fed.n_clients, size=fed.n_sampled, replace=False)).tolist()
