"""Evaluation: the global and the personalised models scored on the dev set, and how
per-client scores are summarised. What a score *is* belongs to the task (:mod:`sfedlora.tasks`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from .shared import Shared

if TYPE_CHECKING:
    from ..engine.executors import Executor
    from .federation import Federation

# Metrics where lower is better; every other metric (accuracy, F1, MCC, correlations) is higher-better.
LOWER_IS_BETTER = ("loss", "perplexity", "mse")


def higher_is_better(key: str) -> bool:
    """Whether larger values of a metric, or of a metrics-record key built on one
    (``personal_perplexity_mean``, ``train_loss``), are better."""
    return not key.removesuffix("_mean").removesuffix("_min").removesuffix("_max").endswith(LOWER_IS_BETTER)


def best_of(values, key: str):
    """The best of ``values`` of metric ``key``: the largest, or the smallest where lower is better."""
    return max(values) if higher_is_better(key) else min(values)


def summarise(per_client: list[dict[str, float]]) -> dict[str, float]:
    """Mean and min over clients of each metric: ``{name}_mean``, ``{name}_min``; for metrics
    where lower is better also ``{name}_max``, the worst client. A metric some clients' data
    cannot give (AUROC on a one-label test share) is summarised over the clients that have it."""
    out = {}
    for name in dict.fromkeys(n for m in per_client for n in m):
        values = [m[name] for m in per_client if name in m]
        out[f"{name}_mean"] = float(np.mean(values))
        out[f"{name}_min"] = float(np.min(values))
        if not higher_is_better(name):
            out[f"{name}_max"] = float(np.max(values))
    return out


def outputs_of(shared: Shared, tensors: dict[str, torch.Tensor], k: int | None = None, data=None):
    """What the shared model under client ``k``'s ``tensors`` (None: the global model's)
    produces on ``data`` (by default the dev set), for the task's scores."""
    shared.ranks.load(shared.model, shared.params, tensors, k)
    data = shared.eval_data if data is None else data
    return shared.task.outputs(shared.model, data, shared.tokenizer, shared.cfg.eval, shared.compute)


def client_scores(shared: Shared, histogram: np.ndarray, outputs) -> dict[str, float]:
    """A client's scores on the dev set (for classification also under its own label mix)."""
    return shared.task.client_scores(outputs, shared.eval_data, histogram)


def evaluate(
    fed: Federation,
    personal: Callable[[], list[dict[str, float]]] | None = None,
    executor: Executor | None = None,
) -> dict[str, float | list[int]]:
    """Personalised models (mean/min over the evaluated clients, named in
    ``evaluated_clients`` when not every client) and, where one exists, the global model.

    Every score is on the whole dev set. ``personal`` gives the clients' scores where their
    tensors live elsewhere (Flower); by default they are computed from ``fed.clients`` by
    ``executor`` (the round executor's processes; without one, here, one after another).
    """
    out: dict[str, float | list[int]] = {}
    global_outputs = None
    if not fed.method.has_local_state():
        global_outputs = outputs_of(fed, fed.global_tensors())
        out.update({f"global_{k}": v for k, v in fed.task.scores(global_outputs, fed.eval_data).items()})
    if fed.cfg.eval.personalised:
        ks = fed.evaluated_clients
        # Without local tensors (and with one rank) every client's model is the global one: no second pass.
        if not fed.client_models_differ():
            per_client = [client_scores(fed, fed.histograms[k], global_outputs) for k in ks]
        elif personal is not None:
            per_client = personal()
        else:
            jobs = ((fed.personal_tensors(k), k) for k in ks)
            outputs = executor.outputs(jobs) if executor else (outputs_of(fed, *job) for job in jobs)
            per_client = [client_scores(fed, fed.histograms[k], o) for k, o in zip(ks, outputs)]
        if per_client:
            out.update({f"personal_{k}": v for k, v in summarise(per_client).items()})
        if fed.client_tests is not None:
            out.update(own_test_scores(fed, executor))
        if len(ks) < len(fed.clients):
            out["evaluated_clients"] = ks
    return out


def own_test_scores(fed: Federation, executor: Executor | None) -> dict[str, float]:
    """FedSA-LoRA's protocol: each client's personalised model scored on its own held-out
    share (``client_test_*``: mean and min over clients, and the headline metric weighted by
    the shares' sizes). Every client, whatever ``eval.clients`` samples for the dev set: the
    shares together are one pass, not one dev set per client."""
    ks = range(len(fed.clients))
    jobs = [(fed.personal_tensors(k), k, fed.client_tests[k]) for k in ks]
    outputs = executor.outputs(jobs) if executor else (outputs_of(fed, *job) for job in jobs)
    scores = [fed.task.scores(o, fed.client_tests[k]) for k, o in zip(ks, outputs)]
    sizes = [len(fed.client_tests[k]) for k in ks]
    out = {f"client_test_{k}": v for k, v in summarise(scores).items()}
    out[f"client_test_{fed.metric}_weighted"] = float(
        np.average([s[fed.metric] for s in scores], weights=sizes)
    )
    return out
