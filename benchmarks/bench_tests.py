"""Where the default test run spends its time: per file and per test, from pytest's own durations.

    python benchmarks/bench_tests.py                   # README's test command (two processes, TensorFlow)
    python benchmarks/bench_tests.py --top 30 -- tests/test_api.py tests/test_interrupt.py

It runs `python -m pytest --durations=0` with any arguments after `--`, and prints the wall time, the seconds
of every file (setup, call and teardown of its tests: a module fixture that runs a search counts in the first
test that asks for it) and the slowest tests. The files' seconds add up to about twice the wall time with two
test processes; `conftest.py`'s LONGEST_FIRST is meant to list the longest files first.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from collections import defaultdict

DURATION = re.compile(r"^\s*([0-9.]+)s (setup|call|teardown)\s+(\S+)$")


def durations(output: str) -> dict[str, float]:
    """Seconds per test id (its setup, call and teardown) from pytest's `--durations=0` report."""
    seconds: dict[str, float] = defaultdict(float)
    for line in output.splitlines():
        found = DURATION.match(line)
        if found:
            seconds[found.group(3)] += float(found.group(1))
    return dict(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--top", type=int, default=15, help="how many files and tests to list")
    parser.add_argument("pytest_args", nargs="*", help="after --: what pytest runs (default: the README's tests)")
    args = parser.parse_args()
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", "--durations=0", "-q", *args.pytest_args],
                          capture_output=True, text=True)
    wall = time.perf_counter() - started
    tests = durations(done.stdout)
    files: dict[str, float] = defaultdict(float)
    for test, seconds in tests.items():
        files[test.split("::")[0]] += seconds
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else "(no output)"
    print(f"wall {wall:.0f} s; tests' seconds summed {sum(tests.values()):.0f}; pytest: {summary}")
    print(f"\n{'seconds':>8}  file")
    for name, seconds in sorted(files.items(), key=lambda item: -item[1])[:args.top]:
        print(f"{seconds:8.1f}  {name}")
    print(f"\n{'seconds':>8}  test")
    for name, seconds in sorted(tests.items(), key=lambda item: -item[1])[:args.top]:
        print(f"{seconds:8.1f}  {name}")
    sys.exit(done.returncode)


if __name__ == "__main__":
    main()
