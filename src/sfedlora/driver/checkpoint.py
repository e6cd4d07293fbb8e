"""Atomic checkpoints of a federation's mutable state, for exact resume.

A checkpoint holds what the config cannot rebuild: the rounds done, the server's global
tensors, every client's state (adapter tensors, optimizer state, RNG, step count) and
the RNGs of client sampling and fault injection, and the privacy ledger and the server's DP
noise RNG. Everything else (model, data split, initial adapter) is rebuilt
from the config with the same seed, so a resumed run continues bit for bit. A Flower run's
checkpoint has no client states: those are on the SuperNodes (node config ``state-dir``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import SfedloraError
from ..federated.client import ClientState, offload_state
from .rundir import atomic_write

CHECKPOINT = "checkpoint.pt"


def save_checkpoint(fed, run_dir: Path, clients: bool = True) -> Path:
    """Checkpoint ``fed``; with ``clients`` False (Flower) only the server's side."""
    state = {
        "round": fed.round,
        "server": fed.server,
        "sampler": fed.sampler.bit_generator.state,
        "fault_rng": fed.fault_rng.bit_generator.state,
        "dp_ledger": torch.from_numpy(fed.dp_ledger),
        "dp_rng": fed.dp_rng.bit_generator.state,
        # Nodes with their own data report their sizes, which later rounds weight by.
        "client_sizes": torch.from_numpy(fed.client_sizes),
    }
    if clients:
        state["clients"] = [
            {"tensors": c.tensors, "rng": c.rng, "optimizer": c.optimizer, "steps": c.steps}
            for c in fed.clients
        ]
    path = run_dir / CHECKPOINT
    atomic_write(path, lambda f: torch.save(state, f))
    return path


def load_checkpoint(fed, run_dir: Path, clients: bool = True) -> None:
    """Restore ``fed`` (freshly built from the run's config) to the checkpointed round;
    ``clients``: whether the runtime resuming it keeps the client states here."""
    path = run_dir / CHECKPOINT
    if not path.is_file():
        raise SfedloraError(
            f"{run_dir} has no {CHECKPOINT}: it stopped before its first round ended; start it again instead"
        )
    try:
        # Into host memory: between turns the clients' states and the server's tensors live there
        # (pinned on a GPU run, by Compute.offload below, as build_federation puts them).
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file
        raise SfedloraError(
            f"checkpoint {path} cannot be read ({type(err).__name__}): the run cannot be resumed"
        ) from None
    if ("clients" in state) != clients:
        wrote, fix = ("the embedded simulator", "without") if "clients" in state else ("Flower", "with")
        raise SfedloraError(f"checkpoint {path} was written by {wrote}: resume it {fix} --runtime flower")
    # Checkpoints from before Flower resume have no sizes: the config's are theirs.
    sizes = state.get("client_sizes", torch.from_numpy(fed.client_sizes)).cpu().numpy()
    if len(sizes) != len(fed.clients) or set(state["server"]) != set(fed.server):
        raise SfedloraError(
            f"checkpoint {path} does not match the run's config (clients or adapter tensors differ)"
        )
    fed.round = state["round"]
    fed.server = fed.compute.offload(state["server"])
    fed.sampler.bit_generator.state = state["sampler"]
    fed.fault_rng.bit_generator.state = state["fault_rng"]
    if "dp_ledger" in state:  # checkpoints from before DP have neither
        fed.dp_ledger = state["dp_ledger"].cpu().numpy()
        fed.dp_rng.bit_generator.state = state["dp_rng"]
    fed.client_sizes = sizes
    if clients:
        fed.clients = [
            offload_state(ClientState(c["tensors"], c["rng"], c["optimizer"], c["steps"]), fed.compute)
            for c in state["clients"]
        ]
