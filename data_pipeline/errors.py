"""The exception hierarchy: one base, `CellsearchError`, and one subclass per area.

Every CLI prints any `CellsearchError` as one line (`error: ...`) and exits with code 2. The areas:
`DataError` (data_pipeline), `BackboneError` (backbones), `ConfigError` and `StorageError` (search),
`EnsembleError` (ensemble). They live with their layer; `cellsearch.errors` re-exports them all.
"""


class CellsearchError(Exception):
    """Base of every error cellsearch raises on purpose; the message says what to fix."""


class DataError(CellsearchError, ValueError):
    """Input data is unusable; the message names the problem (file, key, shape, value)."""


class BackboneError(CellsearchError, ValueError):
    """A backbone name, weights argument or weights file that cannot be used."""
