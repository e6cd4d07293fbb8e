"""The work a runtime hands its executor: a client's round to train, a model to score.

Both cross process boundaries whole (a worker's pipe), so they are plain dataclasses of
tensors and numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .client import ClientState


@dataclass
class TrainJob:
    """Client ``client``'s round: its state before the round and what the server sent it."""

    client: int
    state: ClientState
    download: dict[str, torch.Tensor]


@dataclass
class EvalJob:
    """A model to score: adapter ``tensors`` of client ``client`` (None: the global model) on
    ``data`` (None: the dev set)."""

    tensors: dict[str, torch.Tensor]
    client: int | None = None
    data: object = None
