"""The local executor: N worker processes sharing one Optuna storage, one per GPU or per CPU share."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import optuna

from data_pipeline.atomic import atomic_write_text
from search.devices import WorkerDevices, pin_environment
from search.progress import watch
from search.spec import StudySpec


def worker_command(spec_file: Path, storage_url: str, artifacts: str, index: int,
                   deadline: float | None) -> list[str]:
    command = [sys.executable, "-m", "search.worker", "--spec-file", str(spec_file), "--storage", storage_url,
               "--artifacts", artifacts, "--index", str(index)]
    return command + (["--deadline", str(deadline)] if deadline else [])


def start_workers(spec: StudySpec, storage_url: str, artifacts: str, devices: list[WorkerDevices],
                  deadline: float | None) -> list[subprocess.Popen]:
    spec_file = spec.study_dir / "spec.json"
    atomic_write_text(spec_file, json.dumps(spec.to_dict(), indent=2))
    log_dir = spec.study_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    processes = []
    for index, device in enumerate(devices):
        env = {**os.environ, **pin_environment(device)}
        log = open(log_dir / f"worker_{index}.log", "ab")
        processes.append(subprocess.Popen(worker_command(spec_file, storage_url, artifacts, index, deadline),
                                          env=env, stdout=log, stderr=subprocess.STDOUT))
    return processes


def run_local(spec: StudySpec, study: optuna.Study, storage_url: str, artifacts: str,
              devices: list[WorkerDevices], deadline: float | None, show_progress: bool = True) -> dict:
    """Run workers to the end of the budget; Ctrl-C stops them (their RUNNING trials fail, nothing else)."""
    processes = start_workers(spec, storage_url, artifacts, devices, deadline)
    try:
        if show_progress:
            watch(study, spec.budget.trials, lambda: any(p.poll() is None for p in processes))
        for process in processes:
            process.wait()
    except KeyboardInterrupt:
        for process in processes:
            process.send_signal(signal.SIGINT)  # Optuna fails the running trial cleanly
        for process in processes:
            process.wait(timeout=60)
        raise
    failed = [i for i, p in enumerate(processes) if p.returncode != 0]
    return {"workers": len(processes), "failed_workers": failed}
