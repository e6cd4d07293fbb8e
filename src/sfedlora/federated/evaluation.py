"""Evaluation: the global and the personalised models scored on the dev set, and how
per-client scores are summarised. What a score *is* belongs to the task (:mod:`sfedlora.tasks`)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Protocol

import numpy as np
import torch

from .federation import Federation, ServerState
from .jobs import EvalJob
from .keys import Key, scoped, summarise
from .shared import Shared


def outputs_of(shared: Shared, tensors: dict[str, torch.Tensor], k: int | None = None, data=None):
    """What the shared model under client ``k``'s ``tensors`` (None: the global model's)
    produces on ``data`` (by default the dev set), for the task's scores: its adapters combined
    as the method combines them for that model."""
    shared.ranks.load(shared.model, shared.params, tensors, k, shared.method.mix(k, shared.cfg))
    data = shared.eval_data if data is None else data
    return shared.task.outputs(shared.model, data, shared.tokenizer, shared.cfg.eval, shared.compute)


def client_scores(shared: Shared, histogram: np.ndarray, outputs) -> dict[str, float]:
    """A client's scores on the dev set (for classification also under its own label mix)."""
    return shared.task.client_scores(outputs, shared.eval_data, histogram)


class PersonalScores(Protocol):
    """A runtime's way to score its clients' personalised models, which live where the runtime
    keeps the clients' states."""

    def dev(self, fed: ServerState, clients: list[int]) -> list[dict[str, float]]:
        """The scores of each of ``clients`` on the dev set (those it could reach)."""
        ...

    def own_tests(self, fed: ServerState) -> tuple[list[dict[str, float]], list[int]]:
        """Every client's scores on its own held-out share (``eval.client_test_fraction``), and
        the shares' sizes."""
        ...


class Outputs(Protocol):
    def outputs(self, jobs: Iterable[EvalJob]) -> Iterator:
        """The outputs of each job's model on its data, in order."""
        ...


class ScoredHere:
    """Personalised models scored from the client states in ``fed`` (the embedded runtime):
    through ``executor`` (a round executor, which may use worker processes) or, without one,
    here, one after another."""

    def __init__(self, executor: Outputs | None = None):
        self.executor = executor

    def _outputs(self, fed: Federation, jobs: Iterable[EvalJob]) -> Iterator:
        if self.executor:
            return self.executor.outputs(jobs)
        return (outputs_of(fed, j.tensors, j.client, j.data) for j in jobs)

    def dev(self, fed: Federation, clients: list[int]) -> list[dict[str, float]]:
        outputs = self._outputs(fed, (EvalJob(fed.personal_tensors(k), k) for k in clients))
        return [client_scores(fed, fed.histograms[k], o) for k, o in zip(clients, outputs)]

    def own_tests(self, fed: Federation) -> tuple[list[dict[str, float]], list[int]]:
        tests = fed.client_tests
        outputs = self._outputs(fed, [EvalJob(fed.personal_tensors(k), k, t) for k, t in enumerate(tests)])
        return [fed.task.scores(o, t) for t, o in zip(tests, outputs)], [len(t) for t in tests]


def evaluate(fed: ServerState, personal: PersonalScores | None = None) -> dict[str, float | list[int]]:
    """Personalised models (mean/min over the evaluated clients, named in
    ``evaluated_clients`` when not every client) and, where one exists, the global model.

    Every score is on the whole dev set. ``personal`` scores the clients' personalised models
    where the runtime keeps them (by default from ``fed``'s client states, here).
    """
    personal = personal or ScoredHere()
    out: dict[str, float | list[int]] = {}
    global_outputs = None
    if fed.method.has_global_model():
        global_outputs = outputs_of(fed, fed.global_tensors())
        out.update(scoped("global", fed.task.scores(global_outputs, fed.eval_data)))
    if fed.cfg.eval.personalised:
        ks = fed.evaluated_clients
        # Without local tensors (and with one rank) every client's model is the global one: no second pass.
        if not fed.client_models_differ():
            per_client = [client_scores(fed, fed.histograms[k], global_outputs) for k in ks]
        else:
            per_client = personal.dev(fed, ks)
        if per_client:
            out.update(scoped("personal", summarise(per_client)))
        if fed.cfg.eval.client_test_fraction:
            out.update(own_test_summary(fed, *personal.own_tests(fed)))
        if len(ks) < fed.n_clients:
            out["evaluated_clients"] = ks
    return out


def own_test_summary(fed: ServerState, scores: list[dict[str, float]], sizes: list[int]) -> dict[str, float]:
    """FedSA-LoRA's protocol: each client's personalised model scored on its own held-out
    share (``client_test_*``: mean and min over clients, and the headline metric weighted by
    the shares' sizes). Every client, whatever ``eval.clients`` samples for the dev set: the
    shares together are one pass, not one dev set per client."""
    out = scoped("client_test", summarise(scores))
    out[str(Key("client_test", fed.metric, "weighted"))] = float(
        np.average([s[fed.metric] for s in scores], weights=sizes)
    )
    return out
