"""The run directory: resolved config, per-round metrics, summary and final adapters.

    <run>/config.yaml          the fully resolved config (re-runnable as it is)
    <run>/partition.json       each client's size and label histogram
    <run>/metrics.jsonl        one JSON object per round
    <run>/summary.json         final and best metric, wall time
    <run>/adapters/global/     the global adapter (methods without client-local tensors)
    <run>/adapters/client_XX/  each client's personalised adapter (methods with local tensors)

Adapters are in PEFT format: ``PeftModel.from_pretrained(base, path)`` loads them.
"""

from __future__ import annotations

import json
import math
import os
from datetime import datetime
from pathlib import Path

from .config import RunConfig, dump_config
from .errors import SfedloraError


def default_run_name(cfg: RunConfig) -> str:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{cfg.method}-{cfg.data.task}-r{cfg.lora.rank}-n{cfg.federation.n_clients}-s{cfg.seed}-{stamp}"


def check_run_dir(cfg: RunConfig) -> Path:
    """The run directory ``cfg`` asks for, refused if it holds an earlier run.

    Checked before any work starts, so a mistake costs nothing and overwrites nothing.
    """
    path = Path(cfg.output_dir) / (cfg.name or default_run_name(cfg))
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise SfedloraError(f"run directory {path} already exists and is not empty: choose another name= or output_dir=")
    parent = next(p for p in [path, *path.parents] if p.exists())
    if not os.access(parent, os.W_OK):
        raise SfedloraError(f"cannot write the run directory {path}: {parent} is not writable; choose another output_dir=")
    return path


def create_run_dir(path: Path, cfg: RunConfig) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SfedloraError(f"cannot create the run directory {path} ({err.strerror}): choose another output_dir=") from None
    (path / "config.yaml").write_text(dump_config(cfg))
    return path


def _finite(value):
    # JSON has no NaN/Inf; null keeps every line parseable by strict readers.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsWriter:
    """Appends one JSON line per round and flushes it to disk at once."""

    def __init__(self, path: Path):
        self._file = path.open("a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._file.write(json.dumps({k: _finite(v) for k, v in record.items()}) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    with (Path(run_dir) / "metrics.jsonl").open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")
