"""Tiny real study specs for the search tests: small data (a subset of the embedded set, so a trial's predictions
on the validation and test splits take a fraction of a second), one or two epochs, fast models."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from search.execution.lifecycle import descendants

__all__ = ["descendants"]  # the tests' name for it

POSTGRES_URL = os.environ.get("CELLSEARCH_TEST_POSTGRES",
                              "postgresql://cellsearch:cellsearch@127.0.0.1:5432/cellsearch")

TINY_SPEC = """
name = "{name}"
out = "{out}"

[data]
path = "{data}"
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


SMALL = {"train": 1200, "val": 240, "test": 320}  # images per split of `small_data`


def small_data(path: Path, sizes: dict[str, int] = SMALL) -> Path:
    """A stratified-enough random subset of the embedded data in MedMNIST layout (with file ids)."""
    import numpy as np

    from data_pipeline.loaders import default_data_path

    rng = np.random.default_rng(0)
    arrays = {}
    with np.load(default_data_path()) as full:
        for split, size in sizes.items():
            keep = np.sort(rng.choice(len(full[f"{split}_labels"]), size, replace=False))
            for key in ("images", "labels", "files"):
                arrays[f"{split}_{key}"] = full[f"{split}_{key}"][keep]
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path


def write_tiny_spec(folder: Path, name: str = "tiny", trials: int = 2, min_epochs: int = 1, max_epochs: int = 2,
                    pruner: str = "none", extra: str = "", train_images: int = 320, data: Path | None = None) -> Path:
    """The spec file of a tiny study on `data` (default: `small_data` written into `folder`)."""
    data = data or small_data(folder / "small_cells.npz")
    path = folder / f"{name}.toml"
    path.write_text(TINY_SPEC.format(name=name, out=folder / "runs", trials=trials, min_epochs=min_epochs,
                                     max_epochs=max_epochs, pruner=pruner, train_images=train_images,
                                     data=data.as_posix()) + extra)
    return path


def run_search(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "search.run", "--no-progress", *args], capture_output=True,
                          text=True, timeout=timeout)


def require_postgres() -> str:
    """The test server's URL; skips without one, except on CI, which must provide it (.ci/postgres.sh)."""
    import pytest

    from search.execution.storage import open_storage

    try:
        open_storage(POSTGRES_URL, heartbeat_interval=None)
    except Exception:
        if os.environ.get("CI"):
            pytest.fail(f"CI must provide PostgreSQL at {POSTGRES_URL} (see .ci/postgres.sh)")
        pytest.skip("no PostgreSQL server on localhost")
    return POSTGRES_URL


def trial_pids(trials: list) -> set[int]:
    """The processes that ran these trials (their runner recorded `worker` = host:pid)."""
    return {int(t.user_attrs["worker"].rsplit(":", 1)[1]) for t in trials if "worker" in t.user_attrs}


# ------------------------------------------------------------------------------- servers and clusters
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(condition, timeout: float, what: str, every: float = 0.5):
    """Poll `condition()` until it returns something true; raise naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            found = condition()
            if found:
                return found
        time.sleep(every)
    raise AssertionError(f"{what}: not within {timeout:.0f} s")


# Token authentication off (Ray 2.5x turns it on for `ray start`); no usage reports.
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


class RayNode:
    """One node of a Ray cluster on this machine, started with `ray start --block` in its own session: its
    own ports and temp dir, so several nodes (and other users' Ray) share the host; `kill()` takes the
    whole node down at once, as a machine that dies."""

    def __init__(self, folder: Path, name: str, cpus: int, head_address: str | None = None,
                 env: dict | None = None, ip: str | None = None) -> None:
        self.log = folder / f"ray_{name}.log"
        ports = {"--node-manager-port": free_port(), "--object-manager-port": free_port(),
                 "--dashboard-agent-listen-port": free_port(), "--metrics-export-port": free_port()}
        self.temp_dir = tempfile.mkdtemp(prefix=f"ray_{name}_", dir="/tmp")  # socket paths: at most 107 bytes
        command = ["ray", "start", "--block", "--num-cpus", str(cpus), "--num-gpus", "0", "--disable-usage-stats",
                   "--object-store-memory", str(100 * 2**20), "--temp-dir", self.temp_dir]
        if head_address is None:
            self.port = free_port()
            ports.update({"--port": self.port, "--ray-client-server-port": free_port(),
                          "--dashboard-port": free_port()})
            command += ["--head", "--include-dashboard", "false"]
        else:
            command += ["--address", head_address]
        if ip:
            command += ["--node-ip-address", ip]
        command += [str(part) for pair in ports.items() for part in pair]
        self.process = subprocess.Popen([str(Path(sys.executable).parent / command[0]), *command[1:]],
                                        env={**os.environ, **RAY_ENV, **(env or {})}, stdout=self.log.open("w"),
                                        stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(lambda: "block forever" in self.log.read_text() or self.process.poll() is not None, 120,
                 f"ray node {name} start")
        if self.process.poll() is not None:
            raise AssertionError(f"ray node {name} did not start: {self.log.read_text()[-2000:]}")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def pids(self) -> set[int]:
        return {self.process.pid} | descendants(self.process.pid)

    def kill(self) -> None:
        """SIGKILL every process of the node (raylet, its workers, agents), as a machine that dies."""
        pids = self.pids()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        for pid in pids:  # a worker that left the process group
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.wait(timeout=30)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@contextlib.contextmanager
def ray_cluster(folder: Path, nodes: int = 2, cpus: int = 1, env: dict | None = None) -> Iterator[list[RayNode]]:
    """A head node and `nodes - 1` nodes joined with `--address`, each with `cpus` CPUs; all killed after.

    The joined nodes take loopback addresses of their own (127.0.0.2, ...): a driver attaches to the node of
    its own address, so it never sits on a node a test kills."""
    started: list[RayNode] = []
    try:
        started.append(RayNode(folder, "head", cpus, env=env))
        for index in range(1, nodes):
            started.append(RayNode(folder, f"node{index}", cpus, head_address=started[0].address, env=env,
                                   ip=f"127.0.0.{index + 1}"))
        yield started
    finally:
        for node in reversed(started):
            node.kill()


@contextlib.contextmanager
def moto_s3(folder: Path) -> Iterator[dict[str, str]]:
    """A local S3 server (moto in server mode) on a free port; yields the environment that points boto3 at
    it. Skips the test when moto is not installed."""
    import pytest

    server = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or shutil.which("moto_server")
    if server is None:
        pytest.skip("moto[server] is not installed")
    port = free_port()
    process = subprocess.Popen([server, "-H", "127.0.0.1", "-p", str(port)], stdout=(folder / "moto.log").open("w"),
                               stderr=subprocess.STDOUT, start_new_session=True)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        wait_for(lambda: socket.create_connection(("127.0.0.1", port), timeout=1).close() or True, 30, "moto_server")
        yield env
    finally:
        process.kill()
        process.wait(timeout=10)

