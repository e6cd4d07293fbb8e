"""The server's defences: which client updates it refuses to average, and why.

Pure functions over flat name → tensor dicts. Injected faults (for tests and studies of
robustness) live here too, so the corruption and the check that must catch it sit side
by side.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping

import numpy as np
import torch

SCALE = 1e6


def check_update(update: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> str | None:
    """Why ``update`` cannot be averaged with tensors like ``reference`` (names, shapes, dtypes,
    finiteness), or None."""
    if set(update) != set(reference):
        missing = sorted(set(reference) - set(update))
        extra = sorted(set(update) - set(reference))
        return f"wrong tensors (missing {missing[:2]}, unexpected {extra[:2]})"
    for name, t in update.items():
        if not isinstance(t, torch.Tensor) or t.shape != reference[name].shape:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            return f"wrong shape {got} for {name}, expected {tuple(reference[name].shape)}"
        if t.dtype != reference[name].dtype:  # averaging would silently cast it
            return f"wrong dtype {t.dtype} for {name}, expected {reference[name].dtype}"
        if not torch.isfinite(t).all():
            return f"non-finite values in {name}"
    return None


def change_norm(update: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of ``update - reference`` over all its tensors."""
    return float(torch.sqrt(sum(((update[n].double() - reference[n].double()) ** 2).sum() for n in update)))


def norm_outliers(norms: list[float], factor: float) -> list[bool]:
    """Median rule: an update is an outlier when its change norm exceeds ``factor`` × the
    lower median of all norms (the lower median, so that with two updates a huge one is
    judged against the sound one, not against their mean)."""
    if not norms:
        return []
    median = statistics.median_low(norms)
    return [n > factor * median for n in norms]


def corrupt(
    update: dict[str, torch.Tensor],
    reference: Mapping[str, torch.Tensor],
    kind: str,
    rng: np.random.Generator,
) -> dict[str, torch.Tensor]:
    """A faulty copy of ``update``: a NaN or Inf entry, a wrong shape, or the change scaled by 1e6."""
    out = {n: t.clone() for n, t in update.items()}
    name = sorted(out)[int(rng.integers(len(out)))]
    if kind == "nan":
        out[name].view(-1)[0] = float("nan")
    elif kind == "inf":
        out[name].view(-1)[0] = float("inf")
    elif kind == "shape":
        out[name] = torch.cat([out[name], out[name][:1]])
    elif kind == "scale":
        out = {n: reference[n] + SCALE * (t - reference[n]) for n, t in out.items()}
    else:
        raise ValueError(f"unknown fault kind {kind!r}")
    return out
