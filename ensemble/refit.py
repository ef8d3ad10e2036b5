"""The family rotation that measures a final refit.

A refit that trains the chosen members on every corruption family leaves no family unseen to measure it on.
What it buys is measured by rotation instead: hold each family out in turn, retrain the member on all the
others, and score the family left out. The folds are trial configurations the trainer runs unchanged, so a
fold differs from its member only in the families, never in seed or hyperparameters.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from data_pipeline.corrupt import FAMILIES, check_families
from data_pipeline.policies import check_policy_families

if TYPE_CHECKING:
    import pandas as pd

    from search.study.trial_config import TrialConfig


def family_rotation(families: Sequence[str] | None = None) -> dict[str, tuple[str, ...]]:
    """Each family (in `FAMILIES` order) -> the families its fold trains on: all the others.

    The same mapping on every call, whatever the order or repetition of `families` (None: every family), so
    the folds of different members and runs line up; an unknown name fails in one line naming it.
    """
    given = tuple(FAMILIES) if families is None else tuple(families)
    folds = {}
    for family in given:
        train, heldout = check_families([other for other in given if other != family], [family])
        folds[heldout[0]] = train
    return {family: folds[family] for family in FAMILIES if family in folds}


def rotation_configs(config: TrialConfig, families: Sequence[str] | None = None) -> dict[str, TrialConfig]:
    """`config` once per fold of `family_rotation(families)`: trained on the fold's families and scored on
    the family left out (the trial's held-out-family accuracy). A policy that needs the family left out
    (`light` needs colour) fails here, before any training."""
    folds = family_rotation(families)
    for train in folds.values():
        check_policy_families(config.augment_policy, train)
    return {family: dataclasses.replace(config, train_families=list(train), heldout_families=[family])
            for family, train in folds.items()}


def rotation_table(config: TrialConfig, out_dir: str | Path, families: Sequence[str] | None = None) -> pd.DataFrame:
    """Train every fold of `config` (the trial's files under `out_dir/<family left out>/`) and return one row
    per family: what the fold trained on, its clean validation accuracy, and its accuracy on the validation
    split corrupted by the family left out (TTA as `config` says)."""
    import pandas as pd

    from search.trial.trainer import train_trial

    rows = []
    for family, fold in rotation_configs(config, families).items():
        metrics = train_trial(fold, Path(out_dir) / family).metrics
        rows.append({"heldout_family": family, "train_families": ", ".join(fold.train_families),
                     "val_accuracy_tta": metrics["val_accuracy_tta"],
                     "heldout_accuracy_tta": metrics["val_corrupted_accuracy_tta"]})
    return pd.DataFrame(rows)
