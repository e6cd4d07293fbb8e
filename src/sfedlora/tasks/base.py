"""What a kind of task is to the federation: its model, encoding, loss, metrics and baseline.

A :class:`Task` is built from the loaded :class:`~sfedlora.data.TaskData` and owns every
decision that depends on the kind of task, so the federation, the runtimes and the reports
never ask which kind they run. Kinds register in :data:`TASKS` under ``TaskData.kind``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import numpy as np
import torch

from ..config import EvalConfig, RunConfig
from ..data import TaskData
from ..errors import SfedloraError
from ..lora.models import Compute


class Task:
    """One kind of task; subclasses say how each step is done for it."""

    kind: ClassVar[str]
    has_head: ClassVar[bool] = True  # a task head that trains with (or before) the adapter
    has_labels: ClassVar[bool] = True  # labels a Dirichlet split can follow
    has_classes: ClassVar[bool] = False  # classes: a majority baseline and label-mix scores
    # outputs are the logits of every dev example, which the fused engine can batch across models
    outputs_are_logits: ClassVar[bool] = False
    quantizes: ClassVar[bool] = False  # model.quantization can store its base in 4 or 8 bits
    # How an exported model loads: transformers' pipeline task and auto class (its model card).
    pipeline_tag: ClassVar[str]
    auto_class: ClassVar[str]

    def __init__(self, data: TaskData):
        self.name = data.name
        self.metric = data.metric  # the headline metric
        self.classes = data.classes

    def check(self, cfg: RunConfig) -> None:
        """Refuse settings this kind of task cannot run, with the setting to change."""
        if cfg.partition.kind == "dirichlet" and not self.has_labels:
            raise SfedloraError(
                f"partition.kind=dirichlet splits by label, and {cfg.data.task} has no labels: "
                "use partition.kind=iid, or size for clients of unequal size"
            )
        if cfg.model.quantization != "none" and not self.quantizes:
            raise SfedloraError(
                f"model.quantization={cfg.model.quantization} is for causal LMs (gsm8k, alpaca), and "
                f"{cfg.data.task} is not one: set model.quantization=none"
            )
        if cfg.federation.head_probe_rounds and not self.has_head:
            raise SfedloraError(
                "federation.head_probe_rounds trains a task head, and a causal LM has none: set it to 0"
            )
        if cfg.eval.judged_on == "local" and not (self.has_classes and cfg.eval.personalised):
            raise SfedloraError(
                "eval.judged_on=local needs a classification task and eval.personalised=true "
                "(it scores each client's personalised model under its own label mix); use judged_on=dev"
            )

    def build_model(self, cfg: RunConfig, compute: Compute, n_sampled: int, data: TaskData):
        """The base model with its LoRA adapter (γ checked per layer), and its tokenizer."""
        raise NotImplementedError

    def encode(self, examples, tokenizer, max_length: int, split: str):
        """A split tokenised once: anything with ``len``, ``subset``, ``lengths`` and ``collate``."""
        raise NotImplementedError

    def loss(
        self,
        model: torch.nn.Module,
        batch: dict[str, torch.Tensor],
        compute: Compute,
        per_example: bool = False,
    ) -> torch.Tensor:
        """The training loss of a batch: the mean over its examples. With ``per_example`` it
        must be a mean of per-example losses that each depend on their own example only (what
        DP-SGD's per-example clipping needs); one label per example already is."""
        return compute.forward(model, batch).loss

    def row_counts(self, labels: torch.Tensor, per_example: bool = False) -> torch.Tensor:
        """What each row of a batch counts for in :meth:`loss`'s mean: one example, by default."""
        return torch.ones(labels.shape[0], dtype=torch.float32, device=labels.device)

    def row_losses(
        self, logits: torch.Tensor, labels: torch.Tensor, per_example: bool = False
    ) -> torch.Tensor:
        """Each row's loss summed over its :meth:`row_counts`: the loss of any rows is
        Σ sums / Σ counts, what :meth:`loss` gives on a batch of them alone (the fused engine
        runs many clients' rows in one batch and weighs each client's rows by its own count)."""
        raise NotImplementedError

    def outputs(self, model: torch.nn.Module, data, tokenizer, cfg: EvalConfig, compute: Compute):
        """What the model produces on the evaluation data, for :meth:`scores`."""
        raise NotImplementedError

    def scores(self, outputs, data) -> dict[str, float]:
        """The task's metrics of one model's :meth:`outputs`."""
        raise NotImplementedError

    def client_scores(self, outputs, data, histogram: np.ndarray) -> dict[str, float]:
        """One client's scores; ``histogram`` is its training data's label counts."""
        return self.scores(outputs, data)

    def histograms(self, labels: np.ndarray, parts: list[np.ndarray]) -> np.ndarray:
        """Per client: label counts where there are classes, else the example count."""
        return np.array([[len(p)] for p in parts])

    def auto_kwargs(self) -> dict:
        """What ``auto_class.from_pretrained`` needs besides the base model to load the run's base."""
        return {}

    def hf_config(self) -> dict:
        """Settings the model's Hugging Face config needs for transformers' pipelines to read
        its outputs as this task does (an exported model)."""
        return {}

    # The trivial predictor a run must beat on :meth:`judged_metric` (sfedlora.driver.collapse).
    trivial_name: ClassVar[str] = "the model before training"

    def judged_metric(self, judged_on: str) -> str:
        """The metric (a key of :meth:`scores`) a collapse is judged on."""
        return self.metric

    def trivial_score(
        self, data, histograms: np.ndarray, judged_on: str, initial: Callable[[], dict[str, float]]
    ) -> float | None:
        """The trivial predictor's score on :meth:`judged_metric`. ``initial()`` scores the
        model before training (computed only where a task asks for it)."""
        return initial()[self.judged_metric(judged_on)]

    def collapse_margin(self, data, trivial: float) -> float:
        """How much better than ``trivial`` a score must be to count as learning: 1% of it."""
        return 0.01 * abs(trivial)

    # The trivial predictor's loss on the training data: the yardstick of the training loss
    # (sfedlora.driver.collapse tells overfitting from not learning by it).
    trivial_train_name: ClassVar[str] = "the model before training"

    def trivial_train_loss(
        self, parts: list | None, histograms: np.ndarray, initial: Callable[[object], dict[str, float]]
    ) -> float | None:
        """The trivial predictor's loss on the clients' training data ``parts`` (each weighted
        by its size, as a round's ``train_loss`` is; ``histograms``: their label counts, or
        sizes; None where the server does not hold the data). ``initial(data)`` is what the
        model before training outputs on ``data``. None where it cannot be known."""
        return None


TASKS: dict[str, type[Task]] = {}


def register(cls: type[Task]) -> type[Task]:
    TASKS[cls.kind] = cls
    return cls


def get_task(data: TaskData) -> Task:
    """The :class:`Task` that handles ``data`` (by its ``kind``)."""
    return TASKS[data.kind](data)
