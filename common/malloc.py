"""glibc malloc settings that keep freed tensor memory for the next training or prediction step.

With glibc's defaults every activation above its mmap threshold (a few MB: a batch's Conv2D outputs) is mapped and
unmapped at every step, and faulting its pages in again took 31% of a one-core CPU trial's time in the kernel;
with these settings a trial used 25-28% less CPU time (`benchmarks/bench_malloc.py`). glibc reads them from the
environment when a process starts (`malloc_environment`, for the workers the search starts) or takes them
through `mallopt` before the memory is used (`keep_freed_memory`, for a command's own process). A user who sets
any MALLOC_* variable keeps their own settings, and nothing is changed.
"""

from __future__ import annotations

import os
import sys

# variable: (mallopt parameter, value); the arena cap is the process's threads, set by the caller
SETTINGS = {"MALLOC_MMAP_THRESHOLD_": (-3, 32 * 2 ** 20), "MALLOC_TRIM_THRESHOLD_": (-1, 2 ** 30),
            "MALLOC_TOP_PAD_": (-2, 256 * 2 ** 20)}
ARENA_MAX = ("MALLOC_ARENA_MAX", -8)


def _users_own() -> bool:
    return any(name.startswith("MALLOC_") for name in os.environ)


def _settings(cpu_threads: int | None) -> dict[str, tuple[int, int]]:
    """The settings for a process with `cpu_threads` compute threads (glibc's default number of arenas
    without it); none off Linux or where the user set their own."""
    if not sys.platform.startswith("linux") or _users_own():
        return {}
    return {**SETTINGS, ARENA_MAX[0]: (ARENA_MAX[1], cpu_threads)} if cpu_threads else dict(SETTINGS)


def malloc_environment(cpu_threads: int | None = None) -> dict[str, str]:
    """The settings as environment variables, for a process about to start."""
    return {name: str(value) for name, (_, value) in _settings(cpu_threads).items()}


def keep_freed_memory(cpu_threads: int | None = None) -> bool:
    """Apply the settings to this process through glibc's `mallopt` (as early as possible: arenas already made
    stay); whether they were applied. Under another C library, or with the user's own settings, a no-op."""
    settings = _settings(cpu_threads)
    try:
        glibc = bool(settings) and os.confstr("CS_GNU_LIBC_VERSION")
    except (ValueError, OSError):
        glibc = False
    if not glibc:
        return False
    import ctypes

    mallopt = ctypes.CDLL(None).mallopt
    return all(mallopt(parameter, value) == 1 for parameter, value in settings.values())
