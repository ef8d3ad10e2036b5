"""Balanced class weights and deterministic random oversampling."""

import numpy as np
import pytest

from common.errors import DataError
from data_pipeline.imbalance import class_weights, oversample_indices


@pytest.fixture(scope="module")
def train_labels(embedded) -> np.ndarray:
    return embedded.labels[embedded.splits["train"]]


def test_class_weights_follow_balanced_formula(train_labels):
    weights = class_weights(train_labels, 8)
    counts = np.bincount(train_labels, minlength=8)
    assert sorted(weights) == list(range(8))
    assert all(type(k) is int and type(v) is float for k, v in weights.items())
    for cls, weight in weights.items():
        assert weight == pytest.approx(len(train_labels) / (8 * counts[cls]))


def test_rarer_classes_weigh_more(train_labels):
    weights = class_weights(train_labels, 8)
    counts = np.bincount(train_labels, minlength=8)
    order = np.argsort(counts)
    assert [weights[int(c)] for c in order] == sorted(weights.values(), reverse=True)
    # Weighted, every class contributes the same total to the loss.
    totals = [weights[c] * counts[c] for c in range(8)]
    assert np.allclose(totals, totals[0])


def test_class_weights_small_example():
    assert class_weights(np.array([0, 0, 0, 1]), 2) == pytest.approx({0: 4 / 6, 1: 2.0})


def test_class_weights_accept_one_hot():
    assert class_weights(np.eye(3, dtype=int)[[0, 1, 2, 2]], 3) == pytest.approx({0: 4 / 3, 1: 4 / 3, 2: 2 / 3})


def test_class_weights_refuse_absent_class():
    with pytest.raises(DataError, match="class 2 has no rows"):
        class_weights(np.array([0, 1, 1, 3]), 4)


def test_class_weights_refuse_bad_input():
    with pytest.raises(DataError, match="out of range"):
        class_weights(np.array([0, 1, 5]), 3)
    with pytest.raises(DataError, match="num_classes"):
        class_weights(np.array([0, 1]), 0)


def test_oversampling_equalises_counts(train_labels):
    idx = oversample_indices(train_labels, seed=0)
    counts = np.bincount(train_labels[idx], minlength=8)
    assert np.all(counts == np.bincount(train_labels).max())
    assert np.all(np.isin(np.arange(len(train_labels)), idx))  # no original row is lost
    assert idx.dtype == np.int64 and np.all(np.diff(idx) >= 0)


def test_oversampling_repeats_rows_evenly():
    labels = np.array([0] * 10 + [1] * 3)
    repeats = np.bincount(oversample_indices(labels, seed=0), minlength=13)
    assert np.all(repeats[:10] == 1)
    assert sorted(repeats[10:]) == [3, 3, 4]


def test_oversampling_is_deterministic_by_seed(train_labels):
    a, b = oversample_indices(train_labels, seed=3), oversample_indices(train_labels, seed=3)
    c = oversample_indices(train_labels, seed=4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_oversampling_to_an_integer_target_keeps_larger_classes():
    labels = np.array([0] * 20 + [1] * 5 + [2] * 8)
    counts = np.bincount(labels[oversample_indices(labels, target=10)])
    assert counts.tolist() == [20, 10, 10]


@pytest.mark.parametrize("target", ["min", 0, -3, 2.5, True])
def test_oversampling_bad_target_refused(target):
    with pytest.raises(DataError, match="target"):
        oversample_indices(np.array([0, 1, 1]), target=target)


def test_oversampling_bad_labels_refused():
    with pytest.raises(DataError):
        oversample_indices(np.array([], dtype=int))
    with pytest.raises(DataError):
        oversample_indices(np.array([0.0, 1.0]))
