import numpy as np
import pytest

from sfedlora.data import dirichlet_partition, iid_partition, partition
from sfedlora.errors import SfedloraError

LABELS = np.repeat(np.arange(4), [400, 300, 200, 100])


def assert_exact_cover(parts, n):
    everything = np.concatenate(parts)
    assert len(everything) == n
    assert np.array_equal(np.sort(everything), np.arange(n))  # every example once


@pytest.mark.parametrize("beta", [0.1, 0.5, 5.0])
def test_dirichlet_assigns_every_example_once_with_minimum_sizes(beta):
    parts = dirichlet_partition(LABELS, 10, beta, 20, np.random.default_rng(3))
    assert_exact_cover(parts, len(LABELS))
    assert min(len(p) for p in parts) >= 20


def label_skew(beta, seeds=range(8)):
    """Mean total-variation distance between a client's label mix and the global one."""
    global_mix = np.bincount(LABELS) / len(LABELS)
    tvs = []
    for s in seeds:
        parts = dirichlet_partition(LABELS, 10, beta, 5, np.random.default_rng(s))
        hist = np.stack([np.bincount(LABELS[p], minlength=4) for p in parts])
        mix = hist / hist.sum(1, keepdims=True)
        tvs.append(0.5 * np.abs(mix - global_mix).sum(1).mean())
    return float(np.mean(tvs))


def test_skew_grows_as_beta_falls():
    skews = [label_skew(b) for b in (100.0, 1.0, 0.1)]
    assert skews[0] < skews[1] < skews[2]
    assert skews[0] < 0.1 and skews[2] > 0.4


def test_partition_is_seeded():
    a = partition(LABELS, 7, "dirichlet", 0.5, 10, seed=11)
    b = partition(LABELS, 7, "dirichlet", 0.5, 10, seed=11)
    c = partition(LABELS, 7, "dirichlet", 0.5, 10, seed=12)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_iid_sizes_differ_by_at_most_one():
    parts = iid_partition(1003, 10, np.random.default_rng(0))
    assert_exact_cover(parts, 1003)
    assert {len(p) for p in parts} == {100, 101}


def test_regression_targets_are_split_by_score_range():
    scores = np.linspace(0, 5, 400).astype(np.float32)
    parts = partition(scores, 4, "dirichlet", 0.5, 10, seed=0)
    assert_exact_cover(parts, 400)
    # Skewed over score quartiles as labels are over classes: a client's quartile mix is far
    # from the global 1/4 each (about 0.4 here; a split blind to the scores, about 0.1).
    quartile = np.digitize(scores, [1.25, 2.5, 3.75])
    mix = np.stack([np.bincount(quartile[p], minlength=4) / len(p) for p in parts])
    assert 0.5 * np.abs(mix - 0.25).sum(1).mean() > 0.25


def test_impossible_minimum_is_a_clear_error():
    with pytest.raises(SfedloraError, match="min_size"):
        partition(LABELS, 10, "dirichlet", 0.5, 200, seed=0)
