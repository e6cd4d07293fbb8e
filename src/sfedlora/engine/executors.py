"""Round executors: how the sampled clients' local work is computed.

An executor trains a round's clients (:meth:`Executor.train`) and produces personalised
models' outputs on the dev set (:meth:`Executor.outputs`). The math is the caller's
(:func:`sfedlora.federated.client.client_round`, :func:`sfedlora.federated.evaluation.outputs_of`), so every
executor gives the same results up to float summation order. Three exist: one client
after another in this process, whole clients side by side in forked worker processes
(:mod:`sfedlora.engine.workers`), and the fused engine, every client's step in one batched
computation (:mod:`sfedlora.engine.fused`). A new executor implements :class:`Executor` and is
chosen in :func:`make_executor`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Protocol

from ..errors import SfedloraError
from ..federated.client import ClientOutcome, ClientState, client_round
from ..federated.evaluation import outputs_of
from ..federated.jobs import EvalJob, TrainJob
from ..federated.shared import client_steps
from .fused import check_fused, fused_outputs, fused_round
from .workers import ClientWorkers, release_freed_memory, worker_count


class Executor(Protocol):
    def train(self, jobs: Sequence[TrainJob], round_: int) -> Iterator[ClientOutcome]:
        """Each job's client round, yielded in order."""
        ...

    def outputs(self, jobs: Sequence[EvalJob]) -> Iterator:
        """The outputs of each (tensors, client[, data]) model on its data (by default the dev
        set), yielded in order."""
        ...

    def close(self) -> None: ...


def train(fed, k: int, state: ClientState, download: dict, round_: int) -> ClientOutcome:
    """Client ``k``'s round, as a per-client executor runs it (here or in a worker that inherited ``fed``)."""
    return client_round(fed, fed.client(k), state, download, round_)


class PerClient:
    """Whole clients one at a time through the subclass's ``map``: ``fn(fed, *a)`` for each
    ``a``, yielded in order."""

    def train(self, jobs: Iterable[TrainJob], round_: int) -> Iterator[ClientOutcome]:
        # A generator: each client's old state is read only when its turn comes.
        return self.map(train, ((j.client, j.state, j.download, round_) for j in jobs))

    def outputs(self, jobs: Iterable[EvalJob]) -> Iterator:
        return self.map(outputs_of, ((j.tensors, j.client, j.data) for j in jobs))


class InProcess(PerClient):
    """Clients one after another, in this process."""

    def __init__(self, fed):
        self.fed = fed

    def map(self, fn: Callable, args: Iterable[tuple]) -> Iterator:
        for a in args:
            out = fn(self.fed, *a)
            release_freed_memory()
            yield out

    def close(self) -> None:
        pass


class Workers(PerClient):
    """Clients side by side in ``n`` forked worker processes."""

    def __init__(self, fed, n: int):
        self.pool = ClientWorkers(fed, n)
        self.map = self.pool.map

    def close(self) -> None:
        self.pool.close()


def _fused_train(fed, jobs: list[TrainJob], round_: int, whole: bool = False):
    outcomes = fused_round(fed, [(fed.client(j.client), j.state, j.download) for j in jobs], round_)
    return list(outcomes) if whole else outcomes  # a worker's reply crosses the pipe whole


def _chunks(items: list, n: int) -> list[list]:
    size = -(-len(items) // n)
    return [items[i : i + size] for i in range(0, len(items), size)]


class Fused:
    """The fused engine: the round's clients in lockstep, in this process, or with ``workers``
    > 1 split between that many forked processes (one torch thread each), each fusing its share."""

    def __init__(self, fed, workers: int = 1):
        check_fused(fed)
        self.fed, self.n = fed, workers
        self.workers = Workers(fed, workers) if workers > 1 else None

    def _map(self, fn: Callable, jobs: list, *args) -> Iterator:
        if self.workers is None:
            return iter(fn(self.fed, jobs, *args))
        chunks = _chunks(jobs, self.n)
        return (out for part in self.workers.map(fn, [(chunk, *args) for chunk in chunks]) for out in part)

    def train(self, jobs: Iterable[TrainJob], round_: int) -> Iterator[ClientOutcome]:
        if self.workers is None:  # lazily: each group's clients are replaced as it ends
            return _fused_train(self.fed, list(jobs), round_)
        return self._map(_fused_train, list(jobs), round_, True)

    def outputs(self, jobs: Iterable[EvalJob]) -> Iterator:
        jobs = list(jobs)
        if not self.fed.task.outputs_are_logits:  # generation and perplexity: one model at a time
            return (self.workers or InProcess(self.fed)).outputs(jobs)
        return self._map(fused_outputs, jobs)

    def close(self) -> None:
        if self.workers is not None:
            self.workers.close()


def fused_runs(fed) -> bool:
    """Whether the fused engine can run ``fed`` (what it cannot run it refuses, naming why)."""
    try:
        check_fused(fed)
    except SfedloraError:
        return False
    return True


def engine_rule(device: str, precision: str, most_steps: int) -> str:
    """``simulator.engine: auto`` from what is known before a model is built (``sfedlora plan``
    asks it too): the fused engine on a GPU (it keeps the device busy with many small clients)
    and, on a CPU, where clients take one local step a round: there a client's batch cannot be
    grouped by length and sorting across clients removes the padding (2-3x per round); with more
    steps per round the per-client workers were faster (benchmarks/README.md). The fused engine
    has no fp16 loss scaling."""
    if precision == "fp16":
        return "per-client"
    if device != "cpu":
        return "fused"
    return "fused" if most_steps == 1 else "per-client"


def auto_engine(fed) -> str:
    """``simulator.engine: auto`` for a built federation: :func:`engine_rule`, where the fused
    engine can run the model at all."""
    if not fused_runs(fed):
        return "per-client"
    most = max(client_steps(fed.cfg, int(n)) for n in fed.client_sizes)
    return engine_rule(fed.compute.device, fed.compute.precision, most)


def make_executor(fed) -> Executor:
    """The executor ``simulator.engine`` asks for, with ``simulator.workers`` processes (auto:
    one per torch thread on a CPU; the fused engine too, as it was as fast or faster split in
    two at N = 10 and 100, benchmarks/README.md)."""
    sim = fed.cfg.simulator
    engine = auto_engine(fed) if sim.engine == "auto" else sim.engine
    n = worker_count(sim.workers, fed.compute.device, len(fed.clients))
    if engine == "fused":
        return Fused(fed, n)
    return Workers(fed, n) if n > 1 else InProcess(fed)
