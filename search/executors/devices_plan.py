"""Decide how many workers run and which device each one owns, without initialising TensorFlow."""

from __future__ import annotations

import os
import shutil
import subprocess

from search.config import ConfigError
from search.devices import WorkerDevices


def detect_gpus() -> list[str]:
    """GPU ids from `nvidia-smi -L` (honouring CUDA_VISIBLE_DEVICES); none when there is no driver."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g for g in visible.split(",") if g.strip() and g.strip() != "-1"]
    if not shutil.which("nvidia-smi"):
        return []
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(listing.splitlines()) if line.startswith("GPU ")]


def parse_gpus(value: str | None) -> list[str]:
    """`None`/"auto": detect; "none": CPU only; "0,2": those ids; "4": ids 0..3 (real or simulated)."""
    if value is None or value == "auto":
        return detect_gpus()
    if value == "none":
        return []
    if value.isdigit() and "," not in value:
        return [str(i) for i in range(int(value))]
    ids = [part.strip() for part in value.split(",") if part.strip()]
    if not ids or not all(part.isdigit() for part in ids):
        raise ConfigError(f"invalid --gpus value {value!r}: use auto, none, a count, or ids like 0,1")
    return ids


def plan_workers(gpus: list[str], workers: int | None, cpu_count: int | None = None) -> list[WorkerDevices]:
    """One worker per GPU; with no GPU, one single-threaded worker per core (at most 8) by default.

    CPU threads are split evenly so workers don't fight over cores: two 1-thread workers on two cores
    finish nearly twice the trials of one 2-thread worker, because small models scale poorly across threads.
    """
    cores = cpu_count or os.cpu_count() or 1
    if workers is not None and workers < 1:
        raise ConfigError(f"invalid worker count {workers}: need at least 1")
    count = workers or (len(gpus) if gpus else min(cores, 8))
    threads = max(1, cores // count)
    return [WorkerDevices(gpu=gpus[i % len(gpus)] if gpus else None, cpu_threads=threads) for i in range(count)]
