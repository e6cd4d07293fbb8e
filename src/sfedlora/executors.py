"""Round executors: how the sampled clients' local work is computed.

An executor trains a round's clients (:meth:`Executor.train`) and produces personalised
models' outputs on the dev set (:meth:`Executor.outputs`). The math is the caller's
(:func:`sfedlora.client.client_round`, :func:`sfedlora.evaluation.outputs_of`), so every
executor gives the same results up to float summation order. Three exist: one client
after another in this process, whole clients side by side in forked worker processes
(:mod:`sfedlora.workers`), and the fused engine, every client's step in one batched
computation (:mod:`sfedlora.fused`). A new executor implements :class:`Executor` and is
chosen in :func:`make_executor`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Protocol

from .client import ClientOutcome, ClientState, client_round
from .errors import SfedloraError
from .evaluation import outputs_of
from .fused import check_fused, fused_outputs, fused_round
from .workers import ClientWorkers, release_freed_memory, worker_count

Job = tuple[int, ClientState, dict]  # a client, its state, its download


class Executor(Protocol):
    def train(self, jobs: Sequence[Job], round_: int) -> Iterator[ClientOutcome]:
        """Each job's client round, yielded in order."""
        ...

    def outputs(self, jobs: Sequence[tuple]) -> Iterator:
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

    def train(self, jobs: Iterable[Job], round_: int) -> Iterator[ClientOutcome]:
        # A generator: each client's old state is read only when its turn comes.
        return self.map(train, ((k, state, download, round_) for k, state, download in jobs))

    def outputs(self, jobs: Iterable[tuple]) -> Iterator:
        return self.map(outputs_of, jobs)


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


class Fused:
    """The fused engine: the round's clients in lockstep, in this process."""

    def __init__(self, fed):
        check_fused(fed)
        self.fed = fed

    def train(self, jobs: Iterable[Job], round_: int) -> Iterator[ClientOutcome]:
        jobs = [(self.fed.client(k), state, download) for k, state, download in jobs]
        return iter(fused_round(self.fed, jobs, round_))

    def outputs(self, jobs: Iterable[tuple]) -> Iterator:
        jobs = list(jobs)
        if not self.fed.task.outputs_are_logits:  # generation and perplexity: one model at a time
            return InProcess(self.fed).outputs(jobs)
        return iter(fused_outputs(self.fed, jobs))

    def close(self) -> None:
        pass


def make_executor(fed) -> Executor:
    """The executor ``simulator.engine`` asks for; per client: worker processes when more than one."""
    sim = fed.cfg.simulator
    if sim.engine == "fused":
        if sim.workers not in ("auto", 1):
            raise SfedloraError(
                f"simulator.workers={sim.workers} runs whole clients in processes, and the fused engine "
                "runs them all in one: set simulator.workers=auto (or 1), or simulator.engine=per-client"
            )
        return Fused(fed)
    n = worker_count(sim.workers, fed.compute.device, len(fed.clients))
    return Workers(fed, n) if n > 1 else InProcess(fed)
