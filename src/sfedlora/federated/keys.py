"""The round record's keys: how metrics.jsonl names a score and which way is better.

A round's record (one line of ``metrics.jsonl``) holds the server's numbers (``train_loss``,
``grad_norm_A``, ``update_norm``, ...) and, where the round was evaluated, scores named
``{scope}_{metric}[_{stat}]``: the global model's (``global_accuracy``), the personalised
models' summarised over clients (``personal_accuracy_mean``, ``_min``, and ``_max`` where lower
is better), each client's own test share (``client_test_accuracy_mean``, ``..._weighted``).
Every module that builds or reads such a key (evaluation, collapse detection, the run log,
summaries, tracking, reports) does it through :class:`Key`, so no one parses strings.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Metrics where lower is better; every other metric (accuracy, F1, MCC, correlations) is higher-better.
LOWER_IS_BETTER = ("loss", "perplexity", "mse")
SCOPES = ("client_test", "personal", "global")  # longest first: "client_test" is not "client"
STATS = ("mean", "min", "max", "weighted")
CONSTANT = "constant_predictions"  # a score-like flag: 1.0 where a model predicts one value only
TRAIN_LOSS = "train_loss"


@dataclass(frozen=True)
class Key:
    """One record key: ``scope`` (None for the server's own numbers), ``metric``, ``stat``."""

    scope: str | None
    metric: str
    stat: str | None = None

    @classmethod
    def parse(cls, key: str) -> Key:
        scope = next((s for s in SCOPES if key.startswith(f"{s}_")), None)
        rest = key[len(scope) + 1 :] if scope else key
        stat = next((s for s in STATS if rest.endswith(f"_{s}")), None) if scope else None
        return cls(scope, rest[: -len(stat) - 1] if stat else rest, stat)

    def __str__(self) -> str:
        return "_".join(p for p in (self.scope, self.metric, self.stat) if p)

    @property
    def higher_is_better(self) -> bool:
        return not self.metric.endswith(LOWER_IS_BETTER)

    @property
    def is_score(self) -> bool:
        """A held-out score (global, personalised or client-local), not a server number."""
        return self.scope is not None

    def worst(self) -> Key:
        """The worst client's value of a personalised mean: its min, or its max where lower is better."""
        return Key(self.scope, self.metric, "min" if self.higher_is_better else "max")

    def constant(self) -> Key:
        """The key saying whether the models behind this score predict one value only."""
        return Key(self.scope, CONSTANT, "mean" if self.stat == "mean" else None)


def score_key(metric: str, personalised: bool) -> str:
    """Where ``metric`` is in a round's record: the personalised models' mean, or the global model's."""
    return str(Key("personal", metric, "mean") if personalised else Key("global", metric))


def higher_is_better(key: str) -> bool:
    """Whether larger values of a metric or record key (``personal_perplexity_mean``) are better."""
    return Key.parse(key).higher_is_better


def best_of(values, key: str):
    """The best of ``values`` of metric ``key``: the largest, or the smallest where lower is better."""
    return max(values) if higher_is_better(key) else min(values)


def scoped(scope: str, scores: dict[str, float]) -> dict[str, float]:
    """``scores`` (a metric name or ``{metric}_{stat}`` → value) under ``scope`` in the record."""
    return {f"{scope}_{name}": v for name, v in scores.items()}


def summarise(per_client: list[dict[str, float]]) -> dict[str, float]:
    """Mean and min over clients of each metric: ``{name}_mean``, ``{name}_min``; for metrics
    where lower is better also ``{name}_max``, the worst client. A metric some clients' data
    cannot give (AUROC on a one-label test share) is summarised over the clients that have it."""
    out = {}
    for name in dict.fromkeys(n for m in per_client for n in m):
        values = [m[name] for m in per_client if name in m]
        out[f"{name}_mean"] = float(np.mean(values))
        out[f"{name}_min"] = float(np.min(values))
        if not Key(None, name).higher_is_better:
            out[f"{name}_max"] = float(np.max(values))
    return out
