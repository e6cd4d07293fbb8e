"""The Flower ClientApp: one client of the federation per SuperNode.

The node's ``partition-id`` (node config) says which client it is. The config comes with
every message, so a node needs nothing but the package and the data. A node builds only
its own client (:func:`sfedlora.federated.federation.build_node`); training and scoring are the
simulator's own :func:`client_round` and :func:`client_scores`.
"""

from __future__ import annotations

import hashlib
import logging

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ..data import load_task
from ..errors import SfedloraError
from ..federated.client import client_round
from ..federated.evaluation import client_scores, outputs_of
from ..federated.federation import Node, build_node
from ..logs import quiet_libraries
from ..lora.base import save_base_change
from .node_state import (
    load_held_file,
    load_state_file,
    local_data,
    save_held_file,
    save_state_file,
    state_file,
)
from .records import (
    CONFIG,
    RESULT,
    UPDATE,
    Request,
    is_finish,
    load_held_base,
    load_state,
    parse_request,
    read_request,
    save_held_base,
    save_state,
    tensors_record,
    train_reply,
)
from .secagg import FITINS_CONFIG, fit_result, from_parameters, secagg_mod

log = logging.getLogger("sfedlora")

# The one module-level cache: the Node this process serves (the shared base model, its own
# client's data and initial state), keyed by (sha256 of the run's config text, partition id,
# node-local data settings);
# built on the first message, reused for every later one, replaced when either changes. The
# client's state between rounds is in Context.state.
_node: dict[tuple[str, int, str], Node] = {}


def node_for(cfg, text: str, k: int, node_config) -> Node:
    local = local_data(cfg.data, node_config)
    key = (hashlib.sha256(text.encode()).hexdigest(), k, str(local))
    if key not in _node:
        _node.clear()
        quiet_libraries()  # a Ray worker or SuperNode process starts with the libraries' chatty defaults
        data = load_task(local or cfg.data, seed=cfg.seed)
        _node[key] = build_node(cfg, data, k, local=local is not None)
    return _node[key]


def partition_id(context: Context, n_clients: int) -> int:
    try:
        k = int(context.node_config["partition-id"])
    except (KeyError, ValueError):
        raise SfedloraError(
            "this SuperNode has no integer partition-id: start it with "
            "--node-config 'partition-id=K' (K = 0 .. n_clients-1)"
        ) from None
    if not 0 <= k < n_clients:
        raise SfedloraError(
            f"partition-id {k} is outside 0..{n_clients - 1} (federation.n_clients={n_clients})"
        )
    return k


def _check_node(req: Request, context: Context, training: bool = False):
    """This node's client and the state the request builds on, checked against the request."""
    k = partition_id(context, req.cfg.federation.n_clients)
    if req.client != k:
        raise SfedloraError(f"server asked this node for client {req.client}, but it holds partition {k}")
    node = node_for(req.cfg, req.text, k, context.node_config)
    state = load_state(context.state)
    path = state_file(context.node_config)
    if state is None and path is not None:  # a node process started again, or a resumed server
        state = load_state_file(path, req.run, k, req.round, training)
    return node, state or node.fresh


def _keep(context: Context, req: Request, state) -> None:
    """The client's state after a round: in Context.state and, with state-dir, on the node's disk."""
    save_state(context.state, state)
    path = state_file(context.node_config)
    if path is not None:
        save_state_file(path, req.run, req.client, req.round, state)


def _held(context: Context, run: str) -> tuple[int, dict[str, torch.Tensor]] | None:
    """(round, ΔW): the base change this node holds in run ``run``, from Context.state or,
    in a node process started again, its state-dir; None where it holds none."""
    held = load_held_base(context.state, run)
    path = state_file(context.node_config)
    return load_held_file(path.parent, run) if held is None and path is not None else held


def _base(context: Context, req: Request) -> dict[str, torch.Tensor]:
    """The base change ``req``'s round runs on: the node's brought up to date by the request's
    catch-up, and kept (with state-dir, on disk too) for the next request."""
    if req.catch is None:
        return {}
    round_, held = _held(context, req.run) or (None, {})
    change = req.catch.onto(held, round_)
    if round_ != req.catch.upto:
        save_held_base(context.state, req.run, req.catch.upto, change)
        path = state_file(context.node_config)
        if path is not None:
            save_held_file(path.parent, req.run, req.catch.upto, change)
    return change


def query(msg: Message, context: Context) -> Message:
    """Handshake: tell the server which client this node holds, whether its state outlives
    the process (a resumed run needs it) and the round of the base change it holds. At the end
    of the run: save the personalised adapter under the node's ``state-dir`` and, if the run
    asks, send it."""
    req = read_request(msg)
    k = partition_id(context, req.cfg.federation.n_clients)
    path = state_file(context.node_config)
    held = _held(context, req.run)
    hello = {"client": k, "durable": int(path is not None), **({"base_round": held[0]} if held else {})}
    reply = RecordDict({CONFIG: ConfigRecord(hello)})
    if is_finish(msg):
        node, state = _check_node(req, context)
        personal, base = state.with_download(req.download), _base(context, req)
        if path is not None:
            shared = node.shared
            shared.ranks.save(
                shared.model,
                shared.params,
                {**personal, **base},
                k,
                path.parent / "adapters" / f"client_{k:02d}",
                shared.method.mix(k, shared.cfg),
            )
            if base:
                save_base_change(path.parent / "adapters", base)
        if req.cfg.flower.collect_adapters:
            reply[UPDATE] = tensors_record(personal)
    return Message(reply, reply_to=msg)


def train(msg: Message, context: Context) -> Message:
    if FITINS_CONFIG in msg.content.config_records:
        return train_secure(msg, context)
    req = read_request(msg)
    node, state = _check_node(req, context, training=True)
    download = {**req.download, **_base(context, req)}
    outcome = client_round(node.shared, node.client, state, download, req.round)
    _keep(context, req, outcome.state)
    return Message(train_reply(outcome.result, outcome.update, req), reply_to=msg)


def train_secure(msg: Message, context: Context) -> Message:
    """A training request inside SecAgg+ (legacy FitIns): the same round, with the change
    (upload minus download) as the reply, which ``secagg_mod`` masks before it leaves."""
    import flwr.compat.common.recorddict_compat as compat

    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    req = parse_request(fitins.config, {})
    k = partition_id(context, req.cfg.federation.n_clients)
    shared = node_for(req.cfg, req.text, k, context.node_config).shared
    download = from_parameters(fitins.parameters, shared.method.download(shared.initial))
    req = req._replace(download=download)
    node, state = _check_node(req, context, training=True)
    outcome = client_round(shared, node.client, state, download, req.round)
    _keep(context, req, outcome.state)
    reference = shared.method.upload(download, req.round)
    change = {
        n: outcome.update[n] - reference[n] if outcome.result is not None else torch.zeros_like(reference[n])
        for n in reference
    }
    fitres = fit_result(outcome.result, change, node.client.size)
    return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)


def evaluate(msg: Message, context: Context) -> Message:
    """Score this client's personalised model: its own tensors under the server's global ones."""
    req = read_request(msg)
    node, state = _check_node(req, context)
    outputs = outputs_of(
        node.shared, {**state.with_download(req.download), **_base(context, req)}, node.client.k
    )
    scores = client_scores(node.shared, node.histogram, outputs)
    return Message(RecordDict({RESULT: MetricRecord(scores)}), reply_to=msg)


def client_app(*mods) -> ClientApp:
    """The ClientApp, with ``mods`` run before each message (Flower's simulation gives its
    virtual SuperNodes a state-dir through one). ``secagg_mod`` runs Flower's SecAgg+ client
    protocol for the messages that belong to it."""
    app = ClientApp(mods=[*mods, secagg_mod])
    app.query()(query)
    app.train()(train)
    app.evaluate()(evaluate)
    return app


app = client_app()
