"""Every error cellsearch raises on purpose derives from `CellsearchError`; catch that, or one area's class.

    >>> import cellsearch as cs
    >>> try:
    ...     cs.search("no_such_spec")
    ... except cs.errors.ConfigError as exc:
    ...     print("fix the spec:", exc)      # doctest: +ELLIPSIS
    fix the spec: study spec not found...
"""

from common.errors import (BackboneError, CellsearchError, ConfigError, DataError, DataWarning, EnsembleError,
                           Interrupted, MissingExtraError, StorageError, StudyNotFoundError, TrainingDiverged,
                           TrialsFailing, UnknownBackboneError, WeightsError, WeightsUnavailableError, WorkerFailed,
                           require_extra)

__all__ = ["BackboneError", "CellsearchError", "ConfigError", "DataError", "DataWarning", "EnsembleError",
           "Interrupted", "MissingExtraError", "StorageError", "StudyNotFoundError", "TrainingDiverged",
           "TrialsFailing", "UnknownBackboneError", "WeightsError", "WeightsUnavailableError", "WorkerFailed",
           "require_extra"]
