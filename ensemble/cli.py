"""One clear error line on stderr and exit code 2 for user errors, shared by the ensemble commands.

Only light modules are imported here, so a command can reject bad input before TensorFlow is imported.
"""

from __future__ import annotations

import os
import sys
from typing import Callable

from ensemble.standalone import EnsembleError


def quiet_tensorflow() -> None:
    """Hide TensorFlow's C++ start-up chatter (CUDA probing on CPU machines) unless the user set a level."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def user_errors() -> tuple[type[BaseException], ...]:
    from data_pipeline.errors import DataError

    errors: list[type[BaseException]] = [EnsembleError, DataError, FileNotFoundError]
    for module, name in (("search.config", "ConfigError"), ("search.storage", "StorageError")):
        if module in sys.modules:  # imported by the command already; importing it here would cost time
            errors.append(getattr(sys.modules[module], name))
    return tuple(errors)


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    quiet_tensorflow()
    try:
        return main(argv)
    except Exception as exc:
        if isinstance(exc, user_errors()):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise
