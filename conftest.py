"""The whole test run: tests/ and, through --doctest-modules, the docstring examples of the packages.

Keras' backend and TensorFlow's log level are set here, before any module is imported, so the tests and the
docstring examples run alike; so are the search workers' malloc settings, for the test processes started after
this file runs, which train and predict in-process. `collect_ignore` leaves out what acts when imported:
`python -m cellsearch`'s entry module exits the process, and the benchmarks are programs run by hand.
"""

import os

import pytest

from common.malloc import malloc_environment

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.update(malloc_environment(os.cpu_count()))

collect_ignore = ["cellsearch/__main__.py", "benchmarks"]


@pytest.hookimpl(optionalhook=True)  # an xdist hook: pytest would reject it where xdist is not installed
def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto` (the default): two test processes, one per core of the 2-core CI machine (15 against about
    21 minutes serially, in one hour); more would multiply the training processes the search tests start."""
    return min(2, os.cpu_count() or 1)


# The files that run searches and builds in subprocesses, longest first (tests' durations on the CI machine): the
# two test processes take them before the short files, so that neither ends the run alone on one of them.
LONGEST_FIRST = ("test_api.py", "test_interrupt.py", "test_search_local.py", "test_trainer.py",
                 "test_ensemble_study.py", "test_ensemble_robust.py", "test_ray_executor.py", "test_timeout.py")


def pytest_collection_modifyitems(items) -> None:
    rank = {name: place for place, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file's tests stay in order
