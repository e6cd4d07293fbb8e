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

Rules 3 and 5 judge held-out predictions; the training loss says why they stay trivial. The
yardstick is what the task's trivial predictor scores **on the training data**
(``trivial_loss``: each client's label variance for regression, its label prior's
cross-entropy for classification, the model before training for a causal LM; see
:meth:`sfedlora.tasks.Task.trivial_train_loss`). Only when the training loss of the last
rounds (the mean of up to three) is clearly below it — under ``1 - loss_margin`` (0.9) of
it — did the adapter learn something the held-out data does not reward: the run is reported
as **overfitting** (kind ``overfit``), apart from a collapse. A training loss that falls only
from a badly initialised head down to the trivial one is no learning: that run **collapsed**
(not learning). Without a trivial training loss (summaries written before it was recorded)
no run is called overfitting. Rules 2–5 need more history to be final; ``detect`` on a
partial history says what is known so far, which is how the run log flags a collapse as it
happens.
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
    trivial_name: str = "the majority class",
    trivial_loss: float | None = None,
    loss_margin: float = 0.1,
    trivial_loss_name: str = "the trivial predictor",
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
    kind, why = _training_verdict(losses, trivial_loss, loss_margin, trivial_loss_name)
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


def _training_verdict(
    losses: list[float], trivial: float | None, margin: float, name: str
) -> tuple[str, str]:
    """Whether trivial held-out predictions mean overfitting (the training loss of the last
    rounds clearly below the trivial predictor's on the training data) or not learning, and
    the words that say so."""
    if not losses or trivial is None:
        return COLLAPSED, ""
    recent = sum(losses[-3:]) / len(losses[-3:])
    if recent < (1 - margin) * trivial:
        return OVERFIT, (
            f" while the training loss fell to {recent:.3g}, below {name} on the training data "
            f"({trivial:.3g}): overfitting, not a collapse"
        )
    return COLLAPSED, (
        f"; the training loss ({recent:.3g}) never went clearly below {name} on the training data "
        f"({trivial:.3g}): not learning"
    )


def judge(records: list[dict], summary: dict) -> Collapse | None:
    """:func:`detect` with the settings a run's ``summary.json`` recorded (older runs wrote
    ``majority_baseline`` and judged classification only, and recorded no trivial training loss)."""
    return detect(
        records,
        summary["collapse_metric"],
        summary.get("trivial_score", summary.get("majority_baseline")),
        summary["rounds"],
        margin=summary.get("collapse_margin", 0.02),
        trivial_name=summary.get("trivial_predictor", "the majority class"),
        trivial_loss=summary.get("trivial_train_loss"),
        trivial_loss_name=summary.get("trivial_train_predictor", "the trivial predictor"),
    )
