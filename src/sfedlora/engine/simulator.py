"""The embedded runtime: one frozen base model in this process, every client's state beside it.

A round samples clients, hands each its download, trains them through the round executor
(one after another, or in worker processes), injects the faults the config asks for and
concludes the round with the server step every runtime shares.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..config import RunConfig
from ..data import TaskData
from ..errors import SfedloraError
from ..federated.evaluation import ScoredHere, evaluate
from ..federated.federation import Federation, build_federation
from ..federated.jobs import TrainJob
from ..federated.robust import corrupt
from ..federated.server import Inbox, conclude_round, expected_update, sample_clients
from .executors import Executor, InProcess, make_executor
from .fused import check_fused


def run_round(fed: Federation, executor: Executor | None = None) -> dict:
    """The next communication round; returns its metrics record (without evaluation).

    Sampled clients download the global tensors, train (through ``executor``; without one,
    here, one after another) and reply;
    faults are injected as the config asks; :func:`conclude_round` checks and averages
    the replies.
    """
    start = time.perf_counter()
    faults = fed.cfg.faults
    round_ = fed.round + 1
    inbox = Inbox(sample_clients(fed))
    expected = expected_update(fed, round_)
    # Every fault is drawn before any client trains, so they do not depend on where clients train.
    draws = [
        (fed.fault_rng.random(), fed.fault_rng.random(), str(fed.fault_rng.choice(faults.bad_kinds)))
        for _ in inbox.clients
    ]
    training = []
    for k, (u_drop, u_bad, kind) in zip(inbox.clients, draws):
        download = fed.download(k)
        inbox.sent(*fed.wire(k))  # what it would cost on a wire: the base change as a catch-up
        if u_drop < faults.dropout:
            fed.clients[k].tensors = fed.clients[k].with_download({n: t.clone() for n, t in download.items()})
            inbox.dropped.append(k)
        else:
            training.append((k, download, u_bad < faults.bad_update, kind))
    # Lazily: a per-client executor reads each client's old state only when its turn comes,
    # and it is dropped once replaced.
    executor = executor or InProcess(fed)
    outcomes = executor.train((TrainJob(k, fed.clients[k], d) for k, d, _, _ in training), round_)
    for (k, _, bad, kind), outcome in zip(training, outcomes):
        fed.clients[k] = outcome.state
        update = outcome.update
        if bad and outcome.result is not None:
            update = corrupt(update, fed.reply_view(expected, k)(update), kind, fed.fault_rng)
            inbox.injected.append({"client": k, "kind": kind})
        inbox.receive(k, outcome.result, update)
    return conclude_round(fed, round_, inbox, start)


class Simulator:
    """The embedded runtime, for :func:`sfedlora.federated.runtime.play`: every client's state
    is in this process, so every checkpoint holds it."""

    def __init__(self) -> None:
        self.executor: Executor | None = None

    def check(self, cfg: RunConfig) -> None:
        if cfg.privacy.secagg:
            raise SfedloraError(
                "privacy.secagg needs the Flower runtime (sfedlora run --runtime flower): "
                "in the embedded simulator the server holds every client's state anyway"
            )

    def federation(self, cfg: RunConfig, data: TaskData) -> Federation:
        fed = build_federation(cfg, data)
        if cfg.simulator.engine == "fused":  # refused before the run directory is written
            check_fused(fed)
        return fed

    def start(self, fed: Federation, run_dir: Path) -> None:
        self.executor = make_executor(fed)

    def play_round(self, fed: Federation) -> dict:
        return run_round(fed, self.executor)

    def evaluate(self, fed: Federation) -> dict:
        return evaluate(fed, ScoredHere(self.executor))

    def checkpoint_due(self, fed: Federation) -> bool:
        return False  # checkpoint_every decides

    def finish(self, fed: Federation) -> dict[int, dict[str, torch.Tensor]]:
        return {k: fed.personal_tensors(k) for k in range(fed.n_clients)}

    def close(self) -> None:
        if self.executor is not None:
            self.executor.close()
            self.executor = None
