"""Tiny real study specs for the search tests: small data, one or two epochs, fast models."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

POSTGRES_URL = os.environ.get("CELLSEARCH_TEST_POSTGRES",
                              "postgresql://cellsearch:cellsearch@127.0.0.1:5432/cellsearch")

TINY_SPEC = """
name = "{name}"
out = "{out}"

[data]
max_train_images = {train_images}

[space]
backbones = ["compact_cnn"]
augment_policies = ["light", "none"]
optimizers = ["adamw", "adam"]
learning_rate = [1e-3, 5e-3]
batch_size = [64]
epochs = [{min_epochs}, {max_epochs}]

[budget]
trials = {trials}
tta_views = 1
early_stopping_patience = 3

[algorithm]
pruner = "{pruner}"
min_resource = 1
n_startup_trials = 2

[storage]
heartbeat_interval = 2
grace_period = 6
max_retry = 1
"""


def write_tiny_spec(folder: Path, name: str = "tiny", trials: int = 2, min_epochs: int = 1, max_epochs: int = 2,
                    pruner: str = "none", extra: str = "", train_images: int = 320) -> Path:
    path = folder / f"{name}.toml"
    path.write_text(TINY_SPEC.format(name=name, out=folder / "runs", trials=trials, min_epochs=min_epochs,
                                     max_epochs=max_epochs, pruner=pruner,
                                     train_images=train_images) + extra)
    return path


def run_search(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "search.run", "--no-progress", *args], capture_output=True,
                          text=True, timeout=timeout)


def require_postgres() -> str:
    """The test server's URL; skips without one, except on CI, which must provide it (.ci/postgres.sh)."""
    import pytest

    from search.storage import open_storage

    try:
        open_storage(POSTGRES_URL, heartbeat_interval=None)
    except Exception:
        if os.environ.get("CI"):
            pytest.fail(f"CI must provide PostgreSQL at {POSTGRES_URL} (see .ci/postgres.sh)")
        pytest.skip("no PostgreSQL server on localhost")
    return POSTGRES_URL


def descendants(pid: int) -> set[int]:
    """Every process below `pid` in the process tree (Linux /proc)."""
    found, todo = set(), [pid]
    while todo:
        for task in Path(f"/proc/{todo.pop()}/task").glob("*"):
            with contextlib.suppress(OSError):
                children = {int(c) for c in (task / "children").read_text().split()} - found
                todo.extend(children)
                found |= children
    return found


def trial_pids(trials: list) -> set[int]:
    """The processes that ran these trials (their runner recorded `worker` = host:pid)."""
    return {int(t.user_attrs["worker"].rsplit(":", 1)[1]) for t in trials if "worker" in t.user_attrs}
