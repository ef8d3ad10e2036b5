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
from ensemble.robust import mixed_validation
from ensemble.selection import accuracy


@dataclass
class CombinerChoice:
    table: pd.DataFrame  # one row per combiner and corrupted-copy weight
    fitted: dict  # label -> combiner fit on all validation images
    chosen: str  # label of the chosen row


def combiner_label(kind: str, corrupted_weight: float) -> str:
    return kind if corrupted_weight == 0 else f"{kind} +corrupted {corrupted_weight:g}"


def score_combiners(X_val: np.ndarray, y_val: np.ndarray, X_test: np.ndarray | None, y_test: np.ndarray | None,
                    kinds: Sequence[str] = COMBINERS, calibrate: bool = True,
                    vote_weights: Sequence[float] | None = None, preferred: str = "auto",
                    X_val_corrupted: np.ndarray | None = None, X_test_corrupted: np.ndarray | None = None,
                    corrupted_weights: Sequence[float] = (0.0,), clean_tolerance: float = 0.0) -> CombinerChoice:
    """Fit each combiner on validation (plus, per weight in `corrupted_weights`, the corrupted validation
    copy: see ensemble.robust), score it out-of-fold on validation (and on test, for the report only), and
    choose with `choose_row`. `preferred` restricts the choice to one kind ("auto": any)."""
    weights = sorted(set(corrupted_weights)) if X_val_corrupted is not None else [0.0]
    n = len(y_val)
    rows, fitted = [], {}
    for kind in kinds:
        for weight in weights:
            if kind == "vote" and weight > 0 and not calibrate:
                continue  # an uncalibrated vote fits nothing: the weight would change nothing
            X, y, sample_weight, groups = mixed_validation(X_val, y_val, X_val_corrupted, weight)
            combiner = make_combiner(kind, calibrate=calibrate, vote_weights=vote_weights)
            oof = out_of_fold_proba(combiner, X, y, sample_weight, groups)
            label = combiner_label(kind, weight)
            fitted[label] = clone(combiner).fit(X, y, sample_weight=sample_weight, groups=groups)
            row = {"combiner": label, "kind": kind, "corrupted_weight": weight,
                   "val_accuracy_oof": accuracy(oof[:n], y_val), "val_log_loss_oof": log_loss(oof[:n], y_val),
                   "val_ece_oof": expected_calibration_error(oof[:n], y_val),
                   "temperature": fitted[label].temperature_}
            if X_val_corrupted is not None:
                row["val_corrupted_accuracy_oof"] = accuracy(oof[n:], y_val)
            if X_test is not None:
                test = fitted[label].predict_proba(X_test)
                row.update(test_accuracy=accuracy(test, y_test), test_log_loss=log_loss(test, y_test),
                           test_ece=expected_calibration_error(test, y_test))
            if X_test_corrupted is not None:
                row["test_corrupted_accuracy"] = accuracy(fitted[label].predict_proba(X_test_corrupted), y_test)
            rows.append(row)
    chosen = choose_row(rows, preferred, clean_tolerance)["combiner"]
    table = pd.DataFrame(rows)
    table["chosen"] = table["combiner"] == chosen
    return CombinerChoice(table, fitted, chosen)


def choose_row(rows: list[dict], preferred: str = "auto", clean_tolerance: float = 0.0) -> dict:
    """The row to use: among rows of the `preferred` kind whose out-of-fold clean validation accuracy is
    within `clean_tolerance` of the best, the highest corrupted-validation accuracy (when measured), then
    clean accuracy, log-loss, the simpler kind (vote, weighted, stacking) and the smaller weight."""
    pool = [r for r in rows if preferred in ("auto", r["kind"])]
    if not pool:
        raise ValueError(f"unknown combiner {preferred!r}")
    best_clean = max(r["val_accuracy_oof"] for r in pool)
    eligible = [r for r in pool if r["val_accuracy_oof"] >= best_clean - clean_tolerance - 1e-12]
    order = {k: i for i, k in enumerate(COMBINERS)}
    return min(eligible, key=lambda r: (-r.get("val_corrupted_accuracy_oof", 0.0), -r["val_accuracy_oof"],
                                        r["val_log_loss_oof"], order[r["kind"]], r["corrupted_weight"]))


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
