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


class MissingExtraError(CellsearchError, ImportError):
    """An optional feature's packages are not installed; the message names the extra that installs them."""


def require_extra(module: str, extra: str, feature: str):
    """Import `module` for `feature`, or raise one line naming `pip install 'cellsearch[extra]'`.

    >>> require_extra("json", "none", "reading JSON").__name__
    'json'
    >>> try:
    ...     require_extra("no_such_module_xyz", "ray", "--executor ray")
    ... except MissingExtraError as exc:
    ...     print(exc)
    --executor ray needs the 'ray' extra: pip install 'cellsearch[ray]'
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(f"{feature} needs the '{extra}' extra: pip install 'cellsearch[{extra}]'") from None
