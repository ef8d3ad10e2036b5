"""One trial's life, the same for every executor: configuration -> training -> per-epoch report (and
pruning) -> publication of metrics and files.

Executors differ only in how they talk to their trial: the local executor holds a live `optuna.Trial`, a
Ray Tune actor holds the storage and reports to Tune, whose scheduler prunes. Each gives `run_trial` a
`TrialChannel`; everything else (the seed, the scratch folder, the objective, what is recorded, the order
of publication, failure reasons) is written here once.

A trial is COMPLETE only once everything is published: metrics become user attributes and files go to the
artifact store *before* the objective value is returned, so an upload that fails fails the trial.
"""

from __future__ import annotations

import os
import shutil
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import optuna

from search.execution.lifecycle import FAIL_REASON, PUBLISHED_BY, worker_id
from search.study.trial_config import TrialConfig
from search.study.goals import get_objective
from search.study.reseed import is_protected
from search.study.space import config_from_params
from search.study.spec import StudySpec

if TYPE_CHECKING:  # the trainer imports Keras: a study's report reads this module's names without it
    from search.trial.trainer import TrialResult

ARTIFACT_ATTR_PREFIX = "artifact:"
PLOT_FILES = ("training_curves.png", "confusion_matrix.png")  # shown inline by optuna-dashboard


class TrialChannel(Protocol):
    """What a runner needs from its executor's trial."""

    number: int
    params: dict
    user_attrs: dict

    def set_user_attr(self, key: str, value) -> None: ...

    def report(self, epoch: int, value: float, may_prune: bool) -> None:
        """Record the epoch's objective value; raise `optuna.TrialPruned` (or let the scheduler stop the
        trial) if it should stop and `may_prune`."""

    def upload(self, path: Path) -> str:
        """Put one file in the artifact store, attached to this trial; returns the artifact id."""


def is_pretrained(backbone: str) -> bool:
    from backbones import get_backbone

    return get_backbone(backbone).pretrained


def device_label() -> str:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return f"gpu:{visible}" if visible else "cpu"


def trial_config(spec: StudySpec, params: dict, number: int) -> TrialConfig:
    """The full configuration of trial `number`: sampled `params`, the spec for the rest, a seed per trial."""
    return config_from_params(params, spec, is_pretrained, (spec.algorithm.seed or 0) + number)


def _write_plots(result: TrialResult) -> None:
    import pandas as pd

    from common.plots import confusion_matrix_png, training_curves_png

    folder = result.directory
    training_curves_png(pd.read_csv(folder / "history.csv"), folder / PLOT_FILES[0])
    with np.load(folder / "predictions.npz") as saved:
        confusion_matrix_png(saved["val_labels"], saved["val_view_probs"].mean(axis=0), saved["class_names"],
                             folder / PLOT_FILES[1], title="validation, TTA")


def _publish(channel: TrialChannel, result: TrialResult) -> None:
    from search.trial.trainer import ARTIFACT_FILES

    for key, value in result.metrics.items():
        channel.set_user_attr(key, value)
    for name in (*ARTIFACT_FILES, *PLOT_FILES):
        channel.set_user_attr(ARTIFACT_ATTR_PREFIX + name, channel.upload(result.directory / name))


@dataclass(frozen=True)
class TrialOutcome:
    metrics: dict
    values: float | list[float]  # the spec's objective value(s), as Optuna is told them


def run_trial(channel: TrialChannel, spec: StudySpec) -> TrialOutcome:
    """Train the configuration `channel` names, publish it, and return its metrics and objective value(s).

    Reseeded copies and warm starts marked `prune = false` were chosen, not sampled: they report every epoch
    but are never pruned.
    """
    from search.trial.trainer import train_trial

    objective = get_objective(spec.algorithm.objective)
    config = trial_config(spec, channel.params, channel.number)
    for key, value in {"seed": config.seed, "device": device_label(),
                       "worker": worker_id(), "started_at": time.time()}.items():
        channel.set_user_attr(key, value)
    may_prune = not is_protected(channel)
    work_dir = spec.location.trial_work_dir(channel.number)

    def report(epoch: int, scores: dict) -> None:
        if objective.epoch_key is not None:
            channel.report(epoch, scores[objective.epoch_key], may_prune)

    try:
        result = train_trial(config, work_dir, report=report,
                             trained=lambda seconds: channel.set_user_attr(PUBLISHED_BY, time.time() + seconds))
        _write_plots(result)
        channel.set_user_attr("finished_at", time.time())
        _publish(channel, result)
    except optuna.TrialPruned:
        raise
    except Exception as exc:
        channel.set_user_attr(FAIL_REASON, f"{type(exc).__name__}: {exc}"[:500])
        channel.set_user_attr("fail_traceback", traceback.format_exc()[-2000:])
        raise
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    return TrialOutcome(result.metrics, objective.values(result.metrics))
