"""What every command shares: the flags `-q`, `-v` and `--version`, help with defaults shown, third-party logging
kept off the terminal, and user errors as one line on stderr with exit code 2 instead of a traceback.

Only light modules are imported here, so a command can reject bad input before TensorFlow is imported.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable

from common.errors import CellsearchError

USER_ERRORS: tuple[type[BaseException], ...] = (CellsearchError, FileNotFoundError)
QUIET, NORMAL, VERBOSE = -1, 0, 1


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Module docstrings keep their layout; a flag's default is shown unless it is None or the flag is a switch."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.nargs == 0:
            return action.help or ""
        return super()._get_help_string(action)


def version() -> str:
    from importlib import metadata

    try:
        return metadata.version("cellsearch")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def add_common_flags(parser: argparse.ArgumentParser, default: object = NORMAL) -> None:
    """`-q`, `-v` and `--version`, on every command and subcommand (a subcommand's `default` is
    `argparse.SUPPRESS`, so it keeps a `-q` given before the subcommand's name)."""
    loudness = parser.add_mutually_exclusive_group()
    loudness.add_argument("-q", "--quiet", dest="verbosity", action="store_const", const=QUIET, default=default,
                          help="print only errors and the result (no progress bars or notes)")
    loudness.add_argument("-v", "--verbose", dest="verbosity", action="store_const", const=VERBOSE, default=default,
                          help="also show Optuna's, TensorFlow's and absl's own log lines")
    parser.add_argument("--version", action="version", version=f"cellsearch {version()}")


def command_parser(prog: str, description: str | None) -> argparse.ArgumentParser:
    """The parser of a `python -m ...` command, before its own flags are added."""
    parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter)
    add_common_flags(parser)
    return parser


def quiet_tensorflow() -> None:
    """Hide TensorFlow's C++ start-up chatter (CUDA probing on CPU machines) unless the user set a level; worker
    processes inherit the variable, so it must be set before any of them starts."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def set_verbosity(verbosity: int) -> None:
    """Third-party log lines reach the terminal only with `-v`: TensorFlow's C++ lines (in this process and in
    the workers it starts, which inherit the variable), absl's and TensorFlow's Python loggers, and Optuna's
    `[I ...]` lines (`A new study created in RDB ...`)."""
    import optuna

    if verbosity >= VERBOSE:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"
        optuna.logging.set_verbosity(optuna.logging.INFO)
        return
    quiet_tensorflow()
    for name in ("absl", "tensorflow"):
        logging.getLogger(name).setLevel(logging.ERROR)
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run a command's `main`; every `CellsearchError` becomes `error: <message>` and exit code 2. Without
    `-v`, TensorFlow's C++ log lines are filtered out of stderr (common.native_log). The command's own process
    keeps freed tensor memory as the search's workers do (`common.malloc`): builds, predictions and single
    trainings run in it."""
    from contextlib import nullcontext

    from common.malloc import keep_freed_memory
    from common.native_log import native_log_filtered

    keep_freed_memory(os.cpu_count())
    quiet_tensorflow()
    verbose = any(a in ("-v", "--verbose") for a in (sys.argv[1:] if argv is None else argv))
    with nullcontext() if verbose else native_log_filtered():
        try:
            return main(argv)
        except USER_ERRORS as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as stop:  # Ctrl-C: the command has said what it stopped, no traceback
            return getattr(stop, "exit_code", 130)
