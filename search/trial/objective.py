"""The local executor's Optuna objective: `search.trial.run_trial.run_trial` on a live `optuna.Trial`."""

from __future__ import annotations

from pathlib import Path

import optuna
from optuna.artifacts import upload_artifact

from search.trial.run_trial import ARTIFACT_ATTR_PREFIX, is_pretrained, run_trial
from search.study.space import suggest_params
from search.study.spec import StudySpec

__all__ = ["ARTIFACT_ATTR_PREFIX", "Objective", "OptunaTrialChannel"]


class OptunaTrialChannel:
    """A live trial: Optuna's pruner decides after each reported epoch."""

    def __init__(self, trial: optuna.Trial, params: dict, artifact_store) -> None:
        self.trial, self.params, self.artifact_store = trial, params, artifact_store
        self.number = trial.number
        self.user_attrs = trial.user_attrs

    def set_user_attr(self, key: str, value) -> None:
        self.trial.set_user_attr(key, value)

    def report(self, epoch: int, value: float, may_prune: bool) -> None:
        self.trial.report(value, epoch)
        if may_prune and self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned after epoch {epoch} at {value:.4f}")

    def upload(self, path: Path) -> str:
        return upload_artifact(artifact_store=self.artifact_store, file_path=str(path), study_or_trial=self.trial)


class Objective:
    """Callable for `study.optimize`: sample from the spec's space, then run the trial."""

    def __init__(self, spec: StudySpec, artifact_store) -> None:
        self.spec = spec
        self.artifact_store = artifact_store

    def __call__(self, trial: optuna.Trial) -> float | list[float]:
        params = suggest_params(trial, self.spec, is_pretrained)
        return run_trial(OptunaTrialChannel(trial, params, self.artifact_store), self.spec).values
