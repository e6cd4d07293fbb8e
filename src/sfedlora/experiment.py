"""One federated run from a config to a finished run directory: what ``sfedlora run`` calls."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .checkpoint import CHECKPOINT, load_checkpoint, save_checkpoint
from .collapse import detect
from .config import RunConfig, load_config, result_differences
from .data import load_task
from .errors import SfedloraError
from .evaluation import best_of, higher_is_better
from .rundir import (
    MetricsWriter,
    RunLock,
    check_run_dir,
    create_run_dir,
    jsonable,
    truncate_metrics,
    write_json,
)
from .simulation import Federation, build_federation, simulate

log = logging.getLogger("sfedlora")


@dataclass
class RunResult:
    run_dir: Path
    records: list[dict]
    summary: dict


def headline(fed: Federation) -> str:
    """The metrics-record key a run is judged by: mean personalised score of the task's metric."""
    if fed.cfg.eval.judged_on == "local":
        return "personal_local_accuracy_mean"
    return f"personal_{fed.metric}_mean"


def collapse_metric(fed: Federation) -> str:
    """The accuracy that collapse rule 2 compares with the majority-class baseline."""
    return "personal_local_accuracy_mean" if fed.cfg.eval.judged_on == "local" else "personal_accuracy_mean"


def majority_baseline(fed: Federation) -> float | None:
    """Accuracy of always predicting the most frequent label (None for regression and causal LMs): of the
    dev set, or, judged on local label mixes, of each client's own labels (mean over the evaluated clients)."""
    if fed.num_labels < 2:  # regression, causal LM: no classes
        return None
    if fed.cfg.eval.judged_on == "local":
        hist = fed.histograms[fed.evaluated_clients]
        return float(np.mean(hist.max(axis=1) / hist.sum(axis=1)))
    return float(np.bincount(fed.eval_data.labels, minlength=fed.num_labels).max() / len(fed.eval_data))


def save_adapters(fed: Federation, run_dir: Path) -> list[Path]:
    """The global adapter and/or every client's personalised adapter, in PEFT format;
    with mixed ranks each client's at its own rank and γ (the global one at the highest)."""
    targets: list[tuple[str, int | None]] = []
    if not fed.method.has_local_state():
        targets.append(("global", None))
    if fed.client_models_differ():
        targets += [(f"client_{k:02d}", k) for k in range(len(fed.clients))]
    return [
        fed.ranks.save(
            fed.model,
            fed.params,
            fed.global_tensors() if k is None else fed.personal_tensors(k),
            k,
            run_dir / "adapters" / name,
        )
        for name, k in targets
    ]


def partition_report(fed: Federation) -> dict:
    return {
        "sizes": fed.client_sizes.tolist(),
        "label_histograms": fed.histograms.tolist(),
    }


def _resume_config(run_dir: Path, cfg: RunConfig | None) -> RunConfig:
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        raise SfedloraError(
            f"{run_dir} is not a run directory (no config.yaml): pass the directory a run wrote"
        )
    saved = load_config(saved_path)
    if cfg is not None:
        differing = result_differences(saved, cfg)
        if differing:
            raise SfedloraError(
                f"cannot resume {run_dir} with a config that changes results: {', '.join(differing)} differ "
                "(resume with the run's own config, or start a new run)"
            )
    if (run_dir / "summary.json").is_file():
        raise SfedloraError(f"{run_dir} already finished (it has summary.json): there is nothing to resume")
    return saved if cfg is None else cfg


def run(
    cfg: RunConfig | None,
    on_start: Callable[[Federation, Path], None] | None = None,
    on_record: Callable[[dict], None] | None = None,
    resume: str | Path | None = None,
    rounds: Callable[[Federation], Iterator[dict]] = simulate,
    clients_here: bool = True,
) -> RunResult:
    """Run ``cfg`` on the embedded simulator, writing everything into a new run directory.

    With ``resume``, continue that run directory from its last checkpoint instead (``cfg``
    may then be None; if given, it must not differ from the run's own in a way that
    changes results). ``rounds`` is the runtime that yields each round's record (Flower
    passes its own); with ``clients_here=False`` the clients' state lives elsewhere, so
    there are no checkpoints and only a global adapter is saved.
    """
    start = time.perf_counter()
    if clients_here and cfg is not None and cfg.privacy.secagg:
        raise SfedloraError(
            "privacy.secagg needs the Flower runtime (sfedlora run --runtime flower): "
            "in the embedded simulator the server holds every client's state anyway"
        )
    if resume is not None:
        run_dir = Path(resume)
        cfg = _resume_config(run_dir, cfg)
    else:
        run_dir = check_run_dir(cfg)
    data = load_task(cfg.data, seed=cfg.seed)
    fed = build_federation(cfg, data)
    if resume is None:
        create_run_dir(run_dir, cfg)
    with RunLock(run_dir):
        if resume is not None:
            load_checkpoint(fed, run_dir)
            records = truncate_metrics(run_dir, fed.round)
        else:
            write_json(run_dir / "partition.json", partition_report(fed))
            records = []
        if on_start:
            on_start(fed, run_dir)
        majority, watched = majority_baseline(fed), collapse_metric(fed)
        flagged = any("collapse" in r for r in records)  # a resumed run flagged it already
        writer = MetricsWriter(run_dir / "metrics.jsonl")
        try:
            for record in rounds(fed):
                record = jsonable(record)
                records.append(record)
                collapse = None if flagged else detect(records, watched, majority, cfg.federation.rounds)
                if collapse is not None:
                    flagged = True
                    record["collapse"] = collapse.reason
                    if collapse.final:
                        log.warning("round %d: training collapsed: %s", collapse.round, collapse.reason)
                    else:
                        log.warning(
                            "round %d: training looks collapsed so far: %s (judged again over the whole run "
                            "in summary.json)",
                            collapse.round,
                            collapse.reason,
                        )
                writer.write(record)
                if clients_here and (
                    fed.round % cfg.checkpoint_every == 0 or fed.round == cfg.federation.rounds
                ):
                    save_checkpoint(fed, run_dir)
                if on_record:
                    on_record(record)
        finally:
            writer.close()
        # Without clients here, only what the server holds can be saved (with mixed ranks
        # and no local tensors that includes every client's adapter: a cut of the global one).
        if cfg.save_adapters and (clients_here or not fed.method.has_local_state()):
            save_adapters(fed, run_dir)
        key = headline(fed)
        scores = [r[key] for r in records if r.get(key) is not None]
        collapse = detect(records, watched, majority, cfg.federation.rounds)
        summary = {
            "method": cfg.method,
            "scaling": cfg.scaling,
            "gamma": fed.gamma,
            **fed.ranks.summary(),
            "metric": key,
            "final": scores[-1] if scores else None,
            "best": best_of(scores, key) if scores else None,
            "higher_is_better": higher_is_better(key),
            "rounds": cfg.federation.rounds,
            "majority_baseline": majority,
            "collapse_metric": watched,
            "collapsed": collapse is not None,
            "collapse_round": collapse.round if collapse else None,
            "collapse_reason": collapse.reason if collapse else None,
            "wall_seconds": time.perf_counter() - start,
        }
        if fed.privacy is not None:
            summary.update(
                epsilon=records[-1].get("epsilon_max") if records else 0.0,
                delta=fed.privacy.delta,
                noise_multiplier=float(fed.privacy.noise_multiplier.max()),
            )
        write_json(run_dir / "summary.json", summary)
        # Finished: nothing left to resume, and client states of a large model are big.
        (run_dir / CHECKPOINT).unlink(missing_ok=True)
    return RunResult(run_dir, records, summary)
