"""Interrupting and resuming `python -m search.run` the way users do, with real processes and real signals:
Ctrl-C / SIGTERM / SIGKILL on the driver, the rerun that resumes, two drivers on one study, and an artifact
store that stops taking files mid-study; local executor, and the same faults on the Ray executor (real Ray,
simulated GPUs)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from search.execution.lifecycle import FAIL_REASON, INTERRUPTED, RETRY_ATTR, process_alive
from search.trial.objective import ARTIFACT_ATTR_PREFIX
from search.study.spec import load_spec
from search.execution.storage import open_storage
from search.study.optuna_study import FINISHED
from search.trial.trainer import ARTIFACT_FILES
from search_helpers import descendants, require_postgres, run_search, trial_pids, write_tiny_spec

STOP_WITHIN_S = 10


def start_driver(spec_path: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "search.run", "--no-progress", "--study", str(spec_path),
                             *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def trials(spec_path: Path, storage: str | None = None) -> list[optuna.trial.FrozenTrial]:
    spec = load_spec(str(spec_path))
    url = storage or spec.location.storage
    return optuna.load_study(study_name=spec.name, storage=open_storage(url, heartbeat_interval=None)).trials


def wait_for_training(spec_path: Path, count: int = 1, storage: str | None = None,
                      timeout: float = 400) -> list[optuna.trial.FrozenTrial]:
    """Wait until `count` trials run in workers (their runner recorded `worker`)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        time.sleep(0.5)
        with contextlib.suppress(Exception):  # the study may not exist yet
            running = [t for t in trials(spec_path, storage)
                       if t.state == TrialState.RUNNING and "worker" in t.user_attrs]
            if len(running) >= count:
                return running
    raise AssertionError(f"{count} trial(s) never ran")


def worker_pids(folder: Path) -> set[int]:
    """Live `search.execution.worker` processes of the study under `folder`, wherever they were reparented."""
    pids = set()
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if entry.name.isdigit():
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if "search.execution.worker" in command and str(folder) in command and state != "Z":
                    pids.add(int(entry.name))
    return pids


def seconds_until_no_worker(folder: Path, limit: float) -> float:
    start = time.monotonic()
    while worker_pids(folder) and time.monotonic() - start < limit:
        time.sleep(0.1)
    return time.monotonic() - start


def worker_logs(spec_path: Path, tail: int = 3000) -> str:
    """The end of each worker's log: what a failed assertion about the workers shows."""
    logs = sorted(load_spec(str(spec_path)).location.logs_dir.glob("worker_*.log"))
    return "\n".join(f"--- {log.name}\n{log.read_text(errors='replace')[-tail:]}" for log in logs)


def finished(all_trials) -> list:
    return [t for t in all_trials if t.state in FINISHED]


@pytest.mark.parametrize("signum", [signal.SIGINT, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)],
                         ids=["sigint", "sigterm"])  # the same path; SIGTERM also runs with -m slow
def test_signal_stops_every_worker_and_the_rerun_resumes(tmp_path, signum):
    spec_path = write_tiny_spec(tmp_path, name="stop", trials=2, min_epochs=3, max_epochs=3, train_images=1200)
    driver = start_driver(spec_path, "--workers", "2")
    try:
        interrupted = wait_for_training(spec_path, count=2)
        assert worker_pids(tmp_path)
        driver.send_signal(signum)
        out, err = driver.communicate(timeout=60)
    finally:
        driver.kill()
    assert seconds_until_no_worker(tmp_path, STOP_WITHIN_S) < STOP_WITHIN_S, "workers outlived the driver"
    assert driver.returncode == 128 + signum, err[-3000:]
    assert f"resume with: python -m search.run --no-progress --study {spec_path}" in out
    assert "2 interrupted" in out.splitlines()[-1]
    by_number = {t.number: t for t in trials(spec_path)}
    for trial in interrupted:
        assert by_number[trial.number].state == TrialState.FAIL
        assert by_number[trial.number].user_attrs[FAIL_REASON] == INTERRUPTED
    retries = {t.user_attrs[RETRY_ATTR]: t for t in by_number.values() if RETRY_ATTR in t.user_attrs}
    assert set(retries) == {t.number for t in interrupted}
    assert all(retries[t.number].state == TrialState.WAITING for t in interrupted)

    done = run_search("--study", str(spec_path), "--workers", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    after = trials(spec_path)
    assert len(finished(after)) == 2 and not [t for t in after if t.state == TrialState.RUNNING]
    rerun = {t.user_attrs.get(RETRY_ATTR): t for t in finished(after)}
    for trial in interrupted:  # the interrupted configurations ran again
        assert rerun[trial.number].params == trial.params


def test_killed_driver_takes_its_workers_with_it(tmp_path):
    spec_path = write_tiny_spec(tmp_path, name="orphans", trials=2, min_epochs=3, max_epochs=3,
                                train_images=1200)
    driver = start_driver(spec_path, "--workers", "2")
    try:
        interrupted = wait_for_training(spec_path, count=1)
        driver.kill()
        driver.wait(timeout=30)
    finally:
        driver.kill()
    assert seconds_until_no_worker(tmp_path, STOP_WITHIN_S) < STOP_WITHIN_S, "workers kept training unseen"
    by_number = {t.number: t for t in trials(spec_path)}
    for trial in interrupted:  # each worker recorded its own trial on the way out
        assert by_number[trial.number].state == TrialState.FAIL, worker_logs(spec_path)
        assert by_number[trial.number].user_attrs[FAIL_REASON] == INTERRUPTED
        assert any(t.user_attrs.get(RETRY_ATTR) == trial.number for t in by_number.values())


STUCK_WORKER = """
import ctypes, os, sys, time
import optuna
from search.execution import lifecycle
from search.execution.storage import open_storage

lifecycle.WORKER_GRACE_S, lifecycle.LAST_WORDS_S = 4, 2
url = sys.argv[1]
study = optuna.create_study(study_name="stuck", storage=open_storage(url, heartbeat_interval=None))
trial = study.ask()
trial.suggest_int("x", 0, 9)
trial.set_user_attr("worker", lifecycle.worker_id())
signals = lifecycle.WorkerSignals().install()
signals.record_when_stuck(study, url)
if sys.argv[2] == "recording_hangs":
    signals.last_words = lambda: time.sleep(60)

def stuck_in_native_code():
    with signals.interruptible(False):  # the signal lands where it must not cut in
        print("ready", flush=True)
        while not signals.requested:
            time.sleep(0.01)
    ctypes.CDLL(None).sleep(60)  # then a long native call that no signal handler interrupts

stuck_in_native_code()
"""


@pytest.mark.parametrize("case", ["recorded", "recording_hangs"])
def test_a_worker_stuck_in_native_code_records_its_trial_and_exits_in_its_grace_period(tmp_path, case):
    """A signal handler waits for the main thread; a worker stuck in native code past part of its grace period
    (TensorFlow optimising a graph under load) records its trial from another thread and exits, and says where
    its threads were; should even that hang, it still exits within the grace period."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    worker = subprocess.Popen([sys.executable, "-c", STUCK_WORKER, url, case], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        assert worker.stdout.readline().strip() == "ready"
        worker.send_signal(signal.SIGTERM)
        start = time.monotonic()
        _, err = worker.communicate(timeout=STOP_WITHIN_S)
        took = time.monotonic() - start
    finally:
        worker.kill()
    assert "stuck_in_native_code" in err
    assert took < 4 + 1
    if case == "recording_hangs":
        assert worker.returncode == 1 and "Timeout" in err, err
        return
    assert worker.returncode == 128 + signal.SIGTERM, err
    assert "SIGTERM did not stop the trial in 2 s: recorded as interrupted" in err
    stuck, retry = optuna.load_study(study_name="stuck", storage=open_storage(url, heartbeat_interval=None)).trials
    assert stuck.state == TrialState.FAIL and stuck.user_attrs[FAIL_REASON] == INTERRUPTED
    assert retry.state == TrialState.WAITING and retry.user_attrs[RETRY_ATTR] == 0
    assert retry.system_attrs["fixed_params"] == stuck.params  # what an enqueued trial will be given


MANGLING_WORKER = """
import sys, time
import optuna
from search.execution import lifecycle
from search.execution.storage import open_storage

lifecycle.WORKER_GRACE_S = 8
url = sys.argv[1]
study = optuna.create_study(study_name="mangled", storage=open_storage(url, heartbeat_interval=None))
signals = lifecycle.WorkerSignals().install()

def objective(trial):
    trial.suggest_int("x", 0, 9)
    print("ready", flush=True)
    try:
        while True:
            time.sleep(0.01)
    except KeyboardInterrupt:  # what TensorFlow's native code made of it: a bare TypeError
        raise TypeError() from None

study.optimize(signals.objective(objective), n_trials=1, catch=(Exception,))
"""


def test_an_interruption_native_code_turned_into_another_error_is_still_recorded_as_interrupted(tmp_path):
    """A signal that lands inside TensorFlow can come out of the trial as a TypeError: the trial is still
    interrupted and queued again, not failed as the user's error."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    worker = subprocess.Popen([sys.executable, "-c", MANGLING_WORKER, url], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        assert worker.stdout.readline().strip() == "ready"
        worker.send_signal(signal.SIGINT)
        _, err = worker.communicate(timeout=STOP_WITHIN_S)
    finally:
        worker.kill()
    assert "Interrupted: SIGINT" in err, err[-2000:]
    cut, retry = optuna.load_study(study_name="mangled", storage=open_storage(url, heartbeat_interval=None)).trials
    assert cut.state == TrialState.FAIL and cut.user_attrs[FAIL_REASON] == INTERRUPTED, err[-2000:]
    assert retry.state == TrialState.WAITING and retry.user_attrs[RETRY_ATTR] == 0


@pytest.mark.parametrize("backend", [pytest.param("sqlite", marks=pytest.mark.slow), "postgresql"])
def test_two_drivers_share_one_study(tmp_path, backend):
    storage = None
    name = "shared"
    if backend == "postgresql":
        storage, name = require_postgres(), f"shared_{os.getpid()}_{int(time.time())}"
    total = 4
    spec_path = write_tiny_spec(tmp_path, name=name, trials=total, max_epochs=1)
    extra = ("--storage", storage) if storage else ()
    first = start_driver(spec_path, "--workers", "1", *extra)
    try:
        wait_for_training(spec_path, storage=storage)  # a second terminal, started a little later
        second = start_driver(spec_path, "--workers", "1", *extra)
        outputs = [driver.communicate(timeout=900) for driver in (first, second)]
    finally:
        first.kill()
    for driver, (out, err) in zip((first, second), outputs):
        assert driver.returncode == 0, err[-3000:]
        assert "database is locked" not in err
    all_trials = trials(spec_path, storage)
    assert total <= len(finished(all_trials)) <= total + 2
    assert {t.state for t in all_trials} <= set(FINISHED), [(t.number, t.state, t.user_attrs) for t in all_trials]
    assert len({t.user_attrs["worker"] for t in all_trials}) == 2, "one driver did all the work"
    if storage:
        optuna.delete_study(study_name=name, storage=storage)


@contextlib.contextmanager
def read_only(folder: Path):
    """No one may create files in `folder`, root included (root ignores permission bits: `chattr +i`)."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
    elif not shutil.which("chattr") or subprocess.run(["chattr", "+i", str(folder)]).returncode != 0:
        pytest.skip("running as root without chattr: cannot make a folder read-only")
    try:
        yield
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        folder.chmod(0o755)


def test_artifact_store_turning_read_only_fails_the_study_in_one_line(tmp_path):
    spec_path = write_tiny_spec(tmp_path, name="readonly", trials=3, min_epochs=2, max_epochs=2,
                                train_images=1200)
    artifacts = load_spec(str(spec_path)).study_dir / "artifacts"
    driver = start_driver(spec_path, "--workers", "1")
    try:
        wait_for_training(spec_path)
        with read_only(artifacts):
            out, err = driver.communicate(timeout=600)
    finally:
        driver.kill()
    assert driver.returncode == 2, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error: ")]  # besides Optuna's log
    assert len(errors) == 1 and err.strip().endswith(errors[0])
    assert errors[0].startswith(f"error: worker 0 stopped: artifact store {artifacts} is not writable")
    assert seconds_until_no_worker(tmp_path, STOP_WITHIN_S) < STOP_WITHIN_S
    for trial in trials(spec_path):
        if trial.state == TrialState.COMPLETE:  # only if it was published before the store turned read-only
            assert all(ARTIFACT_ATTR_PREFIX + name in trial.user_attrs for name in ARTIFACT_FILES)
            assert all((artifacts / trial.user_attrs[ARTIFACT_ATTR_PREFIX + n]).is_file() for n in ARTIFACT_FILES)


# ------------------------------------------------------------------------------------------------- ray
RAY = ("--executor", "ray", "--gpus", "0,1")


def seconds_until_gone(pids: set[int], limit: float) -> float:
    start = time.monotonic()
    while any(map(process_alive, pids)) and time.monotonic() - start < limit:
        time.sleep(0.1)
    return time.monotonic() - start


@contextlib.contextmanager
def ray_driver(spec_path: Path) -> Iterator[tuple[subprocess.Popen, set[int]]]:
    """A Ray driver and the numbers of its trials in training; on the way out, its Ray processes (raylet,
    GCS) that outlived it are killed."""
    driver = start_driver(spec_path, *RAY)
    started: set[int] = set()
    try:
        running = {t.number for t in wait_for_training(spec_path)}
        started = descendants(driver.pid)
        yield driver, running
    finally:
        driver.kill()
        for pid in started:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def assert_interrupted_and_queued(spec_path: Path, interrupted: set[int]) -> None:
    by_number = {t.number: t for t in trials(spec_path)}
    for number in interrupted:
        assert by_number[number].state == TrialState.FAIL
        assert by_number[number].user_attrs[FAIL_REASON] == INTERRUPTED
    retries = {t.user_attrs[RETRY_ATTR]: t.state for t in by_number.values() if RETRY_ATTR in t.user_attrs}
    assert {n: retries.get(n) for n in interrupted} == {n: TrialState.WAITING for n in interrupted}


def ray_spec(tmp_path: Path, name: str, trials: int = 2) -> Path:
    return write_tiny_spec(tmp_path, name=name, trials=trials, min_epochs=3, max_epochs=3, train_images=1200)


def test_ray_ctrl_c_stops_every_trial_process_and_queues_the_trials(tmp_path):
    spec_path = ray_spec(tmp_path, "raystop")
    with ray_driver(spec_path) as (driver, running):
        driver.send_signal(signal.SIGINT)
        out, err = driver.communicate(timeout=60)
    assert driver.returncode == 128 + signal.SIGINT, err[-3000:]
    pids = trial_pids(trials(spec_path))
    assert seconds_until_gone(pids, STOP_WITHIN_S) < STOP_WITHIN_S, "trials outlived the driver"
    assert "interrupted" in out.splitlines()[-1] and "resume with: python -m search.run" in out
    assert_interrupted_and_queued(spec_path, running)


def test_the_reaper_kills_what_a_killed_driver_left():
    """The watchdog a private Ray gets: a process the driver started outlives it by the reaper's delay only
    (and the reaper, whose own command line matches, does not kill itself first)."""
    code = ("import subprocess, sys, time\n"
            "from search.execution.lifecycle import start_reaper\n"
            "orphan = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)', 'cellsearch-orphan'])\n"
            "start_reaper('cellsearch-orphan', 0.5)\n"
            "print(orphan.pid, flush=True)\n"
            "time.sleep(120)\n")
    driver = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        orphan = int(driver.stdout.readline())
        time.sleep(5)  # the reaper imports the package, then notes the orphan
        driver.kill()
        driver.wait(timeout=30)
        assert seconds_until_gone({orphan}, STOP_WITHIN_S) < 5
    finally:
        driver.kill()
        with contextlib.suppress(Exception):
            os.kill(orphan, signal.SIGKILL)


# Slow: under load Ray can reap an actor before it records its trial (RUNNING until its heartbeat is stale, then
# queued again); test_killed_driver_takes_its_workers_with_it checks the local executor by default.
@pytest.mark.slow
def test_ray_trials_end_themselves_when_the_driver_is_killed(tmp_path):
    spec_path = ray_spec(tmp_path, "rayorphans")
    with ray_driver(spec_path) as (driver, running):
        pids = trial_pids(trials(spec_path))
        ray_processes = descendants(driver.pid)  # its private Ray: GCS, raylet, agents, worker actors
        driver.kill()
        driver.wait(timeout=30)
        assert seconds_until_gone(pids, 5) < 5, "trials kept training unseen"
        # Ray's own processes (none training) are reaped a few seconds later (3.1-3.5 s on an idle machine).
        assert seconds_until_gone(ray_processes, STOP_WITHIN_S) < STOP_WITHIN_S, "Ray's processes outlived the driver"
    assert_interrupted_and_queued(spec_path, running)  # each actor recorded its own trial on the way out


@pytest.mark.slow  # the local executor's twin above runs by default
def test_ray_artifact_store_turning_read_only_fails_the_study_in_one_line(tmp_path):
    spec_path = write_tiny_spec(tmp_path, name="rayreadonly", trials=2, min_epochs=2, max_epochs=2,
                                train_images=1200)
    artifacts = load_spec(str(spec_path)).study_dir / "artifacts"
    with ray_driver(spec_path) as (driver, _), read_only(artifacts):
        out, err = driver.communicate(timeout=300)
    assert driver.returncode == 2, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and err.strip().endswith(errors[0])
    assert re.match(rf"error: worker \d stopped: artifact store {re.escape(str(artifacts))} is not writable", errors[0])
    assert seconds_until_gone(trial_pids(trials(spec_path)), STOP_WITHIN_S) < STOP_WITHIN_S
    assert not [t for t in trials(spec_path) if t.state in (TrialState.COMPLETE, TrialState.RUNNING)]
