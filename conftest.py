"""The whole test run: tests/ and, through --doctest-modules, the docstring examples of the packages.

Keras' backend and TensorFlow's log level are set here, before any module is imported, so the tests and the
docstring examples run alike. `collect_ignore` leaves out what acts when imported: `python -m cellsearch`'s
entry module exits the process, and the benchmarks are programs run by hand.
"""

import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

collect_ignore = ["cellsearch/__main__.py", "benchmarks"]


@pytest.hookimpl
def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto` (the default): two test processes, one per core of the 2-core CI machine (14.7 against about
    21 minutes serially); more would multiply the training processes the search tests start themselves."""
    return min(2, os.cpu_count() or 1)
