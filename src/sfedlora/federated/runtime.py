"""What a runtime is to a run, and the round loop every runtime shares.

A runtime plays the rounds of a federation: the embedded simulator
(:class:`sfedlora.engine.simulator.Simulator`) calls its clients in this process or in worker
processes; Flower (:class:`sfedlora.flower.server_app.FlowerRounds`) sends them messages.
Both implement :class:`Runtime`; :func:`play` is the loop around them, the same for both:
a round, then an evaluation where one is due.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Protocol

from ..config import RunConfig
from .federation import Federation


class Runtime(Protocol):
    # Whether the clients' state lives in this process: then it is checkpointed (so a run
    # can resume).
    clients_here: bool

    def check(self, cfg: RunConfig) -> None:
        """Refuse, with the setting to change, a config this runtime cannot run."""

    def start(self, fed: Federation) -> None:
        """Set up for ``fed`` (start workers, connect to nodes) before its first round."""

    def play_round(self, fed: Federation) -> dict:
        """The next round; its metrics record (without evaluation)."""

    def evaluate(self, fed: Federation) -> dict:
        """The scores of the global and the personalised models
        (:func:`sfedlora.federated.evaluation.evaluate`)."""

    def close(self) -> None:
        """Release what :meth:`start` set up."""

    def finish(self, fed: Federation) -> bool:
        """End the run after its last round; whether every client's personalised tensors are
        now in ``fed`` (to be saved as adapters)."""


def play(fed: Federation, runtime: Runtime) -> Iterator[dict]:
    """Play the remaining rounds, yielding each round's record (with evaluation where due)."""
    rounds, every = fed.cfg.federation.rounds, fed.cfg.eval.every
    runtime.start(fed)
    try:
        while fed.round < rounds:
            record = runtime.play_round(fed)
            if fed.round % every == 0 or fed.round == rounds:
                start = time.perf_counter()
                record.update(runtime.evaluate(fed))
                record["eval_seconds"] = time.perf_counter() - start
            yield record
    finally:
        runtime.close()
