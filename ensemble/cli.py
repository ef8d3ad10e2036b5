"""The ensemble commands share the search commands' error handling (one line, exit code 2)."""

from common.cli_errors import quiet_tensorflow, run_cli

__all__ = ["quiet_tensorflow", "run_cli"]
