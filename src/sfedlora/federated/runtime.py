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
from pathlib import Path
from typing import Protocol

import torch

from ..config import RunConfig
from ..data import TaskData
from .federation import ServerState


class Runtime(Protocol):
    def check(self, cfg: RunConfig) -> None:
        """Refuse, with the setting to change, a config this runtime cannot run (changes nothing)."""

    def federation(self, cfg: RunConfig, data: TaskData) -> ServerState:
        """What this runtime's server holds for ``cfg``: the whole federation where the clients
        live in this process, the server's state only where they live elsewhere. Its
        ``state_dict`` is what a checkpoint holds."""

    def start(self, fed: ServerState, run_dir: Path) -> None:
        """Set up for ``fed`` (start workers, connect to nodes) before its first round; the run's
        directory names the run (:func:`sfedlora.driver.rundir.run_key`) to whoever needs it."""

    def play_round(self, fed: ServerState) -> dict:
        """The next round; its metrics record (without evaluation)."""

    def evaluate(self, fed: ServerState) -> dict:
        """The scores of the global and the personalised models
        (:func:`sfedlora.federated.evaluation.evaluate`, with this runtime's personalised scores)."""

    def checkpoint_due(self, fed: ServerState) -> bool:
        """Whether the round just played must be checkpointed (besides ``checkpoint_every`` and
        the last round)."""

    def close(self) -> None:
        """Release what :meth:`start` set up."""

    def finish(self, fed: ServerState) -> dict[int, dict[str, torch.Tensor]]:
        """End the run after its last round; the personalised adapters this runtime can hand
        over (to be saved), by client."""


def play(fed: ServerState, runtime: Runtime, run_dir: Path) -> Iterator[dict]:
    """Play the remaining rounds, yielding each round's record (with evaluation where due)."""
    rounds, every = fed.cfg.federation.rounds, fed.cfg.eval.every
    runtime.start(fed, run_dir)
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
