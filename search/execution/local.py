"""The local executor: N worker processes sharing one Optuna storage, one per GPU or per CPU share."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import optuna

from common.atomic import atomic_write_text
from common.errors import Interrupted, WorkerFailed
from search.execution.devices import WorkerDevices, pin_environment
from search.execution.lifecycle import (driver_signals, fail_interrupted, probe_artifact_store, stop_processes,
                                        storage_failures, trials_of_workers)
from search.execution.progress import print_interrupted, watch
from search.study.spec import StudySpec

if TYPE_CHECKING:
    from search.execution.driver import Deadlines

USER_ERROR_EXIT = 2  # run_cli's exit code: the worker printed `error: ...` as its last line


def worker_command(spec_file: Path, storage_url: str, artifacts: str, index: int,
                   deadline: float | None) -> list[str]:
    command = [sys.executable, "-m", "search.execution.worker", "--spec-file", str(spec_file), "--storage", storage_url,
               "--artifacts", artifacts, "--index", str(index), "--driver-pid", str(os.getpid())]
    return command + (["--deadline", str(deadline)] if deadline else [])


def log_path(spec: StudySpec, index: int) -> Path:
    return spec.location.logs_dir / f"worker_{index}.log"


def start_workers(spec: StudySpec, storage_url: str, artifacts: str, devices: list[WorkerDevices],
                  deadline: float | None) -> list[subprocess.Popen]:
    spec_file = spec.location.spec_file
    atomic_write_text(spec_file, json.dumps(spec.to_dict(), indent=2))
    log_path(spec, 0).parent.mkdir(parents=True, exist_ok=True)
    processes = []
    for index, device in enumerate(devices):
        env = {**os.environ, **pin_environment(device, spec.location.compile_cache_dir)}
        with open(log_path(spec, index), "ab") as log:
            processes.append(subprocess.Popen(worker_command(spec_file, storage_url, artifacts, index, deadline),
                                              env=env, stdout=log, stderr=subprocess.STDOUT))
    return processes


def workers_alive(spec: StudySpec, processes: list[subprocess.Popen]) -> bool:
    """Whether a worker still runs; raises WorkerFailed with its one-line error when one stopped on it."""
    for index, process in enumerate(processes):
        if process.poll() == USER_ERROR_EXIT:
            raise WorkerFailed(f"worker {index} stopped: {last_error(log_path(spec, index))}")
    return any(p.poll() is None for p in processes)


def last_error(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.startswith("error: ")]
    return lines[-1][len("error: "):] if lines else f"see {log}"


def until(deadlines: Deadlines | None, study: optuna.Study, is_running: Callable[[], bool]) -> Callable[[], bool]:
    """`is_running`, false once the deadlines' backstop has passed (`Deadlines.passed`), when there are any."""
    return lambda: is_running() and (deadlines is None or not deadlines.passed(study))


def stop_workers(study: optuna.Study, storage_url: str, processes: list[subprocess.Popen]) -> None:
    """Stop the workers the ordinary way; their unfinished trials fail as interrupted, queued again."""
    stop_processes(processes)
    with storage_failures(storage_url):
        fail_interrupted(study, storage_url, trials_of_workers(study, [p.pid for p in processes]))


def run_local(spec: StudySpec, study: optuna.Study, storage_url: str, artifacts: str,
              devices: list[WorkerDevices], deadlines: Deadlines | None, show_progress: bool = True) -> dict:
    """Run workers to the end of the budget or the `deadlines.workers` (unix time) by which their trials end.

    Ctrl-C or SIGTERM stops them within seconds: their unfinished trials fail as interrupted and are queued
    again, one line says how to resume, and `Interrupted` propagates. Workers still running past the deadlines'
    backstop (`Deadlines.passed`) are stopped the same way. A worker stopping on an error the study shares stops
    the others and raises its line (WorkerFailed)."""
    from search.execution.storage import open_artifact_store

    probe_artifact_store(open_artifact_store(artifacts), artifacts)
    started = time.time()
    with driver_signals():
        processes = start_workers(spec, storage_url, artifacts, devices, deadlines and deadlines.workers)
        try:
            with storage_failures(storage_url):
                watch(study, spec.budget.trials, until(deadlines, study, lambda: workers_alive(spec, processes)),
                      show=show_progress)
        except BaseException as stop:
            stop_workers(study, storage_url, processes)
            if isinstance(stop, Interrupted):
                with storage_failures(storage_url):
                    print_interrupted(study, spec.budget.trials, started)
            raise
        late = [p.pid for p in processes if p.poll() is None]
        if late:
            with storage_failures(storage_url):
                running = len(trials_of_workers(study, late))
            print(f"deadline: {len(late)} worker(s) still running stopped, {running} unfinished trial(s) recorded "
                  f"as interrupted (queued again)", flush=True)
            stop_workers(study, storage_url, processes)
    failed = [i for i, p in enumerate(processes) if p.returncode != 0]
    return {"workers": len(processes), "failed_workers": failed}
