"""Robust validation: fit the combiner on the validation images AND a corrupted copy of them.

Members trained on clean images fail under noise, blur, compression or stain shifts, and their
log-probabilities then drift in systematic, member-specific ways. A combiner (most of all a stacking
meta-learner) can learn to undo part of that drift, but only if it sees corrupted inputs while it is fit.
So the build predicts the members on a corrupted copy of the validation split (the data pipeline's
corruption suite, other random draws than the test copy's) and fits every combiner on clean + corrupted
validation, the corrupted rows down-weighted by a weight w. Each w is scored out-of-fold on both halves;
`evaluate.choose_row` keeps the combiners whose clean validation accuracy stays within a tolerance of the
best and takes the most robust of them. An image and its corrupted copy always share a fold, so no
out-of-fold score is fit on its own image.

Measured on the 60-minute default search (top-5 members, 8 TTA views, corrupted test accuracy of the best
single trial 0.528): stacking fit on clean validation 0.984 clean / 0.513 corrupted test accuracy; with the
corrupted copy at w = 0.03: 0.985 / 0.695; w = 0.3: 0.976 / 0.751; weighted voting w = 0.3 (what `auto`
chose, stacking's out-of-fold clean accuracy being 0.3 points lower): 0.984 / 0.563. Those are corruption
kinds the validation copy contained. Fit on half of the 14 kinds and tested on the other half (three random
halves), weighted voting w = 0.3 gained +5.3, +0.4 and +2.4 points over the best single member, stacking
w = 0.03 +1.7, -0.4 and +11: robustness to unseen corruptions is smaller and less predictable.
"""

from __future__ import annotations

import numpy as np


def mixed_validation(X_val: np.ndarray, y_val: np.ndarray, X_val_corrupted: np.ndarray | None,
                     corrupted_weight: float) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(X, y, sample_weight, groups) to fit a combiner on: the clean rows (weight 1) followed by their
    corrupted copies (weight `corrupted_weight`, possibly 0: then they are only scored, never fit), each
    copy in its image's group. Without a corrupted copy: the clean rows, no weights, no groups."""
    if X_val_corrupted is None:
        return X_val, y_val, None, None
    if X_val_corrupted.shape != X_val.shape:
        raise ValueError(f"corrupted validation copy has shape {X_val_corrupted.shape}, clean {X_val.shape}")
    if corrupted_weight < 0:
        raise ValueError(f"corrupted weight must be >= 0, got {corrupted_weight}")
    n = len(y_val)
    X = np.concatenate([X_val, X_val_corrupted])
    y = np.concatenate([y_val, y_val])
    weight = np.concatenate([np.ones(n), np.full(n, float(corrupted_weight))])
    groups = np.concatenate([np.arange(n), np.arange(n)])
    return X, y, weight, groups
