"""Decide how many workers run and which device each one owns, without initialising TensorFlow."""

from __future__ import annotations

import os
import shutil
import subprocess

from common.errors import ConfigError
from search.execution.devices import GPU_MEMORY, WorkerDevices


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


def usable_cores(cpus: int | None = None) -> list[int]:
    """The cores this process may run on (its affinity), the first `cpus` of them when given."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    if cpus is not None:
        if cpus < 1:
            raise ConfigError(f"invalid cpus value {cpus}: need at least 1")
        if cpus > len(cores):
            raise ConfigError(f"invalid cpus value {cpus}: only {len(cores)} core(s) available")
        cores = cores[:cpus]
    return cores


def default_workers(gpus: list[str], cores: list[int]) -> int:
    """One worker per GPU; with no GPU, one per core, at most 8."""
    return len(gpus) if gpus else min(len(cores), 8)


def plan_workers(gpus: list[str], workers: int | None, cores: list[int] | None = None) -> list[WorkerDevices]:
    """`workers` slots, by default one per GPU, else one single-threaded one per core (`default_workers`).

    The cores are split evenly and, when each worker gets whole cores, pinned (a core is the CPU's
    device, as a GPU is): workers then neither fight over threads nor migrate onto each other's caches.
    A lone worker takes all the cores it is given. Workers beyond one per GPU share the GPUs in turn, each
    capped at its share of GPU_MEMORY.
    """
    cores = list(cores) if cores is not None else usable_cores()
    if workers is not None and workers < 1:
        raise ConfigError(f"invalid worker count {workers}: need at least 1")
    count = workers or default_workers(gpus, cores)
    threads = max(1, len(cores) // count)
    pinned = len(cores) >= count

    def share(i: int) -> tuple[int, ...] | None:
        return tuple(cores[i * threads:(i + 1) * threads]) if pinned else None

    def memory(i: int) -> float | None:
        sharing = len(range(i % len(gpus), count, len(gpus))) if gpus else 1
        return round(GPU_MEMORY / sharing, 3) if sharing > 1 else None

    return [WorkerDevices(gpu=gpus[i % len(gpus)] if gpus else None, cpu_threads=threads, cpu_cores=share(i),
                          gpu_memory=memory(i)) for i in range(count)]
