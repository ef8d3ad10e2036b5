"""Turn user errors into one clear line on stderr and exit code 2, instead of a traceback.

Only light modules are imported here, so a command can reject bad input before TensorFlow is imported.
"""

from __future__ import annotations

import os
import sys
from typing import Callable

from data_pipeline.errors import CellsearchError

USER_ERRORS: tuple[type[BaseException], ...] = (CellsearchError, FileNotFoundError)


def quiet_tensorflow() -> None:
    """Hide TensorFlow's C++ start-up chatter (CUDA probing on CPU machines) unless the user set a level."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run a command's `main`; every `CellsearchError` becomes `error: <message>` and exit code 2."""
    quiet_tensorflow()
    try:
        return main(argv)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:  # Ctrl-C: the command has said what it stopped, no traceback
        return getattr(stop, "exit_code", 130)
