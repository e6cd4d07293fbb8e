"""Study v2's cells as rows (see scripts/study_v2.py): read from their run directories, and
from the record a report leaves in git (``cells.json``) for cells whose run directory is not
on this machine (``runs/`` is not committed; a new checkout continues from the record).

Scores: ``client_test`` is the mean over clients of each personalised model's accuracy on
its own client's held-out share (FedSA-LoRA's protocol); under the Dirichlet(0.5) label skew
each client's own majority label already scores high there (``majority``). ``dev_auroc``
is the mean over a fixed sample of 3 clients (5 in the budget part) of their personalised models' AUROC on 300
balanced SST-2 dev sentences: it ranks sentences by the model's margin, so a model's bias
toward its client's label does not move it; it scores what the model knows of sentiment.
``dev`` is their accuracy there. "Final" is the last evaluation.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from sfedlora.errors import SfedloraError
from sfedlora.results.record import read_record as read_file
from sfedlora.results.record import read_run

RATES = [0.05, 0.2, 0.8]
TARGET = 0.80  # the budget part's question: does dev AUROC reach it within 40 rounds?
# Convergence in the main grid: the first evaluated round at which a cell's client-test
# accuracy comes within this of answering each client's own majority label, i.e. the
# personal models have learned their clients' label mix (the score every working cell reaches
# at this budget; dev AUROC falls as they do, so it has no target to reach).
PRIOR_GAP = 0.02
# What learning rates and exponent pairs are chosen by: the client-local protocol, the one
# FedSA-LoRA is built for. Dev AUROC falls as a personalised model fits its client's skewed
# data (tune part), so choosing by it would favour the rate that changes the model least.
HEADLINE = "client_test"
CLIENT_TEST = "client_test_accuracy_mean"
DEV = "personal_accuracy_mean"
DEV_AUROC = "personal_auroc_mean"


# What every row of the record holds that the scripts read by name.
ROW_KEYS = frozenset({"sweep", "cell", "client_test"})


def _row(run_dir: Path) -> dict:
    run = read_run(run_dir)
    cfg, records, summary = run.config, run.metrics, run.summary
    evals = [r for r in records if r.get(CLIENT_TEST) is not None]
    lora, fed = cfg["lora"], cfg["federation"]
    majority = summary.get("client_test_majority_accuracy")
    norms = {k: [r[k] for r in records if r.get(k) is not None] for k in ("grad_norm_A", "grad_norm_B")}
    return {
        "sweep": run_dir.parents[1].name,
        "cell": run_dir.name,
        "method": cfg["method"],
        "scaling": lora["scaling"],
        "a": lora.get("n_exponent"),
        "b": lora.get("rank_exponent"),
        "rank": lora["rank"],
        "clients": fed["n_clients"],
        "lr": cfg["train"]["lr"],
        "optimizer": cfg["train"]["optimizer"],
        "partition": cfg["partition"]["kind"],
        "seed": cfg["seed"],
        "rounds": fed["rounds"],
        "local_head": fed["local_head"],
        "head_only": fed["head_probe_rounds"] == fed["rounds"],
        "majority": majority,
        "curve": [(r["round"], r[CLIENT_TEST], r.get(DEV_AUROC, math.nan)) for r in evals],
        "client_test": evals[-1][CLIENT_TEST] if evals else math.nan,
        # Seeds draw different partitions, hence different label priors: the gain over the
        # prior compares cells across seeds and splits.
        "over_majority": evals[-1][CLIENT_TEST] - majority if evals and majority is not None else math.nan,
        "client_test_min": evals[-1].get("client_test_accuracy_min", math.nan) if evals else math.nan,
        "dev": evals[-1].get(DEV, math.nan) if evals else math.nan,
        "dev_auroc": evals[-1].get(DEV_AUROC, math.nan) if evals else math.nan,
        "rounds_to_target": next((r["round"] for r in evals if r.get(DEV_AUROC, 0) >= TARGET), None),
        "rounds_to_prior": next((r["round"] for r in evals if r[CLIENT_TEST] >= majority - PRIOR_GAP), None)
        if majority is not None
        else None,
        # The run's mean over rounds: one round's norm moves with its batches.
        "grad_norm_A": float(np.mean(norms["grad_norm_A"])) if norms["grad_norm_A"] else None,
        "grad_norm_B": float(np.mean(norms["grad_norm_B"])) if norms["grad_norm_B"] else None,
        "train_loss": records[-1].get("train_loss") if records else None,
        # Traffic of the last round (the adapter's rounds, after any head probe), all clients.
        "bytes_down": records[-1].get("bytes_down") if records else None,
        "bytes_up": records[-1].get("bytes_up") if records else None,
        "wall_seconds": summary["wall_seconds"],
    }


def read_record(path: Path) -> list[dict]:
    """The cells a report recorded (``cells.json``), or none where there is no record yet."""
    if not Path(path).is_file():
        return []
    rows = read_file(path)
    if not isinstance(rows, list) or not all(isinstance(r, dict) and ROW_KEYS <= r.keys() for r in rows):
        raise SfedloraError(
            f"record {path} is not study v2's cells (rows each with {', '.join(sorted(ROW_KEYS))}): "
            f"restore it (git checkout -- {path}) or write it again with scripts/study_v2.py report"
        )
    return rows


def load_part(out: Path, prefix: str, record: list[dict] = ()) -> list[dict]:
    """Every finished cell of the sweeps ``out/<prefix>*``, and every cell of the record in
    such a sweep that has no finished run here (a run directory, when present, is the truth)."""
    rows = [
        _row(summary.parent)
        for sweep in sorted(Path(out).glob(f"{prefix}*"))
        for summary in sorted(sweep.glob("runs/*/summary.json"))
    ]
    here = {(r["sweep"], r["cell"]) for r in rows}
    rows += [r for r in record if r["sweep"].startswith(prefix) and (r["sweep"], r["cell"]) not in here]
    return sorted(rows, key=lambda r: (r["sweep"], r["cell"]))


def score(row: dict) -> float:
    """The score learning rates and exponent pairs are chosen by (``HEADLINE``)."""
    value = row[HEADLINE]
    return -math.inf if value is None or math.isnan(value) else value


def best_lr(rows: list[dict]) -> float:
    return max(rows, key=score)["lr"]


def group(rows: list[dict], *keys: str) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for row in rows:
        out.setdefault(tuple(row[k] for k in keys), []).append(row)
    return out
