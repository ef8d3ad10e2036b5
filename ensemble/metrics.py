"""Evaluation of probabilistic classifiers: the numbers of the comparison table, and a confusion matrix PNG.

Accuracy alone hides what an 8-class, imbalanced blood-cell problem cares about: balanced accuracy and
macro F1 weigh rare classes (basophils) like common ones, one-vs-rest ROC AUC measures ranking quality,
and the expected calibration error (ECE) says whether "90% sure" means right 90% of the time, which is
what an ensemble and temperature scaling are supposed to improve.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from sklearn.metrics import balanced_accuracy_score, f1_score, precision_recall_fscore_support, roc_auc_score

from ensemble.combiners import log_loss
from search.scores import expected_calibration_error

SUMMARY_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc_ovr", "ece", "log_loss")


def roc_auc_ovr(probs: np.ndarray, y: np.ndarray) -> float:
    """Macro one-vs-rest ROC AUC over the classes present in `y` (NaN if fewer than two are present)."""
    present = np.unique(y)
    if len(present) < 2:
        return float("nan")
    if len(present) == probs.shape[1]:
        normalised = probs / probs.sum(axis=1, keepdims=True)
        return float(roc_auc_score(y, normalised, multi_class="ovr", labels=np.arange(probs.shape[1])))
    return float(np.mean([roc_auc_score(y == c, probs[:, c]) for c in present]))


def summary(probs: np.ndarray, y: np.ndarray) -> dict[str, float]:
    predicted = probs.argmax(axis=1)
    labels = np.arange(probs.shape[1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # classes absent from y: sklearn warns, the numbers are still right
        return {
            "accuracy": float(np.mean(predicted == y)),
            "balanced_accuracy": float(balanced_accuracy_score(y, predicted)),
            "macro_f1": float(f1_score(y, predicted, labels=labels, average="macro", zero_division=0)),
            "roc_auc_ovr": roc_auc_ovr(probs, y),
            "ece": expected_calibration_error(probs, y),
            "log_loss": log_loss(probs, y),
        }


def per_class(probs: np.ndarray, y: np.ndarray, class_names: Sequence[str]) -> pd.DataFrame:
    precision, recall, f1, support = precision_recall_fscore_support(
        y, probs.argmax(axis=1), labels=np.arange(len(class_names)), zero_division=0)
    return pd.DataFrame({"class": list(class_names), "precision": precision, "recall": recall, "f1": f1,
                         "support": support})


def save_confusion_png(probs: np.ndarray, y: np.ndarray, class_names: Sequence[str], path: str | Path,
                       title: str) -> None:
    from search.plots import confusion_matrix_png

    confusion_matrix_png(y, probs, class_names, path, title)
