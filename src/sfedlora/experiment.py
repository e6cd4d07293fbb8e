"""One federated run from a config to a finished run directory: what ``sfedlora run`` calls."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import CHECKPOINT, load_checkpoint, save_checkpoint
from .collapse import detect
from .config import RunConfig, load_config, result_differences
from .data import load_task
from .errors import SfedloraError
from .evaluation import best_of, higher_is_better
from .federation import Federation, build_federation
from .rundir import (
    MetricsWriter,
    RunLock,
    check_run_dir,
    create_run_dir,
    jsonable,
    truncate_metrics,
    write_json,
)
from .runtime import Runtime, play
from .simulator import Simulator

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


def trivial_score(fed: Federation) -> float | None:
    """The score of the task's trivial predictor, which the collapse rule compares with: the
    majority class of the dev set or, judged on local label mixes, of each evaluated client."""
    return fed.task.trivial_score(
        fed.eval_data, fed.histograms[fed.evaluated_clients], fed.cfg.eval.judged_on
    )


def save_adapters(fed: Federation, run_dir: Path, clients_here: bool = True) -> list[Path]:
    """The global adapter and/or every client's personalised adapter, in PEFT format;
    with mixed ranks each client's at its own rank and γ (the global one at the highest).
    Without the clients here, only what the server holds (with mixed ranks and no local
    tensors that includes every client's adapter: a cut of the global one)."""
    targets: list[tuple[str, int | None]] = []
    if not fed.method.has_local_state():
        targets.append(("global", None))
    if fed.client_models_differ() and (clients_here or not fed.method.has_local_state()):
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
    runtime: Runtime | None = None,
) -> RunResult:
    """Run ``cfg``, writing everything into a new run directory: on the embedded simulator,
    or on ``runtime`` (Flower passes its own).

    With ``resume``, continue that run directory from its last checkpoint instead (``cfg``
    may then be None; if given, it must not differ from the run's own in a way that
    changes results).
    """
    start = time.perf_counter()
    runtime = runtime or Simulator()
    if resume is not None:
        run_dir = Path(resume)
        cfg = _resume_config(run_dir, cfg)
    else:
        run_dir = check_run_dir(cfg)
    runtime.check(cfg)
    fed = build_federation(cfg, load_task(cfg.data, seed=cfg.seed))
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
        _play(fed, runtime, run_dir, records, on_record)
        if cfg.save_adapters:
            save_adapters(fed, run_dir, runtime.clients_here)
        summary = run_summary(fed, records, time.perf_counter() - start)
        write_json(run_dir / "summary.json", summary)
        # Finished: nothing left to resume, and client states of a large model are big.
        (run_dir / CHECKPOINT).unlink(missing_ok=True)
    return RunResult(run_dir, records, summary)


def _play(fed: Federation, runtime: Runtime, run_dir: Path, records: list[dict], on_record) -> None:
    """The rounds: each record flagged for collapse where it shows, logged, checkpointed."""
    cfg = fed.cfg
    trivial, watched = trivial_score(fed), collapse_metric(fed)
    flagged = any("collapse" in r for r in records)  # a resumed run flagged it already
    writer = MetricsWriter(run_dir / "metrics.jsonl")
    try:
        for record in play(fed, runtime):
            record = jsonable(record)
            records.append(record)
            collapse = None if flagged else detect(records, watched, trivial, cfg.federation.rounds)
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
            last = fed.round == cfg.federation.rounds
            if runtime.clients_here and (fed.round % cfg.checkpoint_every == 0 or last):
                save_checkpoint(fed, run_dir)
            if on_record:
                on_record(record)
    finally:
        writer.close()


def run_summary(fed: Federation, records: list[dict], seconds: float) -> dict:
    """What ``summary.json`` says of a finished run."""
    cfg = fed.cfg
    key, watched, trivial = headline(fed), collapse_metric(fed), trivial_score(fed)
    scores = [r[key] for r in records if r.get(key) is not None]
    collapse = detect(records, watched, trivial, cfg.federation.rounds)
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
        "majority_baseline": trivial,
        "collapse_metric": watched,
        "collapsed": collapse is not None,
        "collapse_round": collapse.round if collapse else None,
        "collapse_reason": collapse.reason if collapse else None,
        "wall_seconds": seconds,
    }
    if fed.privacy is not None:
        summary.update(
            epsilon=records[-1].get("epsilon_max") if records else 0.0,
            delta=fed.privacy.delta,
            noise_multiplier=float(fed.privacy.noise_multiplier.max()),
        )
    return summary
