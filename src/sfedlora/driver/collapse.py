"""Collapse detection: has a run stopped learning, diverged, or only failed to generalise?

A run is flagged as collapsed, at the first round where one of these holds:

1. **non-finite loss**: a client's training loss in a round is NaN or infinite;
2. **vanished A-gradients**: the A-gradient norm falls below ``grad_fraction`` (1e-3) of its
   first recorded value — the signature of γ shrinking the update until A stops moving — or
   it sits below ``grad_ratio`` (1e-3) of the B-gradient norm in every round from the start
   (α/r at a high rank makes A's gradient tiny from the first round on, so its own first
   value is no yardstick);
3. **constant predictions**: the last two or more evaluations, all after the first third,
   found every evaluated model predicting one class (one value) for every example;
4. **diverged**: after the first third of the rounds the training loss stays above
   ``diverge_factor`` (1.5) times its first value;
5. **no better than the trivial predictor**: an evaluation after the first third of the
   rounds scores no better than the task's trivial predictor (``trivial``) by ``margin``,
   and no later evaluation does better (so a slow start that recovers is not a collapse).
   The trivial predictor is the task's (:meth:`sfedlora.tasks.Task.trivial_score`): the
   majority class, the constant mean (correlation 0), the model before training.

Rules 4 and 5 judge held-out predictions. When the training loss meanwhile fell well below
its start (under ``overfit_fraction`` of it), the adapter did train: the run is reported as
**overfitting** (kind ``overfit``: not learning anything that generalises), apart from a
collapse. Rules 2–5 need more history to be final; ``detect`` on a partial history says what
is known so far, which is how the run log flags a collapse as it happens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..federated.keys import TRAIN_LOSS, Key

COLLAPSED, OVERFIT = "collapsed", "overfit"


@dataclass(frozen=True)
class Collapse:
    round: int
    reason: str
    final: bool = True  # False where a later round can still clear it
    kind: str = COLLAPSED  # or OVERFIT: the adapter trains, only held-out scores stay trivial


def _finite(x) -> bool:
    return x is not None and math.isfinite(x)


def detect(
    records: list[dict],
    metric: str,
    trivial: float | None,
    total_rounds: int,
    margin: float = 0.02,
    grad_fraction: float = 1e-3,
    grad_ratio: float = 1e-3,
    diverge_factor: float = 1.5,
    overfit_fraction: float = 0.5,
    trivial_name: str = "the majority class",
) -> Collapse | None:
    """The first collapse (or overfitting) in ``records`` (metrics.jsonl rows), or None."""
    first_grad = next(
        (r["grad_norm_A"] for r in records if _finite(r.get("grad_norm_A")) and r["grad_norm_A"] > 0), None
    )
    for r in records:
        trained = len(r.get("clients", [])) - len(r.get("dropped", []))
        restored = any(x["reason"].startswith("non-finite training loss") for x in r.get("rejected", []))
        if restored or (trained > 0 and not _finite(r.get(TRAIN_LOSS))):
            return Collapse(r["round"], "non-finite training loss")
        g = r.get("grad_norm_A")
        if (
            first_grad is not None
            and g is not None
            and (not math.isfinite(g) or g < grad_fraction * first_grad)
        ):
            return Collapse(r["round"], f"A-gradient norm fell below {grad_fraction:g} of its first value")
    both = [r for r in records if _finite(r.get("grad_norm_A")) and _finite(r.get("grad_norm_B"))]
    if len(both) >= 2 and all(r["grad_norm_A"] < grad_ratio * r["grad_norm_B"] for r in both):
        return Collapse(
            both[0]["round"], f"A-gradient norm below {grad_ratio:g} of B's from the start", final=False
        )
    losses = [r[TRAIN_LOSS] for r in records if _finite(r.get(TRAIN_LOSS))]
    late = [r for r in records if r["round"] > total_rounds / 3]
    late_losses = [r[TRAIN_LOSS] for r in late if _finite(r.get(TRAIN_LOSS))]
    learned = bool(losses) and losses[-1] < overfit_fraction * losses[0]
    kind = OVERFIT if learned else COLLAPSED
    why = (
        f" while the training loss fell from {losses[0]:.3g} to {losses[-1]:.3g}: not learning anything "
        "that generalises (overfitting), not a collapse"
        if learned
        else ""
    )
    key = str(Key.parse(metric).constant())
    stretch = []  # the evaluations since the last one with a model that did not predict one value
    for r in records:
        if key in r:
            stretch = [*stretch, r] if r[key] >= 1.0 else []
    if len(stretch) >= 2 and stretch[0]["round"] > total_rounds / 3:
        return Collapse(stretch[0]["round"], f"predictions became constant{why}", final=False, kind=kind)
    if losses and late_losses and all(x > diverge_factor * losses[0] for x in late_losses):
        return Collapse(
            late[0]["round"],
            f"diverged: the training loss rose from {losses[0]:.3g} to {late_losses[-1]:.3g} "
            "and stayed there",
            final=False,
        )
    if trivial is None:
        return None
    judged = [r for r in late if metric in r]
    higher = Key.parse(metric).higher_is_better

    def trivial_at_best(x) -> bool:
        return not _finite(x) or (x <= trivial + margin if higher else x >= trivial - margin)

    if judged and all(trivial_at_best(r[metric]) for r in judged):
        sign = "+" if higher else "-"
        return Collapse(
            judged[0]["round"],
            f"{metric} no better than {trivial_name} ({trivial:.3f}) {sign} {margin:g}{why}",
            final=False,
            kind=kind,
        )
    return None


def judge(records: list[dict], summary: dict) -> Collapse | None:
    """:func:`detect` with the settings a run's ``summary.json`` recorded (older runs wrote
    ``majority_baseline`` and judged classification only)."""
    return detect(
        records,
        summary["collapse_metric"],
        summary.get("trivial_score", summary.get("majority_baseline")),
        summary["rounds"],
        margin=summary.get("collapse_margin", 0.02),
        trivial_name=summary.get("trivial_predictor", "the majority class"),
    )
