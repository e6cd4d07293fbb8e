"""Secure aggregation with Flower's SecAgg+ (``SecAggPlusWorkflow`` + ``secaggplus_mod``).

With ``privacy.secagg`` a round's training runs inside Flower's SecAgg+ protocol: each
sampled client masks its quantised, example-weighted *change* (upload minus download)
with pairwise and private masks, and the server learns only the weighted mean of the
changes. Flower's workflow speaks the legacy ``FitIns`` / ``FitRes`` records and asks a
``Strategy`` which clients to train and what to do with the sum; :class:`SecAggRound` is
that strategy, reduced to the two calls the workflow makes, and hands the mean back to
the simulator's :func:`conclude_round`. The ClientApp answers such a message with the
same :func:`client_round` as always (:func:`train_reply_secagg`).

What SecAgg+ costs: the server cannot check or clip a single client's update (no
per-update shape/finiteness checks, no outlier rule, no dp=server); entries of a change
beyond ``privacy.secagg_clipping_range`` are clipped by the quantisation.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import (
    Code,
    FitIns,
    FitRes,
    Parameters,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from ..federated.client import ClientResult
from .records import result_stats

FITINS_CONFIG = "fitins.config"  # how a legacy FitIns record says it is one


def to_parameters(tensors: dict[str, torch.Tensor]) -> Parameters:
    """Tensors in name order as Flower's legacy ``Parameters`` (the order both ends agree on)."""
    return ndarrays_to_parameters([tensors[n].detach().cpu().numpy() for n in sorted(tensors)])


def from_parameters(parameters: Parameters, names) -> dict[str, torch.Tensor]:
    arrays = parameters_to_ndarrays(parameters)
    return {n: torch.from_numpy(np.array(a, dtype=np.float32)) for n, a in zip(sorted(names), arrays)}


def is_secagg(msg: Message) -> bool:
    return RECORD_KEY_CONFIGS in msg.content.config_records


def secagg_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's ``secaggplus_mod`` for the messages of the SecAgg+ protocol; every other
    message (plain training, evaluation, the handshake) goes straight to the app."""
    from flwr.client.mod import secaggplus_mod

    return secaggplus_mod(msg, context, call_next) if is_secagg(msg) else call_next(msg, context)


def fit_result(result: ClientResult | None, change: dict[str, torch.Tensor], n_examples: int) -> FitRes:
    """A client's SecAgg+ contribution: its change, weighted by its example count.

    A client whose loss diverged still has to take part (its masks must cancel), so it
    sends a zero change with weight 0: it adds nothing to the mean.
    """
    stats = result_stats(result)
    return FitRes(Status(Code.OK, ""), to_parameters(change), 0 if result is None else n_examples, stats)


class SecAggRound:
    """The ``Strategy`` face Flower's ``SecAggPlusWorkflow`` needs for one round: which
    clients train on what (``configure_fit``), and where the securely summed mean goes
    (``aggregate_fit``). Nothing else of a strategy is called by the workflow."""

    def __init__(
        self,
        grid,
        nodes: dict[int, int],
        clients: list[int],
        fitins_config: dict,
        download: dict[str, torch.Tensor],
    ):
        from flwr.server.compat.grid_client_proxy import GridClientProxy

        self.proxies = {k: GridClientProxy(nodes[k], grid, 0) for k in clients}
        self.fitins_config = fitins_config
        self.download = download
        self.mean: Parameters | None = None  # the weighted mean of the changes, once unmasked
        self.results: dict[int, dict] = {}  # client → the metrics it sent with its masked vector
        self.weight = 0  # total example weight in the mean

    def configure_fit(self, server_round, parameters, client_manager):
        return [
            (proxy, FitIns(to_parameters(self.download), {**self.fitins_config, "client": k}))
            for k, proxy in self.proxies.items()
        ]

    def aggregate_fit(self, server_round, results, failures):
        client_of = {proxy.node_id: k for k, proxy in self.proxies.items()}
        for proxy, fitres in results:
            self.results[client_of[proxy.node_id]] = dict(fitres.metrics)
            self.weight += fitres.num_examples
        if results:
            self.mean = results[0][1].parameters  # the workflow gives every result the unmasked mean
        return self.mean, {}
