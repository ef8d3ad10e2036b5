"""Counter class imbalance (PBC: 971 lymphocytes vs 2,663 neutrophils) by loss weights or oversampling."""

from __future__ import annotations

import numpy as np
from sklearn.utils.class_weight import compute_class_weight

from data_pipeline.dataset import validate_labels
from common.errors import DataError


def class_weights(labels: np.ndarray, num_classes: int) -> dict[int, float]:
    """'Balanced' weights n_samples / (num_classes * count), keyed by class index as Keras' `class_weight` wants.

    A class with no rows is refused: its balanced weight would be infinite, and a training split missing a
    class is a data problem better fixed than papered over.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise DataError(f"num_classes must be a positive integer, got {num_classes!r}")
    labels = validate_labels(labels, len(np.asarray(labels)), int(num_classes), "class_weights labels")
    counts = np.bincount(labels, minlength=num_classes)
    absent = np.flatnonzero(counts == 0)
    if absent.size:
        raise DataError(f"class_weights: class {absent[0]} has no rows (classes without rows: {absent.tolist()})")
    weights = compute_class_weight("balanced", classes=np.arange(num_classes), y=labels)
    return {i: float(w) for i, w in enumerate(weights)}


def _target_count(counts: np.ndarray, target: str | int) -> int:
    if isinstance(target, str):
        if target != "max":
            raise DataError(f"oversample target must be 'max' or a positive integer, got {target!r}")
        return int(counts.max())
    if isinstance(target, bool) or not isinstance(target, (int, np.integer)) or target < 1:
        raise DataError(f"oversample target must be 'max' or a positive integer, got {target!r}")
    return int(target)


def oversample_indices(labels: np.ndarray, seed: int = 0, target: str | int = "max") -> np.ndarray:
    """Row indices in which every class present appears at least `target` times ('max': the largest class).

    Each row of a minority class is repeated as evenly as possible (whole copies, then a random distinct
    remainder), which adds less duplicate-driven overfitting than drawing with replacement. Classes already
    at or above the target keep all their rows; nothing is dropped. The result is sorted: shuffle it when
    batching.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) == 0 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"oversample_indices: expected a non-empty 1-D integer label array, "
                        f"got {labels.dtype} {labels.shape}")
    classes, counts = np.unique(labels, return_counts=True)
    goal = _target_count(counts, target)
    rng = np.random.default_rng(seed)
    parts = []
    for cls in classes:
        members = np.flatnonzero(labels == cls)
        copies, remainder = divmod(max(goal - len(members), 0), len(members))
        parts.extend([members] * (1 + copies))
        parts.append(rng.choice(members, size=remainder, replace=False))
    return np.sort(np.concatenate(parts)).astype(np.int64)
