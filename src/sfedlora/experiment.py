"""One federated run from a config to a finished run directory: what ``sfedlora run`` calls."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .config import RunConfig
from .data import load_task
from .models import write_tensors
from .rundir import MetricsWriter, check_run_dir, create_run_dir, write_json
from .simulation import Federation, build_federation, simulate


@dataclass
class RunResult:
    run_dir: Path
    records: list[dict]
    summary: dict


def headline(fed: Federation) -> str:
    """The metrics-record key a run is judged by: mean personalised score of the task's metric."""
    return f"personal_{fed.metric}_mean"


def save_adapters(fed: Federation, run_dir: Path) -> list[Path]:
    """The global adapter and/or every client's personalised adapter, in PEFT format."""
    targets = []
    if not fed.method.has_local_state():
        targets.append(("global", fed.global_tensors()))
    else:
        targets += [(f"client_{k:02d}", fed.personal_tensors(k)) for k in range(len(fed.clients))]
    paths = []
    for name, tensors in targets:
        write_tensors(fed.params, tensors)
        path = run_dir / "adapters" / name
        fed.model.save_pretrained(path)
        paths.append(path)
    return paths


def partition_report(fed: Federation) -> dict:
    return {
        "sizes": fed.client_sizes.tolist(),
        "label_histograms": fed.histograms.tolist(),
    }


def run(
    cfg: RunConfig,
    on_start: Callable[[Federation, Path], None] | None = None,
    on_record: Callable[[dict], None] | None = None,
) -> RunResult:
    """Run ``cfg`` on the embedded simulator, writing everything into a new run directory."""
    start = time.perf_counter()
    run_dir = check_run_dir(cfg)
    data = load_task(cfg.data, seed=cfg.seed)
    fed = build_federation(cfg, data)
    create_run_dir(run_dir, cfg)
    write_json(run_dir / "partition.json", partition_report(fed))
    if on_start:
        on_start(fed, run_dir)
    key = headline(fed)
    records = []
    writer = MetricsWriter(run_dir / "metrics.jsonl")
    try:
        for record in simulate(fed):
            writer.write(record)
            records.append(record)
            if on_record:
                on_record(record)
    finally:
        writer.close()
    save_adapters(fed, run_dir)
    scores = [r[key] for r in records if key in r]
    summary = {
        "method": cfg.method,
        "scaling": cfg.scaling,
        "gamma": fed.gamma,
        "metric": key,
        "final": scores[-1] if scores else None,
        "best": max(scores) if scores else None,
        "rounds": cfg.federation.rounds,
        "wall_seconds": time.perf_counter() - start,
    }
    write_json(run_dir / "summary.json", summary)
    return RunResult(run_dir, records, summary)
