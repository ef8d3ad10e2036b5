"""Turn user errors into one clear line on stderr and exit code 2, instead of a traceback."""

from __future__ import annotations

import sys
from typing import Callable

from data_pipeline.errors import DataError
from search.config import ConfigError
from search.storage import StorageError

USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, DataError, StorageError, FileNotFoundError)


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    from backbones.registry import UnknownBackboneError

    try:
        return main(argv)
    except (*USER_ERRORS, UnknownBackboneError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
