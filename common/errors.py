"""The exception hierarchy: one base, `CellsearchError`, and one subclass per area, all in this one module.

Every CLI prints any `CellsearchError` as one line (`error: ...`) and exits with code 2. Keeping the whole
hierarchy at the bottom layer lets every package raise and catch any area's error without importing upwards;
`cellsearch.errors` re-exports it as the public API.
"""

import signal


class CellsearchError(Exception):
    """Base of every error cellsearch raises on purpose; the message says what to fix."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM: stop, record the unfinished trials as interrupted, queue them to run again.

    A KeyboardInterrupt, not a CellsearchError: a stop request is no error, and code that lets Ctrl-C
    through lets it through too.
    """

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


# ------------------------------------------------------------------------------------------------ data
class DataError(CellsearchError, ValueError):
    """Input data is unusable; the message names the problem (file, key, shape, value)."""


class DataWarning(UserWarning):
    """Input was usable after a conversion the user should know about (e.g. greyscale made RGB)."""


# ------------------------------------------------------------------------------------------- backbones
class BackboneError(CellsearchError, ValueError):
    """A backbone name, weights argument or weights file that cannot be used."""


class UnknownBackboneError(BackboneError, KeyError):
    """A backbone name that is not in the registry.

    Subclasses both KeyError (a failed lookup) and ValueError (a bad argument), so callers may catch
    either; `str()` gives the plain message rather than KeyError's quoted repr.
    """

    def __init__(self, name: str, available: list[str]):
        self.name = name
        self.available = available
        super().__init__(f"unknown backbone {name!r}; available: {', '.join(available)}")

    def __str__(self) -> str:
        return str(self.args[0])

    def __reduce__(self):  # picklable, e.g. when raised in a Ray or multiprocessing worker
        return type(self), (self.name, self.available)


class WeightsError(BackboneError):
    """A `weights=` argument that cannot be honoured (bad value, missing or mismatched file)."""


class WeightsUnavailableError(WeightsError, RuntimeError):
    """ImageNet weights could not be fetched (typically: no internet and nothing in the Keras cache)."""


# ---------------------------------------------------------------------------------------------- extras
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


# ---------------------------------------------------------------------------------------------- search
class ConfigError(CellsearchError, ValueError):
    """A configuration value is invalid; the message names the key."""


class StorageError(CellsearchError, RuntimeError):
    """The study storage or artifact store can't be used; the message names the URL (password hidden)."""


class StudyNotFoundError(CellsearchError):
    """No study was named and no last-study pointer says which one to use."""


class WorkerFailed(CellsearchError):
    """A worker stopped on an error the whole study shares (storage, artifact store, every trial failing)."""


class TrialsFailing(CellsearchError):
    """Trial after trial fails the same way: the study stops instead of burning through its budget."""


class TrainingDiverged(CellsearchError, RuntimeError):
    """The loss became NaN or infinite; the trial is failed, not silently kept."""


# -------------------------------------------------------------------------------------------- ensemble
class EnsembleError(CellsearchError, RuntimeError):
    """The ensemble artifact or the input to it is unusable; the message says which file or value."""
