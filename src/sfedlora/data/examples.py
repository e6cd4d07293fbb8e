"""What a loaded task is: its examples, the kind of task, and its headline metric."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# The kinds of task (keys of sfedlora.tasks.TASKS).
CLASSIFICATION = "classification"
REGRESSION = "regression"
CAUSAL_LM = "causal-lm"


@dataclass
class Examples:
    texts: list[str]
    pairs: list[str] | None  # second text of sentence-pair tasks
    labels: np.ndarray  # int64 class ids, or float32 scores for regression

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx) -> Examples:
        idx = np.asarray(idx, dtype=np.int64)
        return Examples(
            [self.texts[i] for i in idx],
            None if self.pairs is None else [self.pairs[i] for i in idx],
            self.labels[idx],
        )


@dataclass
class TaskData:
    name: str
    train: Examples  # or data.lm.LMExamples for a causal-LM task
    eval: Examples
    kind: str  # CLASSIFICATION, REGRESSION or CAUSAL_LM: which sfedlora.tasks.Task handles it
    metric: (
        str  # headline metric: accuracy, f1, mcc or pearson; causal LM: accuracy (exact match) or perplexity
    )
    classes: int = 0  # number of classes of a classification task
