"""Split training examples among clients: IID, Dirichlet(β) over labels, or Dirichlet(β) over client sizes."""

from __future__ import annotations

import numpy as np

from ..errors import SfedloraError

_MAX_DRAWS = 1000


def _check_room(n_examples: int, n_clients: int, min_size: int) -> None:
    if n_clients * min_size > n_examples:
        raise SfedloraError(
            f"cannot give {n_clients} clients at least {min_size} examples each from {n_examples}: "
            "lower partition.min_size or federation.n_clients"
        )


def iid_partition(n_examples: int, n_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """A random permutation cut into ``n_clients`` near-equal parts."""
    return [np.sort(part) for part in np.array_split(rng.permutation(n_examples), n_clients)]


def dirichlet_partition(
    labels: np.ndarray, n_clients: int, beta: float, min_size: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Label-skewed split: for each class, client shares are drawn from Dir(β·1).

    Draws are repeated until every client has at least ``min_size`` examples (the usual
    rejection scheme of FedLab and FedSA-LoRA's code), so β keeps its meaning. Regression
    targets are binned into quartiles first so that the skew is over score ranges.
    """
    labels = np.asarray(labels)
    if labels.dtype.kind == "f":
        labels = np.digitize(labels, np.quantile(labels, [0.25, 0.5, 0.75]))
    _check_room(len(labels), n_clients, min_size)
    classes = np.unique(labels)
    for _ in range(_MAX_DRAWS):
        parts: list[list[np.ndarray]] = [[] for _ in range(n_clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            shares = rng.dirichlet(np.full(n_clients, beta))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].append(chunk)
        out = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(p) for p in out) >= min_size:
            return out
    raise SfedloraError(
        f"no Dirichlet(β={beta}) split gave every one of {n_clients} clients {min_size} examples "
        f"in {_MAX_DRAWS} draws: raise partition.beta or lower partition.min_size"
    )


def size_partition(
    n_examples: int, n_clients: int, beta: float, min_size: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Quantity skew, for data without labels (GSM8K, Alpaca): client shares of the data
    are drawn from Dir(β·1), on top of ``min_size`` examples each; examples are assigned at
    random, so every client's data is drawn like the whole. β → ∞ approaches equal sizes.
    """
    _check_room(n_examples, n_clients, min_size)
    shares = rng.dirichlet(np.full(n_clients, beta))
    sizes = min_size + np.floor(shares * (n_examples - n_clients * min_size)).astype(np.int64)
    # Flooring leaves fewer than n_clients examples over: one more each for the largest shares.
    sizes[np.argsort(-shares, kind="stable")[: n_examples - sizes.sum()]] += 1
    return [np.sort(part) for part in np.split(rng.permutation(n_examples), np.cumsum(sizes)[:-1])]


def partition(
    labels: np.ndarray, n_clients: int, kind: str, beta: float, min_size: int, seed: int
) -> list[np.ndarray]:
    """Indices of each client's training examples; every example goes to exactly one client."""
    rng = np.random.default_rng(seed)
    if kind == "iid":
        _check_room(len(labels), n_clients, min_size)
        return iid_partition(len(labels), n_clients, rng)
    if kind == "dirichlet":
        return dirichlet_partition(labels, n_clients, beta, min_size, rng)
    if kind == "size":
        return size_partition(len(labels), n_clients, beta, min_size, rng)
    raise SfedloraError(f"unknown partition kind {kind!r}: use iid, dirichlet or size")
