"""Scoring combiners on validation and comparing ensemble, best single member and plain average on test.

Combiners are compared by OUT-OF-FOLD validation scores (see combiners.out_of_fold_proba): a combiner
fit on validation would otherwise be scored on its own training data and stacking would always "win".
Test numbers are reported for every combiner but never used to choose.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
from sklearn.base import clone

from ensemble.combiners import COMBINERS, log_loss, make_combiner, out_of_fold_proba
from ensemble.metrics import expected_calibration_error, per_class, summary


@dataclass
class CombinerChoice:
    table: pd.DataFrame  # one row per combiner
    fitted: dict  # kind -> combiner fit on all validation images
    chosen: str


def score_combiners(X_val: np.ndarray, y_val: np.ndarray, X_test: np.ndarray | None, y_test: np.ndarray | None,
                    kinds: Sequence[str] = COMBINERS, calibrate: bool = True,
                    vote_weights: Sequence[float] | None = None, preferred: str = "auto") -> CombinerChoice:
    """Fit each combiner on validation, score it out-of-fold on validation (and on test, for the report),
    and choose `preferred` or, for "auto", the best out-of-fold validation accuracy (ties: log-loss, then
    the simpler combiner, in the order vote, weighted, stacking)."""
    rows, fitted = [], {}
    for kind in kinds:
        combiner = make_combiner(kind, calibrate=calibrate, vote_weights=vote_weights)
        oof = out_of_fold_proba(combiner, X_val, y_val)
        fitted[kind] = clone(combiner).fit(X_val, y_val)
        row = {"combiner": kind, "val_accuracy_oof": float(np.mean(oof.argmax(1) == y_val)),
               "val_log_loss_oof": log_loss(oof, y_val), "val_ece_oof": expected_calibration_error(oof, y_val),
               "temperature": fitted[kind].temperature_}
        if X_test is not None:
            test = fitted[kind].predict_proba(X_test)
            row.update(test_accuracy=float(np.mean(test.argmax(1) == y_test)), test_log_loss=log_loss(test, y_test),
                       test_ece=expected_calibration_error(test, y_test))
        rows.append(row)
    table = pd.DataFrame(rows)
    if preferred == "auto":
        order = {k: i for i, k in enumerate(COMBINERS)}
        best = min(rows, key=lambda r: (-r["val_accuracy_oof"], r["val_log_loss_oof"], order[r["combiner"]]))
        chosen = best["combiner"]
    elif preferred in fitted:
        chosen = preferred
    else:
        raise ValueError(f"unknown combiner {preferred!r}")
    table["chosen"] = table["combiner"] == chosen
    return CombinerChoice(table, fitted, chosen)


def comparison_rows(split: str, y: np.ndarray, probs_by_model: dict[str, np.ndarray]) -> list[dict]:
    return [{"model": name, "split": split, **summary(probs, y)} for name, probs in probs_by_model.items()]


def per_class_rows(split: str, y: np.ndarray, probs_by_model: dict[str, np.ndarray],
                   class_names: Sequence[str]) -> pd.DataFrame:
    frames = []
    for name, probs in probs_by_model.items():
        frame = per_class(probs, y, class_names)
        frame.insert(0, "split", split)
        frame.insert(0, "model", name)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def corruption_breakdown(y: np.ndarray, kinds: np.ndarray, severities: np.ndarray,
                         probs_by_model: dict[str, np.ndarray]) -> pd.DataFrame:
    """Accuracy per corruption kind and per severity, one column per model."""
    rows = []
    for column, values in (("kind", kinds), ("severity", severities)):
        for value in sorted(set(values.tolist())):
            mask = values == value
            row = {"group": column, "value": value, "n": int(mask.sum())}
            row.update({name: float(np.mean(p[mask].argmax(1) == y[mask])) for name, p in probs_by_model.items()})
            rows.append(row)
    return pd.DataFrame(rows)
