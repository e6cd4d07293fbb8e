"""What a SuperNode keeps on its own disk: its client's state between rounds, and its data.

Node config keys (``flower-supernode --node-config "partition-id=3 state-dir='/var/sfedlora'
data-dir='/data/sst2'"``):

- ``state-dir``: the client's state (adapter tensors, optimizer state, RNG, step count) is
  written there atomically after every round it trains, with the run's key (made once per run
  directory, so it outlives a ServerApp restart, which Flower sees as a new run), the client
  and the round, so a node process that is killed and started again continues with its own
  B instead of the initial one; a file from another run is never used. The state before the
  latest round is kept too: a resumed ServerApp replays the round it was in. The node's
  personalised adapter is saved there at the end of the run (``adapters/client_KK``). For a
  method that changes the base, the base change ΔW the node holds and its round are kept
  beside it (``base_change.pt``), so that a node started again catches up from there.
- ``data-dir``: the node trains on the files on its own disk, in the layout the run's
  ``data.source`` reads (GLUE ``train.tsv`` / ``dev.tsv``; for ``data.source=files`` files
  named as the run's ``data.train_file`` / ``data.eval_file``), instead of taking its
  partition of the run's whole dataset.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from ..config import DataConfig
from ..driver.rundir import atomic_write
from ..errors import SfedloraError, reading
from ..federated.client import ClientState

log = logging.getLogger("sfedlora")

STATE_FILE = "client_state.pt"
PREVIOUS_FILE = "client_state.previous.pt"
HELD_FILE = "base_change.pt"


def state_file(node_config) -> Path | None:
    """Where this node keeps its client's state, or None without ``state-dir``."""
    if "state-dir" not in node_config:
        return None
    directory = Path(str(node_config["state-dir"])).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    return directory / STATE_FILE


def _read(path: Path) -> dict | None:
    if not path.is_file():
        return None
    with reading(path, "node state", "delete it to start this client afresh"):
        state = torch.load(path, weights_only=True)
        missing = {"run", "client", "round", "tensors", "rng", "optimizer", "steps"} - set(state)
        if missing:
            raise KeyError(", ".join(sorted(missing)))
    return state


def save_state_file(path: Path, run: str, client: int, round_: int, state: ClientState) -> None:
    record = {"run": run, "client": client, "round": round_, **state.state_dict()}
    current = _read(path)
    if current is not None and current.get("run") == run and current["round"] < round_:
        # Kept for a replay of this round by a resumed ServerApp. A crash before the new file
        # is in place leaves the previous one: the state this round started from.
        os.replace(path, path.with_name(PREVIOUS_FILE))
    atomic_write(path, lambda f: torch.save(record, f))


def load_state_file(path: Path, run: str, client: int, round_: int, training: bool) -> ClientState | None:
    """The state of ``client`` saved by this node in run ``run`` that round ``round_`` builds
    on (training: the state after an earlier round; scoring: after this round at the latest),
    or None where this run has none (the client starts from its initial state). A saved state
    of a later round, or of another client, means the node and the server disagree about the
    run, which is refused."""
    saved = [s for s in (_read(path), _read(path.with_name(PREVIOUS_FILE))) if s and s.get("run") == run]
    if not saved:
        if path.is_file():
            log.info("node state %s is from another run: starting client %d afresh", path, client)
        return None
    saved.sort(key=lambda s: -s["round"])
    newest, latest = saved[0], round_ - 1 if training else round_
    # A resumed ServerApp replays the round it stopped in, which this node may have trained.
    replay = training and newest["round"] == round_
    if newest["client"] != client or (newest["round"] > latest and not replay):
        raise SfedloraError(
            f"node state {path} holds client {newest['client']} after round {newest['round']}, but the "
            f"server asks client {client} for round {round_}: give each node its own state-dir"
        )
    usable = [s for s in saved if s["round"] <= latest]
    if replay:
        log.info(
            "round %d again (the server resumed): client %d goes on from its earlier state", round_, client
        )
    if not usable:  # a replay of the client's first round
        return None
    return ClientState.from_state_dict(usable[0])


def save_held_file(directory: Path, run: str, round_: int, change: dict[str, torch.Tensor]) -> None:
    """Keep ΔW as of round ``round_`` of run ``run``, the base change the node holds."""
    atomic_write(
        directory / HELD_FILE, lambda f: torch.save({"run": run, "round": round_, "change": change}, f)
    )


def load_held_file(directory: Path, run: str) -> tuple[int, dict[str, torch.Tensor]] | None:
    """(round, ΔW) the node kept in run ``run``, or None (the server then sends the whole)."""
    path = directory / HELD_FILE
    if not path.is_file():
        return None
    with reading(path, "node base change", "delete it: the server then sends the whole base change"):
        held = torch.load(path, weights_only=True)
        missing = {"run", "round", "change"} - set(held)
        if missing:
            raise KeyError(", ".join(sorted(missing)))
    return (held["round"], held["change"]) if held["run"] == run else None


def local_data(data: DataConfig, node_config) -> DataConfig | None:
    """The run's data settings pointed at this node's ``data-dir``, or None without one."""
    if "data-dir" not in node_config:
        return None
    directory = Path(str(node_config["data-dir"])).expanduser()
    if not directory.is_dir():
        raise SfedloraError(
            f"node config data-dir {directory} is not a directory: point it at this node's data"
        )
    if data.source in ("bundled", "tsv"):
        return data.model_copy(update={"source": "tsv", "data_dir": str(directory)})
    if data.source == "files":
        names = {"train_file": data.train_file, "eval_file": data.eval_file}
        return data.model_copy(update={k: str(directory / Path(v).name) for k, v in names.items() if v})
    raise SfedloraError(
        f"node config data-dir reads files, and the run reads data.source={data.source}: use data.source=tsv "
        "or files"
    )
