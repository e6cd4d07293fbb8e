"""Task metrics, and prediction with the shared model under a given set of adapter tensors."""

from __future__ import annotations

import numpy as np
import torch

from .data.encoding import Encoded, collate, length_sorted_batches
from .models import Compute


def task_metrics(logits: np.ndarray, labels: np.ndarray, num_labels: int) -> dict[str, float]:
    """Accuracy and the GLUE metrics that apply: F1 and MCC (binary), Pearson/Spearman (regression)."""
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import f1_score, matthews_corrcoef

    if num_labels == 1:
        pred = logits.reshape(-1)
        if np.std(pred) == 0:  # a constant prediction has no correlation; scipy would warn and give nan
            return {"pearson": 0.0, "spearman": 0.0}
        return {"pearson": float(pearsonr(pred, labels)[0]), "spearman": float(spearmanr(pred, labels)[0])}
    pred = logits.argmax(-1)
    out = {"accuracy": float((pred == labels).mean()), "mcc": float(matthews_corrcoef(labels, pred))}
    if num_labels == 2:
        out["f1"] = float(f1_score(labels, pred, zero_division=0.0))
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


@torch.no_grad()
def predict(
    model: torch.nn.Module, data: Encoded, tokenizer, batch_size: int, compute: Compute = Compute()
) -> np.ndarray:
    """Logits for every example of ``data``, in its order."""
    model.eval()
    out: np.ndarray | None = None
    for idx in length_sorted_batches(data, batch_size):
        batch = collate(data, idx, tokenizer)
        batch.pop("labels")
        logits = compute.forward(model, batch).logits.float().cpu().numpy()
        if out is None:
            out = np.empty((len(data), logits.shape[-1]), dtype=np.float32)
        out[idx] = logits
    return out


# Metrics where lower is better; every other metric (accuracy, F1, MCC, correlations) is higher-better.
LOWER_IS_BETTER = ("loss", "perplexity")


def higher_is_better(key: str) -> bool:
    """Whether larger values of a metric, or of a metrics-record key built on one
    (``personal_perplexity_mean``, ``train_loss``), are better."""
    return not key.removesuffix("_mean").removesuffix("_min").removesuffix("_max").endswith(LOWER_IS_BETTER)


def best_of(values, key: str):
    """The best of ``values`` of metric ``key``: the largest, or the smallest where lower is better."""
    return max(values) if higher_is_better(key) else min(values)


def summarise(per_client: list[dict[str, float]]) -> dict[str, float]:
    """Mean and min over clients of each metric: ``{name}_mean``, ``{name}_min``; for metrics
    where lower is better also ``{name}_max``, the worst client."""
    out = {}
    for name in per_client[0]:
        values = [m[name] for m in per_client]
        out[f"{name}_mean"] = float(np.mean(values))
        out[f"{name}_min"] = float(np.min(values))
        if not higher_is_better(name):
            out[f"{name}_max"] = float(np.max(values))
    return out
