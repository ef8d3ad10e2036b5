"""Scores of probabilistic predictions (accuracy, calibration), shared by trials, reports and the ensemble."""

from __future__ import annotations

import numpy as np


def accuracy(probs: np.ndarray, labels: np.ndarray, sample_weight: np.ndarray | None = None) -> float:
    """Share of rows whose most probable class is the label (weighted by `sample_weight` when given)."""
    return float(np.average(probs.argmax(axis=1) == labels, weights=sample_weight))


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, n_bins: int = 15) -> float:
    """Top-label ECE: |accuracy - confidence| per equal-width confidence bin, weighted by bin size."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y
    bins = np.minimum((confidence * n_bins).astype(int), n_bins - 1)
    total = 0.0
    for b in np.unique(bins):
        rows = bins == b
        total += rows.sum() * abs(correct[rows].mean() - confidence[rows].mean())
    return float(total / len(y))
