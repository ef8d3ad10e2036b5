"""common.metrics against the formulas they stand for, on small known cases and on sharp, imbalanced
predictions like a trained member's (confidently wrong rows, a class absent from the split, weights)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from common.metrics import (LOG_EPS, accuracy, expected_calibration_error, log_loss, per_class, roc_auc_ovr,
                            summary)


def sharp_predictions(n: int = 500, classes: int = 8, dtype=np.float64, seed: int = 0):
    """Softmax of large logits: many true-class probabilities below LOG_EPS; the last class never a label."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, classes)) * 12
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs = (probs / probs.sum(axis=1, keepdims=True)).astype(dtype)
    return probs, rng.integers(0, classes - 1, n), rng.random(n)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_log_loss_is_the_clipped_mean_negative_log_likelihood(dtype):
    probs, y, weight = sharp_predictions(dtype=dtype)
    picked = np.clip(probs[np.arange(len(y)), y].astype(np.float64), LOG_EPS, 1.0)
    assert np.mean(picked == LOG_EPS) > 0.1  # the clip matters on these rows
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no sklearn warning about row sums or absent classes
        assert log_loss(probs, y) == pytest.approx(np.mean(-np.log(picked)), rel=1e-12)
        assert log_loss(probs, y, weight) == pytest.approx(np.average(-np.log(picked), weights=weight), rel=1e-12)


def test_accuracy_weighted_and_unweighted():
    probs, y, weight = sharp_predictions()
    right = probs.argmax(axis=1) == y
    assert accuracy(probs, y) == np.mean(right)
    assert accuracy(probs, y, weight) == pytest.approx(np.average(right, weights=weight), rel=1e-12)
    assert accuracy(probs, y, np.where(right, 1.0, 0.0)) == 1.0


def test_known_cases():
    y = np.array([0, 1, 2, 2])
    perfect = np.eye(3)[y]
    scores = summary(perfect, y)
    assert scores["accuracy"] == scores["balanced_accuracy"] == scores["macro_f1"] == scores["roc_auc_ovr"] == 1.0
    assert scores["ece"] == pytest.approx(0.0) and scores["log_loss"] == pytest.approx(0.0, abs=1e-12)
    uniform = np.full((4, 3), 1 / 3)
    assert expected_calibration_error(uniform, np.array([0, 0, 0, 0])) == pytest.approx(2 / 3)
    assert log_loss(uniform, y) == pytest.approx(np.log(3))
    assert np.isnan(roc_auc_ovr(uniform, np.zeros(4, dtype=int)))


def test_a_class_absent_from_the_split_still_counts():
    y = np.array([0, 0, 1, 1])
    probs = np.array([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.5, 0.2, 0.3]])
    scores = summary(probs, y)
    assert scores["accuracy"] == 0.75
    assert scores["log_loss"] == pytest.approx(-np.mean(np.log([0.8, 0.6, 0.7, 0.2])))
    table = per_class(probs, y, ["a", "b", "c"])
    assert table["support"].tolist() == [2, 2, 0] and table.loc[2, "recall"] == 0.0
    assert table.loc[0, "precision"] == pytest.approx(2 / 3) and table.loc[1, "recall"] == 0.5


def test_roc_auc_of_two_classes_matches_sklearn_binary():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    y = np.array([0, 1] * 20)
    p1 = np.clip(y * 0.4 + rng.random(40) * 0.6, 0, 1)
    probs = np.stack([1 - p1, p1], axis=1)
    assert roc_auc_ovr(probs, y) == pytest.approx(roc_auc_score(y, p1))
