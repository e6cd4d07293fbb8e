"""Round executors: how the sampled clients' local work is computed.

An executor runs ``fn(fed, *args)`` for each ``args`` and yields the results in order. The
math is the caller's (:func:`sfedlora.client.client_round`, :func:`sfedlora.evaluation.outputs_of`),
so every executor gives the same results up to float summation order. Two exist: one
client after another in this process, and whole clients side by side in forked worker
processes (:mod:`sfedlora.workers`). A new executor implements :class:`Executor` and is
chosen in :func:`make_executor`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

from .workers import ClientWorkers, release_freed_memory, worker_count


class Executor(Protocol):
    def map(self, fn: Callable, args: Iterable[tuple]) -> Iterator:
        """``fn(fed, *a)`` for each ``a`` of ``args``, yielded in order."""
        ...

    def close(self) -> None: ...


class InProcess:
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


def make_executor(fed) -> Executor:
    """The executor ``simulator.workers`` asks for: worker processes when more than one."""
    n = worker_count(fed.cfg.simulator.workers, fed.compute.device, len(fed.clients))
    return ClientWorkers(fed, n) if n > 1 else InProcess(fed)
