"""Collapse detection: has a run stopped learning?

A run is flagged as collapsed, at the first round where one of these holds:

1. **non-finite loss**: a client's training loss in a round is NaN or infinite;
2. **no better than the majority class**: an evaluation after the first third of the
   rounds scores no more than ``majority + margin`` (accuracy; 2 points by default), and
   no later evaluation does better (so a slow start that recovers is not a collapse).
   Classification only: regression and causal LMs have no majority class (``majority`` is
   None), so rules 1 and 3 judge them;
3. **vanished A-gradients**: the A-gradient norm falls below ``grad_fraction`` (1e-3) of its
   first recorded value — the signature of γ shrinking the update until A stops moving.

Rule 2 needs the whole history to be final; ``detect`` on a partial history says what is
known so far, which is how the run log flags a collapse as it happens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Collapse:
    round: int
    reason: str
    final: bool = True  # False for rule 2: a later evaluation can still clear it


def _finite(x) -> bool:
    return x is not None and math.isfinite(x)


def detect(
    records: list[dict],
    metric: str,
    majority: float | None,
    total_rounds: int,
    margin: float = 0.02,
    grad_fraction: float = 1e-3,
) -> Collapse | None:
    """The first collapse in ``records`` (metrics.jsonl rows), or None."""
    first_grad = next(
        (r["grad_norm_A"] for r in records if _finite(r.get("grad_norm_A")) and r["grad_norm_A"] > 0), None
    )
    for r in records:
        trained = len(r.get("clients", [])) - len(r.get("dropped", []))
        restored = any(x["reason"].startswith("non-finite training loss") for x in r.get("rejected", []))
        if restored or (trained > 0 and not _finite(r.get("train_loss"))):
            return Collapse(r["round"], "non-finite training loss")
        g = r.get("grad_norm_A")
        if (
            first_grad is not None
            and g is not None
            and (not math.isfinite(g) or g < grad_fraction * first_grad)
        ):
            return Collapse(r["round"], f"A-gradient norm fell below {grad_fraction:g} of its first value")
    if majority is None:
        return None
    late = [r for r in records if r["round"] > total_rounds / 3 and metric in r]
    if late and all(not _finite(r[metric]) or r[metric] <= majority + margin for r in late):
        return Collapse(
            late[0]["round"],
            f"{metric} no better than the majority class ({majority:.3f}) + {margin:g}",
            final=False,
        )
    return None
