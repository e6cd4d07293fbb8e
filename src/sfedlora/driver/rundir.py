"""The run directory: resolved config, per-round metrics, summary and final adapters.

    <run>/config.yaml          the fully resolved config (re-runnable as it is)
    <run>/partition.json       each client's size and label histogram
    <run>/metrics.jsonl        one JSON object per round
    <run>/summary.json         final and best metric, wall time
    <run>/adapters/global/     the global adapter (methods without client-local tensors)
    <run>/adapters/client_XX/  each client's personalised adapter (methods with local tensors)
    <run>/tensorboard/, wandb/ the report_to backends' logs (sfedlora.driver.tracking)
    <run>/run_key              a Flower run's identity, which its SuperNodes key their saved state by

Adapters are in PEFT format: ``PeftModel.from_pretrained(base, path)`` loads them.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import threading
import uuid
from datetime import datetime
from pathlib import Path

import yaml

from ..config import RunConfig, build_config, dump_config, read_yaml_mapping
from ..errors import SfedloraError, reading


def default_run_name(cfg: RunConfig) -> str:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{cfg.method}-{cfg.data.task}-r{cfg.lora.rank}-n{cfg.federation.n_clients}-s{cfg.seed}-{stamp}"


def check_run_dir(cfg: RunConfig) -> Path:
    """The run directory ``cfg`` asks for, refused if it holds an earlier run.

    Checked before any work starts, so a mistake costs nothing and overwrites nothing.
    """
    path = Path(cfg.output_dir) / (cfg.name or default_run_name(cfg))
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise SfedloraError(
            f"run directory {path} already exists and is not empty: choose another name= or output_dir="
        )
    parent = next(p for p in [path, *path.parents] if p.exists())
    if not parent.is_dir():
        raise SfedloraError(
            f"cannot create the run directory {path}: {parent} is a file; choose another output_dir="
        )
    if not os.access(parent, os.W_OK):
        raise SfedloraError(
            f"cannot write the run directory {path}: {parent} is not writable; choose another output_dir="
        )
    return path


def create_run_dir(path: Path, cfg: RunConfig) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SfedloraError(
            f"cannot create the run directory {path} ({err.strerror}): choose another output_dir="
        ) from None
    (path / "config.yaml").write_text(dump_config(cfg))
    return path


@contextlib.contextmanager
def ctrl_c_deferred():
    """Hold back Ctrl-C until the block is done, then deliver it to the handler there was.

    torch.save's C++ writer turns a KeyboardInterrupt raised inside it into a RuntimeError
    traceback; a checkpoint being written should finish and the interrupt come right after.
    """
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or previous in (signal.SIG_IGN, None):
        # Signals reach the main thread only; ignored stays ignored; a C-level handler is not ours to swap.
        yield
        return
    caught = []
    signal.signal(signal.SIGINT, lambda *_: caught.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            signal.raise_signal(signal.SIGINT)


def atomic_write(path: Path, write) -> None:
    """Write through ``write(file)`` to a temp file, fsync it, then rename over ``path``.

    A crash at any point leaves either the old file or the new one, never a torn one;
    Ctrl-C waits until the new one is in place.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    with ctrl_c_deferred():
        with tmp.open("wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def run_key(run_dir: Path) -> str:
    """The run's identity, made once and kept in the run directory: a resumed Flower run is a
    new Flower run (a new run id), and its SuperNodes must still find their clients' state."""
    path = run_dir / "run_key"
    if not path.is_file():
        atomic_write(path, lambda f: f.write(uuid.uuid4().hex.encode()))
    return path.read_text().strip()


def jsonable(record: dict) -> dict:
    """The record as metrics.jsonl stores it: NaN and Inf become None (JSON has neither;
    null keeps every line parseable by strict readers)."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}


class MetricsWriter:
    """Appends one JSON line per round and flushes it to disk at once."""

    def __init__(self, path: Path):
        self._file = path.open("a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(jsonable(record)) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


# How to recover a finished run's file that sfedlora cannot read back.
RESTORE = "restore it from a copy, or run the run again"


def read_metrics(run_dir: str | Path) -> list[dict]:
    """metrics.jsonl's records: one JSON object per round, rounds 1, 2, ... in order."""
    path = Path(run_dir) / "metrics.jsonl"
    with reading(path, "metrics", RESTORE):
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        for i, record in enumerate(records, start=1):
            if record["round"] != i:
                raise ValueError(f"line {i} is round {record['round']}")
    return records


def read_json(path: Path, what: str, fix: str = RESTORE, key: str | None = None) -> dict:
    """A JSON object sfedlora wrote (holding ``key``, where given)."""
    with reading(path, what, fix):
        obj = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(obj, dict) or (key is not None and key not in obj):
            raise ValueError(f"no {key}")
    return obj


def read_summary(run_dir: str | Path) -> dict:
    return read_json(Path(run_dir) / "summary.json", "summary", key="metric")


def _flat_keys(tree: dict, prefix: str = "") -> set[str]:
    out = set()
    for key, value in tree.items():
        out |= _flat_keys(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}"}
    return out


def read_run_config(run_dir: str | Path) -> RunConfig:
    """The run's own config.yaml. It holds every key (a run writes the resolved config), so a
    key missing means a file cut short or written by an older sfedlora: refused, since
    today's default may not be what the run used."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise SfedloraError(
            f"{run_dir} is not a run directory (no config.yaml): pass the directory a run wrote"
        )
    tree = read_yaml_mapping(path)
    try:
        cfg = build_config(tree)
    except SfedloraError as err:
        raise SfedloraError(
            f"run config {path} is damaged, truncated or from another version ({err}): {RESTORE}"
        ) from None
    missing = sorted(_flat_keys(yaml.safe_load(dump_config(cfg))) - _flat_keys(tree))
    if missing:
        keys = ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else "")
        raise SfedloraError(
            f"run config {path} lacks {keys}: it was cut short or written by an older sfedlora; "
            f"{RESTORE} (or add the keys with the values the run used)"
        )
    return cfg


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


class RunLock:
    """``<run>/.lock`` holding the owner's PID, so two processes never write one run.

    A lock left by a process that no longer exists (a crash, SIGKILL) is taken over.
    """

    def __init__(self, run_dir: Path):
        self.path = run_dir / ".lock"

    def __enter__(self) -> RunLock:
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                owner = self._owner()
                if owner is not None and owner != os.getpid() and _alive(owner):
                    raise SfedloraError(
                        f"run directory {self.path.parent} is in use by process {owner}: "
                        "wait for it or stop it"
                    ) from None
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            return self
        raise SfedloraError(
            f"could not lock run directory {self.path.parent}: remove {self.path} if no run uses it"
        )

    def _owner(self) -> int | None:
        try:
            return int(self.path.read_text().strip())
        except (OSError, ValueError):
            return None

    def __exit__(self, *exc) -> None:
        self.path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def truncate_metrics(run_dir: Path, rounds_done: int) -> list[dict]:
    """Keep the metrics lines of the first ``rounds_done`` rounds, byte for byte.

    A crash after a round's line was written but before its checkpoint, or in the middle
    of a line, leaves lines that the resumed run will write again: they are dropped.
    """
    path = run_dir / "metrics.jsonl"
    lines = path.read_bytes().splitlines(keepends=True) if path.exists() else []
    kept, records = [], []
    for line in lines[:rounds_done]:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            break
        if not line.endswith(b"\n") or record.get("round") != len(kept) + 1:
            break
        kept.append(line)
        records.append(record)
    if len(kept) != rounds_done:
        raise SfedloraError(
            f"{path} holds {len(kept)} complete rounds but the checkpoint {rounds_done}: the run cannot be "
            f"resumed; delete {run_dir} to run it again from the start"
        )
    atomic_write(path, lambda f: f.write(b"".join(kept)))
    return records
