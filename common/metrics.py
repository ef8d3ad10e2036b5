"""Scores of probabilistic predictions, shared by trials, reports and the ensemble: scikit-learn's metrics with
explicit `labels=` (so a class absent from a small split still counts) and optional `sample_weight`.

Accuracy alone hides what an 8-class, imbalanced blood-cell problem cares about: balanced accuracy and
macro F1 weigh rare classes (basophils) like common ones, one-vs-rest ROC AUC measures ranking quality,
and the expected calibration error (ECE) says whether "90% sure" means right 90% of the time, which is
what an ensemble and temperature scaling are supposed to improve. Every function takes `probs` of shape
(N, C) and integer labels `y` in 0..C-1.

    >>> import numpy as np
    >>> probs, y = np.array([[0.9, 0.1], [0.4, 0.6], [0.7, 0.3]]), np.array([0, 1, 1])
    >>> accuracy(probs, y), round(log_loss(probs, y), 4), accuracy(probs, y, sample_weight=[1, 1, 0])
    (0.6666666666666666, 0.6067, 1.0)
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import pandas as pd
from sklearn import metrics

SUMMARY_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc_ovr", "ece", "log_loss")
#: Probabilities are clipped to at least this before the log, as the ensemble's runtime does
#: (ensemble.standalone), so one confidently wrong image costs at most -log(1e-7) ~ 16, whatever the dtype.
LOG_EPS = 1e-7


def _labels(probs: np.ndarray) -> np.ndarray:
    return np.arange(np.shape(probs)[1])


def accuracy(probs: np.ndarray, y: np.ndarray, sample_weight: Sequence[float] | None = None) -> float:
    """Share of rows whose most probable class is the label (weighted by `sample_weight` when given)."""
    return float(metrics.accuracy_score(y, np.argmax(probs, axis=1), sample_weight=sample_weight))


def log_loss(probs: np.ndarray, y: np.ndarray, sample_weight: Sequence[float] | None = None) -> float:
    """(Weighted) mean negative log-likelihood of the true labels, probabilities clipped to [LOG_EPS, 1]."""
    clipped = np.clip(np.asarray(probs, dtype=np.float64), LOG_EPS, 1.0)
    with warnings.catch_warnings():
        # clipping (and float32 members' rounding) moves row sums off 1 by ~1e-7: the loss is still the one meant
        warnings.filterwarnings("ignore", message="The y_prob values do not sum to one", category=UserWarning)
        return float(metrics.log_loss(y, clipped, sample_weight=sample_weight, labels=_labels(probs)))


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, n_bins: int = 15) -> float:
    """Top-label ECE: |accuracy - confidence| per equal-width confidence bin, weighted by bin size
    (scikit-learn's `calibration_curve` is binary only, so this one is written here, once)."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y
    bins = np.minimum((confidence * n_bins).astype(int), n_bins - 1)
    total = 0.0
    for b in np.unique(bins):
        rows = bins == b
        total += rows.sum() * abs(correct[rows].mean() - confidence[rows].mean())
    return float(total / len(y))


def roc_auc_ovr(probs: np.ndarray, y: np.ndarray) -> float:
    """Macro one-vs-rest ROC AUC over the classes present in `y` (NaN if fewer than two are present)."""
    present = np.unique(y)
    if len(present) < 2:
        return float("nan")
    if len(present) == probs.shape[1] == 2:  # sklearn's binary case takes the positive class's scores
        return float(metrics.roc_auc_score(y, probs[:, 1]))
    if len(present) == probs.shape[1]:
        normalised = probs / probs.sum(axis=1, keepdims=True)
        return float(metrics.roc_auc_score(y, normalised, multi_class="ovr", labels=_labels(probs)))
    return float(np.mean([metrics.roc_auc_score(y == c, probs[:, c]) for c in present]))


def summary(probs: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """The comparison table's numbers (`SUMMARY_METRICS`) of one model on one split."""
    predicted = probs.argmax(axis=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # classes absent from y: sklearn warns, the numbers are still right
        return {
            "accuracy": accuracy(probs, y),
            "balanced_accuracy": float(metrics.balanced_accuracy_score(y, predicted)),
            "macro_f1": float(metrics.f1_score(y, predicted, labels=_labels(probs), average="macro", zero_division=0)),
            "roc_auc_ovr": roc_auc_ovr(probs, y),
            "ece": expected_calibration_error(probs, y),
            "log_loss": log_loss(probs, y),
        }


def per_class(probs: np.ndarray, y: np.ndarray, class_names: Sequence[str]) -> pd.DataFrame:
    """Precision, recall, F1 and support of every class (0 where a class is never predicted or present)."""
    precision, recall, f1, support = metrics.precision_recall_fscore_support(
        y, probs.argmax(axis=1), labels=np.arange(len(class_names)), zero_division=0)
    return pd.DataFrame({"class": list(class_names), "precision": precision, "recall": recall, "f1": f1,
                         "support": support})
