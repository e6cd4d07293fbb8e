"""The Flower ServerApp: the simulator's server side, with messages instead of calls.

The run is :func:`sfedlora.driver.experiment.run` with Flower's rounds in place of the embedded
ones: same sampling, checks, aggregation and records (:func:`conclude_round`), same run
directory. Clients the server cannot reach, or that stay silent past
``flower.round_timeout``, count as dropped; the round goes on with the others.

The server's side is checkpointed after every round, so a ServerApp started again with
``resume`` (a new Flower run) continues the run; each SuperNode keeps its client's state
under its ``state-dir``, keyed by the run's key (:func:`sfedlora.driver.rundir.run_key`), which every
message carries.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, Message, MessageType
from flwr.common import log as flwr_log
from flwr.serverapp import Grid, ServerApp

from ..config import RunConfig, load_config
from ..data import TaskData
from ..driver.experiment import RunResult, resume_config, run
from ..driver.rundir import run_key
from ..errors import SfedloraError
from ..federated.evaluation import evaluate
from ..federated.federation import ServerState, build_server
from ..federated.server import Inbox, conclude_round, expected_update, nbytes, sample_clients
from ..logs import quiet_libraries, round_lines
from .records import (
    CONFIG,
    RESULT,
    UPDATE,
    Refused,
    checked_tensors,
    config_text,
    receive_train_reply,
    request,
    stats_result,
)
from .secagg import SecAggRound, from_parameters, to_parameters

log = logging.getLogger("sfedlora")


def check_runnable(cfg: RunConfig) -> None:
    if cfg.faults.dropout or cfg.faults.bad_update:
        raise SfedloraError(
            "faults.dropout and faults.bad_update inject faults in the embedded simulator only; "
            "on Flower faults are real (stop a SuperNode): set both to 0"
        )
    if cfg.eval.client_test_fraction:
        raise SfedloraError(
            "eval.client_test_fraction holds out a share of each client's data, scored where the "
            "client's state lives: the embedded simulator only; on Flower set it to 0"
        )


class FlowerRounds:
    """The rounds of a run played over a Flower ``Grid``: a :class:`sfedlora.federated.runtime.Runtime`.
    The server holds the server's state only; each client's state lives on its SuperNode."""

    def __init__(self, grid: Grid):
        self.grid = grid
        self.nodes: dict[int, int] = {}  # client index → node id

    def check(self, cfg: RunConfig) -> None:
        check_runnable(cfg)

    def federation(self, cfg: RunConfig, data: TaskData) -> ServerState:
        return build_server(cfg, data)

    def start(self, fed: ServerState, run_dir: Path) -> None:
        self.cfg = fed.cfg
        self.text = config_text(fed.cfg)
        self.key = run_key(run_dir)  # every message carries it: a node keeps its state under it
        self.nodes, hellos = self.connect(fed.n_clients)
        for k, hello in hellos.items():  # each node catches up from the base change it holds
            fed.base_history.rejoin(k, hello.get("base_round"), fed.round)
        amnesic = [k for k in self.nodes if not hellos[k]["durable"]]
        if fed.round and amnesic:
            raise SfedloraError(
                f"cannot resume after round {fed.round}: the SuperNodes of clients {amnesic} keep their "
                "client's state in memory only, so it is gone; start every SuperNode with a node config "
                "state-dir (--node-config \"partition-id=K state-dir='/var/sfedlora'\") from the run's start"
            )

    def play_round(self, fed: ServerState) -> dict:
        return self.play_secure(fed) if self.cfg.privacy.secagg else self.play(fed)

    def evaluate(self, fed: ServerState) -> dict:
        return evaluate(fed, self)

    def checkpoint_due(self, fed: ServerState) -> bool:
        # Every round: a SuperNode keeps only the states that a replay of the one round after
        # the checkpoint needs.
        return True

    def finish(self, fed: ServerState) -> dict[int, dict[str, torch.Tensor]]:
        """End the run on every node (each saves its adapter where it keeps its state); the
        personalised adapters the server can save: with ``flower.collect_adapters`` every
        client's, sent by its node; else, where clients keep nothing local, those the server's
        tensors make."""
        collect = self.cfg.flower.collect_adapters
        clients = list(range(fed.n_clients))
        replies = self.ask(
            MessageType.QUERY,
            clients,
            lambda k: request(self.text, self.key, k, fed.round, *fed.wire(k), finish=True),
            "finish",
        )
        missing, collected = [], {}
        for k, reply in replies.items():
            if isinstance(reply, str) or (collect and UPDATE not in reply.content.array_records):
                missing.append(k)
                log.warning("client %d (node %d) did not finish the run: %s", k, self.nodes[k], reply)
            elif collect:
                try:  # read as untrusted as a training reply: only the adapter's own names and shapes
                    own = checked_tensors(reply.content.array_records[UPDATE], fed.reply_view(fed.initial, k))
                except Refused as why:
                    missing.append(k)
                    log.warning(
                        "client %d (node %d) sent an adapter that was refused: %s", k, self.nodes[k], why
                    )
                    continue
                collected[k] = fed.personal(own, k)
        if collect and missing:
            log.warning("personalised adapters not saved: clients %s did not send theirs", missing)
        if collect and not missing:
            return collected
        if fed.method.has_local_state():
            return {}
        return {k: fed.served_tensors(k) for k in clients}

    def close(self) -> None:
        pass

    def ask(
        self, kind: str, clients: list[int], body: Callable[[int], object], group: str
    ) -> dict[int, Message | str]:
        """Send ``body(k)`` to each client's node; each client's reply, or why there is none.

        Replies are matched to requests by message id: the SuperLink's own error replies
        (a node it found gone) do not come from the node they answer for.
        """
        messages = [
            Message(body(k), dst_node_id=self.nodes[k], message_type=kind, group_id=group) for k in clients
        ]
        asked = dict(zip(self.grid.push_messages(messages), clients))
        out: dict[int, Message | str] = {
            k: f"no reply within flower.round_timeout={self.cfg.flower.round_timeout:g}s" for k in clients
        }
        deadline = time.monotonic() + self.cfg.flower.round_timeout
        while asked and time.monotonic() < deadline:
            for reply in self.grid.pull_messages(list(asked)):
                k = asked.pop(reply.metadata.reply_to_message_id)
                out[k] = f"node failed: {reply.error.reason}" if reply.has_error() else reply
            if asked:
                time.sleep(0.2)
        return out

    def connect(self, n_clients: int) -> tuple[dict[int, int], dict[int, ConfigRecord]]:
        """Wait for the SuperNodes, then learn which client each one holds (client → node
        id), and each one's hello: whether it keeps its client's state on disk (``durable``)
        and the round of the base change it holds (``base_round``, where it holds one)."""
        deadline = time.monotonic() + self.cfg.flower.connect_timeout
        while len(ids := list(self.grid.get_node_ids())) < n_clients:
            if time.monotonic() > deadline:
                raise SfedloraError(
                    f"{len(ids)} of {n_clients} SuperNodes connected within flower.connect_timeout="
                    f"{self.cfg.flower.connect_timeout:g}s: start one per client (federation.n_clients); "
                    f'with flwr run\'s local simulation pass --federation-config "num-supernodes={n_clients}"'
                )
            time.sleep(0.5)
        self.nodes = {i: node for i, node in enumerate(ids)}  # provisional, to address the handshake
        held: dict[int, int] = {}
        hellos: dict[int, ConfigRecord] = {}
        for i, reply in self.ask(
            MessageType.QUERY, list(self.nodes), lambda i: request(self.text, self.key, -1, 0, {}), "hello"
        ).items():
            if isinstance(reply, str):
                raise SfedloraError(f"SuperNode {self.nodes[i]} did not answer the handshake ({reply})")
            hello = reply.content.config_records.get(CONFIG, {})
            k, durable_flag = hello.get("client"), hello.get("durable")
            if not isinstance(k, int) or isinstance(k, bool) or durable_flag not in (0, 1):
                raise SfedloraError(
                    f"SuperNode {self.nodes[i]} answered the handshake with no client index: start it with "
                    "this version of sfedlora's ClientApp"
                )
            hellos[k] = hello
            if k in held:
                raise SfedloraError(
                    f"SuperNodes {held[k]} and {self.nodes[i]} both hold partition-id {k}: give each its own"
                )
            held[k] = self.nodes[i]
        missing = sorted(set(range(n_clients)) - set(held))
        if missing:
            raise SfedloraError(
                f"no SuperNode holds client(s) {missing}: start them with --node-config 'partition-id=K'"
            )
        log.info("%d SuperNodes connected: %s", len(held), held)
        return held, hellos

    def play(self, fed: ServerState) -> dict:
        """One round: the simulator's, with messages instead of calls."""
        start = time.perf_counter()
        round_ = fed.round + 1
        inbox = Inbox(sample_clients(fed))
        # Each client gets the global tensors at its own rank, and catches up on the base change.
        downloads = {k: fed.wire(k) for k in inbox.clients}
        replies = self.ask(
            MessageType.TRAIN,
            inbox.clients,
            lambda k: request(self.text, self.key, k, round_, *downloads[k]),
            str(round_),
        )
        expected = expected_update(fed, round_)
        for k in inbox.clients:
            inbox.sent(*downloads[k])
            reply = replies[k]
            if isinstance(reply, str):
                log.warning(
                    "round %d: no reply from client %d (node %d): %s", round_, k, self.nodes[k], reply
                )
                inbox.dropped.append(k)
                continue
            # A registered node is still not trusted: its reply is checked before it is decoded.
            try:
                result, update = receive_train_reply(reply, fed.reply_view(expected, k), self.key, k, round_)
            except Refused as why:
                inbox.rejected.append({"client": k, "reason": str(why)})
                continue
            inbox.receive(k, result, update)
        return conclude_round(fed, round_, inbox, start)

    def play_secure(self, fed: ServerState) -> dict:
        """One round inside Flower's SecAgg+ protocol: the server learns only the
        example-weighted mean of the sampled clients' changes (see :mod:`.secagg`)."""
        import flwr.compat.common.recorddict_compat as compat
        from flwr.app import RecordDict
        from flwr.server.compat.legacy_context import LegacyContext
        from flwr.server.workflow import SecAggPlusWorkflow
        from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

        start = time.perf_counter()
        round_ = fed.round + 1
        inbox = Inbox(sample_clients(fed))
        download = fed.method.download(fed.server)
        expected = expected_update(fed, round_)
        strategy = SecAggRound(
            self.grid,
            self.nodes,
            inbox.clients,
            {"config": self.text, "run": self.key, "round": round_},
            download,
        )
        context = LegacyContext(
            Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}), strategy=strategy
        )
        context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: round_})
        context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
            to_parameters(download), True
        )
        p = self.cfg.privacy
        # max_weight: the largest client's example count, so no weight overflows its share of the range.
        SecAggPlusWorkflow(
            num_shares=p.secagg_num_shares,
            reconstruction_threshold=p.secagg_threshold,
            max_weight=float(fed.client_sizes.max()),
            clipping_range=p.secagg_clipping_range,
            timeout=self.cfg.flower.round_timeout,
        )(self.grid, context)
        contributors = []
        for k in inbox.clients:
            inbox.sent(download)
            if k not in strategy.results:
                log.warning(
                    "round %d: client %d (node %d) dropped out of secure aggregation",
                    round_,
                    k,
                    self.nodes[k],
                )
                inbox.dropped.append(k)
                continue
            inbox.bytes_up += nbytes(expected)  # a masked vector the size of the update
            if inbox.receive(k, stats_result(strategy.results[k]), None):
                contributors.append(k)
        if strategy.mean is not None and strategy.weight > 0:
            change = from_parameters(strategy.mean, expected)
            inbox.secure = ({n: expected[n] + change[n] for n in expected}, contributors)
        return conclude_round(fed, round_, inbox, start)

    def own_tests(self, fed: ServerState) -> tuple[list[dict[str, float]], list[int]]:
        raise SfedloraError("eval.client_test_fraction needs the embedded simulator")  # check() refuses it

    def dev(self, fed: ServerState, clients: list[int]) -> list[dict[str, float]]:
        """The dev-set scores of each reachable client's personalised model, scored on its node."""
        replies = self.ask(
            MessageType.EVALUATE,
            clients,
            lambda k: request(self.text, self.key, k, fed.round, *fed.wire(k)),
            f"eval-{fed.round}",
        )
        scores = []
        for k, reply in replies.items():
            if isinstance(reply, str):
                log.warning(
                    "round %d: client %d (node %d) not evaluated: %s", fed.round, k, self.nodes[k], reply
                )
            else:
                scores.append(dict(reply.content.metric_records[RESULT]))
        return scores


def run_on_grid(
    grid: Grid, cfg: RunConfig | None, on_start=None, on_record=None, resume: Path | None = None
) -> RunResult:
    """Run ``cfg`` (or resume the run directory ``resume``) over ``grid``."""
    return run(cfg, on_start=on_start, on_record=on_record, resume=resume, runtime=FlowerRounds(grid))


def settings_from_context(context: Context) -> tuple[RunConfig, Path | None]:
    """The run's config and the run directory to resume, from the app's run config: ``config``
    (a YAML path, or empty for the defaults), ``overrides`` (``key=value`` pairs separated by
    spaces) and ``resume`` (a run directory on the server's machine, or empty). Resuming, the
    config is the run's own (``config.yaml``) unless ``config`` or ``overrides`` say otherwise."""
    path = str(context.run_config.get("config", "")) or None
    overrides = str(context.run_config.get("overrides", "")).split()
    if not context.run_config.get("resume"):
        return load_config(path, overrides), None
    resume = Path(str(context.run_config["resume"]))
    given = load_config(path, overrides) if path is not None else None
    return resume_config(resume, given, overrides if path is None else ()), resume


def make_server_app(
    cfg: RunConfig | None = None,
    on_start=None,
    on_record=None,
    outcome: dict | None = None,
    resume: Path | None = None,
) -> ServerApp:
    """A ServerApp that runs ``cfg`` or resumes ``resume`` (neither: the settings in the run
    config, for ``flwr run``).

    ``outcome`` receives the ``result`` or the ``error``: the app may run in a thread of
    Flower's that logs exceptions instead of passing them on.
    """
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        quiet_libraries()
        # Under `flwr run` nobody watches the records: log each round to the run's stream.
        report = on_record or (
            lambda record: [flwr_log(logging.INFO, line) for line in round_lines(record, None, True)]
        )
        try:
            given = (cfg, resume) if cfg is not None or resume is not None else settings_from_context(context)
            result = run_on_grid(grid, given[0], on_start, report, resume=given[1])
        except Exception as err:
            if outcome is not None:
                outcome["error"] = err
            raise
        if outcome is not None:
            outcome["result"] = result

    return server_app


app = make_server_app()
