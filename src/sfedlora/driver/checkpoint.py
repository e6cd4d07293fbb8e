"""Atomic checkpoints of a federation's mutable state, for exact resume.

A checkpoint holds what the config cannot rebuild: the rounds done, the server's global
tensors (with the base change of a method that owns one), every client's state (adapter
tensors, optimizer state, RNG, step count) and
the RNGs of client sampling and fault injection, and the privacy ledger and the server's DP
noise RNG. Everything else (model, data split, initial adapter) is rebuilt
from the config with the same seed, so a resumed run continues bit for bit. A Flower run's
checkpoint has no client states: those are on the SuperNodes (node config ``state-dir``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import SfedloraError, reading
from ..federated.federation import Federation, ServerState
from ..federated.kinds import BASE, tensor_kind
from .rundir import atomic_write

CHECKPOINT = "checkpoint.pt"


def save_checkpoint(fed: ServerState, run_dir: Path) -> Path:
    """Checkpoint ``fed``: the server's state, and every client's where the runtime holds them."""
    path = run_dir / CHECKPOINT
    state = fed.state_dict()
    atomic_write(path, lambda f: torch.save(state, f))
    return path


def load_checkpoint(fed: ServerState, run_dir: Path) -> None:
    """Restore ``fed`` (freshly built from the run's config by the runtime resuming it) to the
    checkpointed round."""
    path = run_dir / CHECKPOINT
    if not path.is_file():
        raise SfedloraError(
            f"{run_dir} has no {CHECKPOINT}: it stopped before its first round ended; start it again instead"
        )
    with reading(path, "checkpoint", "the run cannot be resumed; start it again (or resume a copy of it)"):
        # Into host memory: between turns the clients' states and the server's tensors live there
        # (pinned on a GPU run, by Compute.offload, as the federation's builder puts them).
        state = torch.load(path, map_location="cpu", weights_only=True)
        missing = {"round", "server", "sampler", "fault_rng"} - set(state)
        if missing:
            raise KeyError(", ".join(sorted(missing)))
    if ("clients" in state) != isinstance(fed, Federation):
        wrote, fix = ("the embedded simulator", "without") if "clients" in state else ("Flower", "with")
        raise SfedloraError(f"checkpoint {path} was written by {wrote}: resume it {fix} --runtime flower")
    sizes = state.get("client_sizes")
    # The server's base change (kind ``base``) exists only from the round that made it.
    adapter = {n for n in state["server"] if tensor_kind(n) != BASE}
    if (sizes is not None and len(sizes) != fed.n_clients) or adapter != set(fed.server):
        raise SfedloraError(
            f"checkpoint {path} does not match the run's config (clients or adapter tensors differ)"
        )
    fed.load_state_dict(state)
