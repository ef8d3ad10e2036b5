"""`Study`: a handle on a search's study, wherever it lives."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from search.location import StudyLocation

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

        from search.storage import StorageError, open_storage

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        storage = open_storage(self.location.storage, heartbeat_interval=None, must_exist=True)
        try:
            return optuna.load_study(study_name=self.name, storage=storage)
        except KeyError:
            raise StorageError(f"no study {self.name!r} in {self.location.storage}") from None

    @property
    def best_trial(self) -> "optuna.trial.FrozenTrial":
        """The best complete trial by the study's (first) objective."""
        from search.report import ranked_trials

        ranked = ranked_trials(self.optuna_study)
        if not ranked:
            from search.storage import StorageError

            raise StorageError(f"study {self.name!r} has no complete trial yet")
        return ranked[0]

    def trials_dataframe(self) -> "pd.DataFrame":
        return self.optuna_study.trials_dataframe()

    @property
    def dashboard_command(self) -> str:
        return self.location.dashboard_command()

    def __repr__(self) -> str:
        return f"Study({self.name!r}, storage={self.location.storage!r})"
