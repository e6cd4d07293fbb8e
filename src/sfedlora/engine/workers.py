"""Worker processes that run whole clients side by side for the embedded simulator (CPU).

On a CPU, one client's small per-layer matmuls (batch 16, hidden 384) keep two torch
threads of one process far less busy than two one-thread processes keep two cores
(benchmarks/README.md). So the simulator forks workers once the federation is built:
each inherits the frozen base model copy-on-write (its weights are never written, so
their pages stay shared), runs one torch thread, and calls the very functions the
sequential path calls, with the federation it inherited. Only client state, downloads
and results cross the pipes, so a run's results are those of one process, up to the
order in which one thread or several sum the same floats.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator

import torch

from ..errors import SfedloraError
from ..federated.wire import pack, unpack

# Set in each worker process only (by _init): the federation it was forked with. The pool
# hands it to _init through fork, not pickling, so the frozen base model's pages stay shared.
_FED = None

try:
    _LIBC = ctypes.CDLL("libc.so.6")
    _LIBC.mallinfo2  # noqa: B018  (raises AttributeError where glibc has no mallinfo2)
except (OSError, AttributeError):  # not glibc (>= 2.33): nothing to trim
    _LIBC = None


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


if _LIBC is not None:
    _LIBC.mallinfo2.restype = _MallInfo2


def _init(fed) -> None:
    global _FED
    _FED = fed
    # Ctrl-C reaches the whole process group: the parent handles it and ends the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A progress bar may have swapped in proxies whose lock its thread (not forked) held.
    sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
    torch.set_num_threads(1)


def _apply(payload: bytes) -> bytes:
    fn, args = unpack(payload, trusted=True)
    out = pack(fn(_FED, *args))
    del fn, args
    release_freed_memory()
    return out


def release_freed_memory() -> None:
    # A task frees a client's activations and state copies, which glibc keeps on its heap
    # for the next task. Handing them back after every task kept a worker at 60% of the
    # memory but cost 12% of a 10-client round and 26% of a 100-client one (the next
    # task's pages fault in afresh; benchmarks/README.md), so only once the heap's free
    # part outgrows its live one.
    if _LIBC is not None:
        info = _LIBC.mallinfo2()
        if info.fordblks > info.uordblks:
            _LIBC.malloc_trim(0)


def worker_count(setting: int | str, device: str, clients: int) -> int:
    """Workers a run gets: ``simulator.workers``, with auto resolved for this process."""
    if setting == "auto":
        return 1 if device != "cpu" else max(1, min(torch.get_num_threads(), clients))
    if setting > 1 and device != "cpu":
        raise SfedloraError(
            f"simulator.workers={setting} runs clients in forked CPU processes, which cannot share a GPU: "
            "set simulator.workers=1 (or auto) on a GPU"
        )
    return min(int(setting), max(1, clients))


class ClientWorkers:
    """``n`` forked workers holding ``fed``; :meth:`map` runs ``fn(fed, *args)`` in them."""

    def __init__(self, fed, n: int):
        # Fast tokenizers' thread pool does not survive a fork; the workers only pad.
        previous = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        try:
            # A worker the pool forks to replace a dead one gets the same initializer and fed.
            self._pool = multiprocessing.get_context("fork").Pool(n, initializer=_init, initargs=(fed,))
        finally:
            if previous is None:
                del os.environ["TOKENIZERS_PARALLELISM"]
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = previous
        self._processes = list(self._pool._pool)  # the pool would replace a dead one silently
        # Tasks handed out ahead of the one awaited: enough to keep every worker busy,
        # few enough that client states do not pile up in memory.
        self._window = 2 * n

    def map(self, fn: Callable, args: Iterable[tuple]) -> Iterator:
        """``fn(fed, *a)`` for each ``a`` of ``args``, in order, yielded as each is ready."""
        pending: deque = deque()
        args = iter(args)
        while True:
            while len(pending) < self._window and (a := next(args, None)) is not None:
                pending.append(self._pool.apply_async(_apply, (pack((fn, a)),)))
            if not pending:
                return
            yield unpack(self._result(pending.popleft()), trusted=True)

    def _result(self, task) -> bytes:
        # A worker killed mid-task (out of memory, say) never answers, and the pool would
        # wait for it forever: look for one while waiting.
        while True:
            try:
                return task.get(timeout=1.0)
            except multiprocessing.TimeoutError:
                dead = [p.exitcode for p in self._processes if p.exitcode is not None]
                if dead:
                    raise SfedloraError(
                        f"a client worker process died (exit code {dead[0]}; -9 is usually the "
                        "out-of-memory killer): set simulator.workers=1, or free memory, and continue "
                        "the run with --resume"
                    ) from None

    def pids(self) -> list[int]:
        return [p.pid for p in self._processes]

    def close(self) -> None:
        self._pool.terminate()
        self._pool.join()
