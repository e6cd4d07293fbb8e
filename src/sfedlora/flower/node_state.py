"""What a SuperNode keeps on its own disk: its client's state between rounds, and its data.

Node config keys (``flower-supernode --node-config "partition-id=3 state-dir='/var/sfedlora'
data-dir='/data/sst2'"``):

- ``state-dir``: the client's state (adapter tensors, optimizer state, RNG, step count) is
  written there atomically after every round it trains, with the Flower run id, the client
  and the round, so a node process that is killed and started again continues with its own
  B instead of the initial one; a file from another run is never used. The node's
  personalised adapter is saved there at the end of the run (``adapters/client_KK``).
- ``data-dir``: the node trains on the files on its own disk, in the layout the run's
  ``data.source`` reads (GLUE ``train.tsv`` / ``dev.tsv``; for ``data.source=files`` files
  named as the run's ``data.train_file`` / ``data.eval_file``), instead of taking its
  partition of the run's whole dataset.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..client import ClientState
from ..config import DataConfig
from ..errors import SfedloraError
from ..rundir import atomic_write

log = logging.getLogger("sfedlora")

STATE_FILE = "client_state.pt"


def state_file(node_config) -> Path | None:
    """Where this node keeps its client's state, or None without ``state-dir``."""
    if "state-dir" not in node_config:
        return None
    directory = Path(str(node_config["state-dir"])).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    return directory / STATE_FILE


def save_state_file(path: Path, run_id: int, client: int, round_: int, state: ClientState) -> None:
    record = {"run_id": run_id, "client": client, "round": round_, "tensors": state.tensors, "rng": state.rng}
    record.update(optimizer=state.optimizer, steps=state.steps)
    atomic_write(path, lambda f: torch.save(record, f))


def load_state_file(path: Path, run_id: int, client: int, before_round: int) -> ClientState | None:
    """The state saved by this node for ``client`` in run ``run_id``, or None where there is
    none of this run. A state from round ``before_round`` or later cannot be one this round
    builds on: the node and the server disagree about the run, which is refused."""
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, weights_only=True)
    except Exception as err:  # a foreign or damaged file
        raise SfedloraError(
            f"node state {path} cannot be read ({type(err).__name__}): delete it to start this client afresh"
        ) from None
    if saved["run_id"] != run_id:
        log.info(
            "node state %s is from run %s, not %s: starting this client afresh", path, saved["run_id"], run_id
        )
        return None
    if saved["client"] != client or saved["round"] >= before_round:
        raise SfedloraError(
            f"node state {path} holds client {saved['client']} after round {saved['round']}, but the server "
            f"asks client {client} for round {before_round}: give each node its own state-dir"
        )
    return ClientState(saved["tensors"], saved["rng"], saved["optimizer"], saved["steps"])


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
