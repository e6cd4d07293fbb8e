"""One federated run from a config to a finished run directory: what ``sfedlora run`` calls."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import RunConfig, build_config, result_differences
from ..data import load_task
from ..engine.simulator import Simulator
from ..errors import SfedloraError
from ..federated.evaluation import outputs_of
from ..federated.federation import Federation, ServerState
from ..federated.keys import best_of, higher_is_better, score_key
from ..federated.kinds import split_base
from ..federated.runtime import Runtime, play
from ..logs import quiet_libraries, verdict_line
from ..lora.base import save_base_change
from .checkpoint import CHECKPOINT, load_checkpoint, save_checkpoint
from .collapse import COLLAPSED, OVERFIT, judge
from .rundir import (
    MetricsWriter,
    RunLock,
    check_run_dir,
    create_run_dir,
    jsonable,
    read_run_config,
    truncate_metrics,
    write_json,
)
from .tracking import Trackers, check_installed, open_trackers

log = logging.getLogger("sfedlora")


@dataclass
class RunResult:
    run_dir: Path
    records: list[dict]
    summary: dict


def headline(fed: ServerState) -> str:
    """The metrics-record key a run is judged by: the task's metric (personalised mean)."""
    metric = "local_accuracy" if fed.cfg.eval.judged_on == "local" else fed.metric
    return score_key(metric, fed.cfg.eval.personalised)


def collapse_metric(fed: ServerState) -> str:
    """The metrics-record key the collapse rule compares with the task's trivial predictor."""
    return score_key(fed.task.judged_metric(fed.cfg.eval.judged_on), fed.cfg.eval.personalised)


def trivial_score(fed: ServerState) -> float | None:
    """The score of the task's trivial predictor on the collapse metric: the majority class
    (of the dev set, or of each evaluated client's own labels), the constant mean, or the
    model before training (scored here once, only for the tasks that need it)."""

    def initial() -> dict[str, float]:
        return fed.task.scores(outputs_of(fed, fed.initial), fed.eval_data)

    cfg = fed.cfg.eval
    return fed.task.trivial_score(
        fed.eval_data, fed.histograms[fed.evaluated_clients], cfg.judged_on, initial
    )


def trivial_train_loss(fed: ServerState) -> float | None:
    """The task's trivial predictor's loss on the clients' training data, the yardstick of
    the training loss (:mod:`sfedlora.driver.collapse`). A server without the clients' data
    (Flower) knows only their label counts: the tasks that need more give None there."""
    return fed.task.trivial_train_loss(
        fed.client_data if isinstance(fed, Federation) else None,
        fed.histograms,
        lambda data: outputs_of(fed, fed.initial, data=data),
    )


def save_adapters(
    fed: ServerState, run_dir: Path, personal: dict[int, dict[str, torch.Tensor]] | None = None
) -> list[Path]:
    """The global adapter and/or the clients' personalised adapters (``personal``, by client;
    by default every client's in ``fed``), in PEFT format; with mixed ranks each client's at
    its own rank and γ (the global one at the highest). A base change the method made, the
    same for every adapter, is saved once beside them (:data:`sfedlora.lora.base.BASE_FILE`)."""
    _, base = split_base(fed.server)
    if base:
        save_base_change(run_dir / "adapters", base)
    if personal is None:
        personal = {k: fed.personal_tensors(k) for k in range(fed.n_clients)}
    targets: list[tuple[str, int | None, dict]] = []
    if fed.method.has_global_model():
        targets.append(("global", None, fed.global_tensors()))
    if fed.client_models_differ():
        targets += [(f"client_{k:02d}", k, tensors) for k, tensors in sorted(personal.items())]
    return [
        fed.ranks.save(
            fed.model, fed.params, tensors, k, run_dir / "adapters" / name, fed.method.mix(k, fed.cfg)
        )
        for name, k, tensors in targets
    ]


def partition_report(fed: ServerState) -> dict:
    return {
        "sizes": fed.client_sizes.tolist(),
        "label_histograms": fed.histograms.tolist(),
    }


def resume_config(run_dir: Path, cfg: RunConfig | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """The config a resumed run goes on with, for every runtime: its own (``config.yaml``, with
    ``overrides`` where given), or ``cfg``, where either changes no result."""
    saved = read_run_config(run_dir)
    if cfg is None and overrides:
        cfg = build_config(saved.model_dump(mode="json"), list(overrides))
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
    on_start: Callable[[ServerState, Path], None] | None = None,
    on_record: Callable[[dict], None] | None = None,
    resume: str | Path | None = None,
    runtime: Runtime | None = None,
) -> RunResult:
    """Run ``cfg``, writing everything into a new run directory: on the embedded simulator,
    or on ``runtime`` (Flower passes its own).

    With ``resume``, continue that run directory from its last checkpoint instead (``cfg``
    may then be None; if given, it must not differ from the run's own in a way that
    changes results).

    The libraries' load reports and progress bars stay silent during the run, as under the
    CLI, and the caller's own logging settings are put back after it.
    """
    with quiet_libraries():
        return _run(cfg, on_start, on_record, resume, runtime)


def _run(cfg, on_start, on_record, resume, runtime) -> RunResult:
    start = time.perf_counter()
    runtime = runtime or Simulator()
    if resume is not None:
        run_dir = Path(resume)
        cfg = resume_config(run_dir, cfg)
    else:
        run_dir = check_run_dir(cfg)
    runtime.check(cfg)
    check_installed(cfg.report_to)
    fed = runtime.federation(cfg, load_task(cfg.data, seed=cfg.seed))
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
        settings = _collapse_settings(fed)
        with open_trackers(cfg, run_dir, fed.round) as trackers:
            _play(fed, runtime, run_dir, records, on_record, settings, trackers)
        personal = runtime.finish(fed)
        if cfg.save_adapters:
            save_adapters(fed, run_dir, personal)
        summary = run_summary(fed, records, settings, time.perf_counter() - start)
        write_json(run_dir / "summary.json", summary)
        # Finished: nothing left to resume, and client states of a large model are big.
        (run_dir / CHECKPOINT).unlink(missing_ok=True)
    return RunResult(run_dir, records, summary)


def _play(
    fed: ServerState,
    runtime: Runtime,
    run_dir: Path,
    records: list[dict],
    on_record,
    settings: dict,
    trackers: Trackers,
) -> None:
    """The rounds: each record flagged for collapse where it shows, logged, tracked, checkpointed."""
    cfg = fed.cfg
    flagged = any("collapse" in r or "overfit" in r for r in records)  # a resumed run flagged it already
    writer = MetricsWriter(run_dir / "metrics.jsonl")
    try:
        for record in play(fed, runtime, run_dir):
            record = jsonable(record)
            records.append(record)
            verdict = None if flagged else judge(records, settings)
            if verdict is not None:
                flagged = True
                overfit = verdict.kind == OVERFIT
                record["overfit" if overfit else "collapse"] = verdict.reason
                log.warning(verdict_line(verdict.round, overfit, verdict.final, verdict.reason))
            writer.write(record)
            trackers.log(record)
            last = fed.round == cfg.federation.rounds
            if fed.round % cfg.checkpoint_every == 0 or last or runtime.checkpoint_due(fed):
                save_checkpoint(fed, run_dir)
            if on_record:
                on_record(record)
    finally:
        writer.close()


def _collapse_settings(fed: ServerState) -> dict:
    """What the collapse rule judges a run by, as summary.json records it (:func:`collapse.judge`)."""
    trivial = trivial_score(fed)
    return {
        "collapse_metric": collapse_metric(fed),
        "trivial_predictor": fed.task.trivial_name,
        "trivial_score": trivial,
        "collapse_margin": None if trivial is None else fed.task.collapse_margin(fed.eval_data, trivial),
        "trivial_train_predictor": fed.task.trivial_train_name,
        "trivial_train_loss": trivial_train_loss(fed),
        "rounds": fed.cfg.federation.rounds,
    }


def run_summary(fed: ServerState, records: list[dict], settings: dict, seconds: float) -> dict:
    """What ``summary.json`` says of a finished run."""
    cfg = fed.cfg
    key = headline(fed)
    scores = [r[key] for r in records if r.get(key) is not None]
    verdict = judge(records, settings)
    collapse = verdict if verdict is not None and verdict.kind == COLLAPSED else None
    overfit = verdict if verdict is not None and verdict.kind == OVERFIT else None
    summary = {
        "method": cfg.method,
        "scaling": cfg.scaling,
        "gamma": fed.ranks.gamma(),
        **fed.ranks.summary(),
        "metric": key,
        "final": scores[-1] if scores else None,
        "best": best_of(scores, key) if scores else None,
        "higher_is_better": higher_is_better(key),
        **settings,
        "collapsed": collapse is not None,
        "collapse_round": collapse.round if collapse else None,
        "collapse_reason": collapse.reason if collapse else None,
        "overfit": overfit is not None,
        "overfit_reason": overfit.reason if overfit else None,
        "wall_seconds": seconds,
    }
    if isinstance(fed, Federation) and fed.client_tests is not None and fed.task.has_classes:
        # The client-local protocol's trivial predictor: each client answers its own training
        # data's majority label. Under a label skew it scores high with nothing learned.
        summary["client_test_majority_accuracy"] = float(
            np.mean([np.mean(t.labels == h.argmax()) for t, h in zip(fed.client_tests, fed.histograms)])
        )
    if fed.privacy is not None:
        summary.update(
            epsilon=records[-1].get("epsilon_max") if records else 0.0,
            delta=fed.privacy.delta,
            noise_multiplier=float(fed.privacy.noise_multiplier.max()),
        )
    return summary
