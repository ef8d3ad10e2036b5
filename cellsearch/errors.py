"""Every error cellsearch raises on purpose derives from `CellsearchError`; catch that, or one area's class.

    >>> import cellsearch as cs
    >>> try:
    ...     cs.search("no_such_spec")
    ... except cs.errors.ConfigError as exc:
    ...     print("fix the spec:", exc)      # doctest: +ELLIPSIS
    fix the spec: study spec not found...
"""

from backbones.registry import UnknownBackboneError
from data_pipeline.errors import BackboneError, CellsearchError, DataError, MissingExtraError
from ensemble.standalone import EnsembleError
from search.config import ConfigError
from search.location import StudyNotFoundError
from search.storage import StorageError

__all__ = ["BackboneError", "CellsearchError", "ConfigError", "DataError", "EnsembleError", "MissingExtraError",
           "StorageError", "StudyNotFoundError", "UnknownBackboneError"]
