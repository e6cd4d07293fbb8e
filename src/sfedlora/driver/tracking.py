"""Experiment tracking: each round's record sent to TensorBoard or Weights & Biases (``report_to``).

One :class:`Tracker` per backend behind one interface, in the registry :data:`TRACKERS`.
Both are optional packages (the extras ``tensorboard`` and ``wandb``), imported only when a
run asks for them. What is logged is :func:`scalars` of each record: the server's numbers
under ``server/``, the evaluation scores under ``eval/`` and each client's training loss and
gradient norms under ``client/KK/``, so that one client's curve is one plot.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar, Protocol

from ..config import RunConfig
from ..errors import SfedloraError
from ..federated.keys import Key


def scalars(record: dict) -> dict[str, float]:
    """The finite numbers of a round's record, by tracker tag."""
    out = {}
    for key, value in record.items():
        if key == "round" or isinstance(value, bool) or not isinstance(value, int | float):
            continue  # lists of clients, rejection reasons, collapse verdicts: not curves
        out[f"{'eval' if Key.parse(key).is_score else 'server'}/{key}"] = value
    for stats in record.get("client_stats", ()):
        for name, value in stats.items():
            if name != "client":
                out[f"client/{stats['client']:02d}/{name}"] = value
    return {tag: float(v) for tag, v in out.items() if v is not None and math.isfinite(v)}


class Tracker(Protocol):
    """One backend: opened on a run directory (``Backend(run_dir, cfg, first_round)``), given
    each round's scalars, closed at the end."""

    package: ClassVar[str]  # the optional package (and the extra of the same name) it needs

    def log(self, values: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


class TensorBoard:
    """Event files in ``<run>/tensorboard`` (``tensorboard --logdir runs`` shows every run)."""

    package = "tensorboard"

    def __init__(self, run_dir: Path, cfg: RunConfig, first_round: int):
        from torch.utils.tensorboard import SummaryWriter

        # A resumed run replays the rounds after its checkpoint: drop what they logged before.
        self.writer = SummaryWriter(
            run_dir / "tensorboard", purge_step=first_round + 1 if first_round else None
        )

    def log(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()  # a round takes seconds to minutes: show it now, not after flush_secs

    def close(self) -> None:
        self.writer.close()


class WandB:
    """A W&B run in ``<run>/wandb``, offline unless ``WANDB_MODE`` says otherwise
    (``wandb sync <run>/wandb/offline-run-*`` uploads it later)."""

    package = "wandb"

    def __init__(self, run_dir: Path, cfg: RunConfig, first_round: int):
        import wandb

        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "sfedlora"),
            name=run_dir.name,
            dir=str(run_dir),
            config=cfg.model_dump(mode="json"),
            mode=os.environ.get("WANDB_MODE", "offline"),
            # wandb's stdout capture would fight the progress bar for the terminal.
            settings=wandb.Settings(console="off", silent=True),
        )

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


TRACKERS: dict[str, type[Tracker]] = {"tensorboard": TensorBoard, "wandb": WandB}


def check_installed(names: list[str]) -> None:
    """Refuse a backend whose optional package is missing, before a run starts."""
    for name in names:
        package = TRACKERS[name].package
        if importlib.util.find_spec(package) is None:
            raise SfedloraError(
                f"report_to: {name} needs the optional package {package}: "
                f'pip install "sfedlora[{name}]" (from a clone: pip install -e ".[{name}]")'
            )


class Trackers:
    """Every backend a run reports to, as one."""

    def __init__(self, trackers: list[Tracker]):
        self.trackers = trackers

    def log(self, record: dict) -> None:
        if self.trackers:
            values = scalars(record)
            for t in self.trackers:
                t.log(values, record["round"])


@contextlib.contextmanager
def open_trackers(cfg: RunConfig, run_dir: Path, first_round: int = 0) -> Iterator[Trackers]:
    """The backends of ``cfg.report_to`` on ``run_dir``, closed (and flushed) however the run ends.
    ``first_round``: the rounds already done (a resumed run)."""
    check_installed(cfg.report_to)
    with contextlib.ExitStack() as stack:
        opened = []
        for name in cfg.report_to:
            tracker: Tracker = TRACKERS[name](run_dir, cfg, first_round)
            stack.callback(tracker.close)
            opened.append(tracker)
        yield Trackers(opened)
