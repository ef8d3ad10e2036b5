"""Scoring combiners on validation and comparing ensemble, best single member and plain average on test.

Combiners are compared by OUT-OF-FOLD validation scores under the build's objective (see
combiners.out_of_fold_proba and ensemble.robust): a combiner fit on validation would otherwise be scored
on its own training data and stacking would always "win". Test data never enters a choice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd

from common.errors import ConfigError
from common.metrics import expected_calibration_error, per_class, summary
from ensemble.combiners import COMBINERS, make_combiner, out_of_fold_proba
from ensemble.robust import ValidationRows


@dataclass
class CombinerChoice:
    table: pd.DataFrame  # one row per combiner kind: out-of-fold validation scores
    chosen: str  # kind of the chosen row
    oof: np.ndarray  # the chosen combiner's out-of-fold probabilities on the validation rows


CLEAN_TOLERANCE = 0.005  # clean validation accuracy the combiner choice may give up for robustness
GAIN_Z = 2.0  # a combiner beyond plain voting must beat it by this many standard errors, out of fold


def score_combiners(X_val: np.ndarray, rows: ValidationRows, kinds: Sequence[str] = COMBINERS,
                    calibrate: bool = True, vote_weights: Sequence[float] | None = None,
                    preferred: str = "auto", clean_tolerance: float = CLEAN_TOLERANCE, seed: int = 0
                    ) -> CombinerChoice:
    """Score each combiner out-of-fold on the validation `rows` (member probabilities `X_val` on them, see
    ensemble.robust) and choose with `choose_row`. No test data is involved; `seed` shuffles the folds."""
    table, baseline, oofs = [], None, {}
    for kind in kinds:
        combiner = make_combiner(kind, calibrate=calibrate, vote_weights=vote_weights, random_state=seed)
        oof = oofs[kind] = out_of_fold_proba(combiner, X_val, rows.y, rows.sample_weight, rows.groups)
        baseline = oof if baseline is None else baseline
        gain, se = paired_gain(oof, baseline, rows)
        table.append({"combiner": kind, "kind": kind, **rows.scores(oof, "val_oof"),
                      "val_oof_ece": expected_calibration_error(oof[:rows.n_clean], rows.y[:rows.n_clean]),
                      "val_oof_gain": gain, "val_oof_gain_se": se})
    chosen = choose_row(table, preferred, clean_tolerance)["combiner"]
    frame = pd.DataFrame(table)
    frame["chosen"] = frame["combiner"] == chosen
    return CombinerChoice(frame, chosen, oofs[chosen])


def paired_gain(probs: np.ndarray, baseline: np.ndarray, rows: ValidationRows) -> tuple[float, float]:
    """Objective accuracy of `probs` minus that of `baseline` on `rows`, and its standard error, counting each
    clean image with its shifted copies as one sample (they are right or wrong together)."""
    weight = np.ones(len(rows.y)) if rows.sample_weight is None else rows.sample_weight
    groups = np.arange(len(rows.y)) if rows.groups is None else rows.groups
    diff = weight * ((probs.argmax(axis=1) == rows.y).astype(float) - (baseline.argmax(axis=1) == rows.y))
    per_group, group_weight = np.bincount(groups, diff), np.bincount(groups, weight)
    gain, n = per_group.sum() / group_weight.sum(), len(per_group)
    spread = ((per_group - gain * group_weight) ** 2).sum() * n / max(n - 1, 1)
    return float(gain), float(np.sqrt(spread) / group_weight.sum())


def choose_row(rows: list[dict], preferred: str = "auto", clean_tolerance: float | None = None) -> dict:
    """The row to use: among rows of the `preferred` kind ("auto": any) whose clean out-of-fold accuracy is
    within `clean_tolerance` of the best (None: no limit), and, when plain voting (the first row) is among
    them, whose gain over it exceeds GAIN_Z standard errors, the best out-of-fold objective accuracy, then
    objective log-loss, then the simpler kind (vote, weighted, stacking).

    The tolerance bounds what the robust objective may trade: without it, a combiner that gives up 1.5
    points of clean accuracy for 8 points under shift wins, which a lab reading mostly clean slides would
    not want by default. The gain test keeps a fitted combiner from winning on validation noise: stacking
    that won 0.27 points out of fold on one quick study lost 0.7 clean points on its test split."""
    pool = [r for r in rows if preferred in ("auto", r["kind"])]
    if not pool:
        raise ConfigError(f"unknown combiner {preferred!r}")
    if preferred == "auto" and "val_oof_gain_se" in rows[0]:
        pool = [pool[0]] + [r for r in pool[1:] if r["val_oof_gain"] > GAIN_Z * r["val_oof_gain_se"]]
    if clean_tolerance is not None and "val_oof_accuracy" in pool[0]:
        best_clean = max(r["val_oof_accuracy"] for r in pool)
        pool = [r for r in pool if r["val_oof_accuracy"] >= best_clean - clean_tolerance]
    order = {k: i for i, k in enumerate(COMBINERS)}
    return min(pool, key=lambda r: (-r["val_oof_objective_accuracy"], r["val_oof_objective_log_loss"],
                                    order[r["kind"]]))


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


def heldout_comparison(y: np.ndarray, clean_by_model: dict[str, np.ndarray], shifted_by_model: dict[str, np.ndarray],
                       shifted) -> pd.DataFrame:
    """Accuracy on a shifted copy per family, per severity and overall ("all"), one column per model
    (`common.robust_report.robustness_table` per model; `shifted` has `source`, `family`, `severity`)."""
    from common.robust_report import ALL, robustness_table

    source = np.asarray(shifted.source)
    columns = []
    for name, probs in shifted_by_model.items():
        table = robustness_table(y[source], clean_by_model[name][source], probs, shifted.family, shifted.severity)
        table = table[(table["family"] == ALL) | (table["severity"] == ALL)]
        columns.append(table.set_index(["family", "severity", "n"])["accuracy"].rename(name))
    return pd.concat(columns, axis=1).reset_index()
