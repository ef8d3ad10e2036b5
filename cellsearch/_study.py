"""`Study`: a handle on a search's study, wherever it lives."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from search.study.location import StudyLocation

if TYPE_CHECKING:
    import optuna
    import pandas as pd


@dataclass(frozen=True)
class Study:
    """A study in its Optuna storage: what `cellsearch.search` returns and `cellsearch.build_ensemble` takes.

    >>> import cellsearch as cs
    >>> study = cs.load_study("quick")          # doctest: +SKIP
    >>> study.best_trial.number, study.location.storage   # doctest: +SKIP
    """

    location: StudyLocation

    @property
    def name(self) -> str:
        return self.location.name

    @property
    def optuna_study(self) -> "optuna.Study":
        """The Optuna study itself (read it like any other: `trials_dataframe()`, `best_trials`...)."""
        import optuna

        from common.errors import StorageError
        from search.execution.storage import open_storage

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        storage = open_storage(self.location.storage, heartbeat_interval=None, must_exist=True)
        try:
            return optuna.load_study(study_name=self.name, storage=storage)
        except KeyError:
            raise StorageError(f"no study {self.name!r} in {self.location.storage}") from None

    @property
    def best_trial(self) -> "optuna.trial.FrozenTrial":
        """The best complete trial by the study's (first) objective."""
        from search.reports.study_report import ranked_trials

        ranked = ranked_trials(self.optuna_study)
        if not ranked:
            from common.errors import StorageError

            raise StorageError(f"study {self.name!r} has no complete trial yet")
        return ranked[0]

    def trials_dataframe(self) -> "pd.DataFrame":
        return self.optuna_study.trials_dataframe()

    def leaderboard(self, top: int | None = None) -> "pd.DataFrame":
        """Complete trials, best first: number, objective value(s), backbone, policy, validation and test
        accuracies, training time (the report's `top_trials.csv` columns), indexed by trial number."""
        from search.reports.study_report import ranked_trials, trials_table

        study = self.optuna_study
        return trials_table(study, ranked_trials(study)[:top]).set_index("number")

    def _repr_html_(self) -> str:
        """A notebook cell showing a study: where it lives, its trial counts and its five best trials."""
        from html import escape

        from optuna.trial import TrialState

        counts = {state.name.lower(): 0 for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL,
                                                      TrialState.RUNNING)}
        for trial in self.optuna_study.get_trials(deepcopy=False):
            counts[trial.state.name.lower()] = counts.get(trial.state.name.lower(), 0) + 1
        summary = ", ".join(f"{n} {state}" for state, n in counts.items() if n)
        return (f"<p><b>Study {escape(self.name)}</b>: {escape(summary or 'no trials yet')}<br>"
                f"storage <code>{escape(self.location.storage)}</code></p>"
                + self.leaderboard(top=5).to_html(float_format="{:.4f}".format, na_rep=""))

    @property
    def dashboard_command(self) -> str:
        return self.location.dashboard_command()

    def __repr__(self) -> str:
        return f"Study({self.name!r}, storage={self.location.storage!r})"
