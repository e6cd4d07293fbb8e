"""Sequence classification and regression (GLUE and custom data): one classifier head on the base model."""

from __future__ import annotations

import numpy as np
import torch

from ..config import EvalConfig, RunConfig
from ..data import TaskData
from ..data.encoding import Encoded, collate, encode, length_batches
from ..data.examples import CLASSIFICATION, REGRESSION
from ..lora.models import Compute, build_classifier
from .base import Task, register


@torch.no_grad()
def predict(
    model: torch.nn.Module, data: Encoded, tokenizer, batch_size: int, compute: Compute = Compute()
) -> np.ndarray:
    """Logits for every example of ``data``, in its order."""
    model.eval()
    out: np.ndarray | None = None
    for idx in length_batches(data.lengths(), batch_size):
        batch = collate(data, idx, tokenizer)
        batch.pop("labels")
        logits = compute.forward(model, batch).logits.float().cpu().numpy()
        if out is None:
            out = np.empty((len(data), logits.shape[-1]), dtype=np.float32)
        out[idx] = logits
    return out


def label_mix_accuracy(logits: np.ndarray, labels: np.ndarray, mix: np.ndarray) -> float:
    """Accuracy on a test set whose labels follow ``mix`` (a client's own label counts).

    The per-class accuracies on the shared dev set, weighted by the mix: what a client's
    model would score on held-out data drawn like its own, with no second pass.
    """
    pred = logits.argmax(-1)
    weights = mix / mix.sum()
    per_class = [(pred[labels == c] == c).mean() if np.any(labels == c) else 0.0 for c in range(len(mix))]
    return float(np.dot(weights, per_class))


def label_prior_loss(histograms: np.ndarray) -> float:
    """The cross-entropy of answering each client's own label frequencies on its own training
    data (the entropy of its label counts, a row of ``histograms``), size-weighted over
    clients: what a model that learned only its client's prior scores."""
    counts = np.asarray(histograms, dtype=np.float64)
    p = counts / counts.sum(axis=1, keepdims=True)
    entropy = -(p * np.log(np.where(p > 0, p, 1.0))).sum(axis=1)
    return float(np.average(entropy, weights=counts.sum(axis=1)))


class SequenceTask(Task):
    """A classifier head on the base model's sequence representation."""

    num_labels: int  # outputs of the head
    outputs_are_logits = True
    pipeline_tag = "text-classification"
    auto_class = "AutoModelForSequenceClassification"

    def auto_kwargs(self) -> dict:
        return {"num_labels": self.num_labels}

    def build_model(self, cfg: RunConfig, compute: Compute, n_sampled: int, data: TaskData):
        m, lora = cfg.model, cfg.lora
        return build_classifier(
            m.name_or_path,
            self.num_labels,
            lora.rank,
            lora.alpha,
            cfg.scaling,
            n_sampled,
            dropout=lora.dropout,
            target_modules=m.target_modules,
            seed=cfg.seed,
        )

    def encode(self, examples, tokenizer, max_length: int, split: str) -> Encoded:
        return encode(examples, tokenizer, max_length)

    def outputs(self, model, data: Encoded, tokenizer, cfg: EvalConfig, compute: Compute) -> np.ndarray:
        return predict(model, data, tokenizer, cfg.batch_size, compute)


@register
class Classification(SequenceTask):
    kind = CLASSIFICATION
    has_classes = True

    @property
    def num_labels(self) -> int:
        return self.classes

    trivial_name = "the majority class"

    def hf_config(self) -> dict:
        return {"problem_type": "single_label_classification"}

    def collapse_margin(self, data: Encoded, trivial: float) -> float:
        return 0.02  # accuracy points

    def row_losses(self, logits: torch.Tensor, labels: torch.Tensor, per_example: bool = False):
        return torch.nn.functional.cross_entropy(logits.float(), labels, reduction="none")

    def scores(self, outputs: np.ndarray, data: Encoded) -> dict[str, float]:
        """Accuracy, MCC and, for two classes, F1 and the area under the ROC curve of the logit
        margin; whether every prediction is one class.

        AUROC ranks the examples by the model's margin, so a bias toward one label (a
        personalised model fitted to its client's label skew) leaves it unchanged: it scores
        what the model knows about the task apart from its prior. Data of one label has none.
        """
        from sklearn.metrics import f1_score, matthews_corrcoef, roc_auc_score

        pred, labels = outputs.argmax(-1), data.labels
        # One label in both (a client's share under label skew) has no correlation to measure:
        # MCC is 0 by convention, as sklearn returns, without its warning in every such share.
        one_class = np.union1d(labels, pred).size == 1
        mcc = 0.0 if one_class else float(matthews_corrcoef(labels, pred))
        out = {"accuracy": float((pred == labels).mean()), "mcc": mcc}
        if self.classes == 2:
            out["f1"] = float(f1_score(labels, pred, zero_division=0.0))
            if labels.min() != labels.max():
                out["auroc"] = float(roc_auc_score(labels, outputs[:, 1] - outputs[:, 0]))
        out["constant_predictions"] = float(pred.min() == pred.max())
        return out

    def judged_metric(self, judged_on: str) -> str:
        return "local_accuracy" if judged_on == "local" else "accuracy"

    def client_scores(self, outputs: np.ndarray, data: Encoded, histogram: np.ndarray) -> dict[str, float]:
        """The dev-set scores, and the accuracy under the client's own label mix."""
        return {
            **self.scores(outputs, data),
            "local_accuracy": label_mix_accuracy(outputs, data.labels, histogram),
        }

    def histograms(self, labels: np.ndarray, parts: list[np.ndarray]) -> np.ndarray:
        return np.stack([np.bincount(labels[p], minlength=self.classes) for p in parts])

    def trivial_score(self, data: Encoded, histograms: np.ndarray, judged_on: str, initial=None) -> float:
        """Accuracy of always answering the most frequent label: of the dev set, or judged on
        local label mixes, of each client's own labels (mean over ``histograms``' clients)."""
        if judged_on == "local":
            return float(np.mean(histograms.max(axis=1) / histograms.sum(axis=1)))
        return float(np.bincount(data.labels, minlength=self.classes).max() / len(data))

    trivial_train_name = "each client's label prior"

    def trivial_train_loss(self, parts: list[Encoded] | None, histograms: np.ndarray, initial=None) -> float:
        return label_prior_loss(histograms)


@register
class Regression(SequenceTask):
    kind = REGRESSION
    num_labels = 1

    trivial_name = "the constant mean predictor"

    def hf_config(self) -> dict:
        return {"problem_type": "regression"}  # else a one-output pipeline applies a sigmoid

    def collapse_margin(self, data: Encoded, trivial: float) -> float:
        """Two standard errors of the correlation of a predictor unrelated to the labels
        (1/√n on n examples): what such a predictor scores by chance."""
        return 2.0 / len(data) ** 0.5

    def row_losses(self, logits: torch.Tensor, labels: torch.Tensor, per_example: bool = False):
        return (logits.float().reshape(-1) - labels.float()) ** 2  # the model's own loss: MSE

    def scores(self, outputs: np.ndarray, data: Encoded) -> dict[str, float]:
        """Pearson and Spearman correlation of the predictions with the labels, their mean
        squared error, and whether the predictions are (numerically) one value."""
        from scipy.stats import pearsonr, spearmanr

        pred = outputs.reshape(-1)
        mse = float(np.mean((pred - data.labels) ** 2))
        # Constant up to float noise: a head whose inputs no longer matter still wobbles in the
        # last bits, and scipy's correlation of such values is noise too.
        if np.std(pred) <= 1e-6 * max(1.0, float(np.abs(pred).mean())):
            return {"pearson": 0.0, "spearman": 0.0, "mse": mse, "constant_predictions": 1.0}
        return {
            "pearson": float(pearsonr(pred, data.labels)[0]),
            "spearman": float(spearmanr(pred, data.labels)[0]),
            "mse": mse,
            "constant_predictions": 0.0,
        }

    def judged_metric(self, judged_on: str) -> str:
        return "pearson"

    def trivial_score(self, data: Encoded, histograms: np.ndarray, judged_on: str, initial=None) -> float:
        """Correlation of a constant prediction (the labels' mean, the least-squares constant): 0."""
        return 0.0

    trivial_train_name = "each client's label variance"

    def trivial_train_loss(self, parts: list[Encoded] | None, histograms: np.ndarray, initial=None):
        """The mean squared error of predicting each client's own label mean on its own
        training data (its label variance), size-weighted over clients."""
        if parts is None:
            return None
        return float(np.average([np.var(d.labels) for d in parts], weights=histograms[:, 0]))
