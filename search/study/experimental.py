"""Optuna's experimental features that a fault-tolerant parallel search relies on, without their warnings.

Heartbeats, stale-trial retries, grouped TPE and metric names are "experimental" in Optuna's terms; their
warnings are silenced only around the calls that use them, so no process-wide warning filter changes and
any other ExperimentalWarning still shows.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

from optuna.exceptions import ExperimentalWarning


@contextlib.contextmanager
def experimental_features() -> Iterator[None]:
    """Ignore Optuna's ExperimentalWarning inside the block only.

    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     with experimental_features():
    ...         warnings.warn("group is experimental", ExperimentalWarning)
    ...     warnings.warn("shown", ExperimentalWarning)
    >>> [str(w.message) for w in caught]
    ['shown']
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        yield
