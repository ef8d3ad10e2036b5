"""Device set-up for one worker process: which GPU it owns, memory growth, threads, mixed precision, XLA.

Everything here must run before TensorFlow touches a device, so workers call `configure_worker` first.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


#: Environment variable naming the CPU cores a worker is pinned to ("0,1"); the CPU analogue of
#: CUDA_VISIBLE_DEVICES.
CORES_VARIABLE = "CELLSEARCH_CPU_CORES"


@dataclass(frozen=True)
class WorkerDevices:
    """What one worker process may use: a GPU id (None for CPU), its share of CPU threads and, when the
    cores split evenly between workers, the cores themselves (so workers never migrate onto each other)."""

    gpu: str | None = None
    cpu_threads: int | None = None
    cpu_cores: tuple[int, ...] | None = None


def pin_environment(devices: WorkerDevices) -> dict[str, str]:
    """Environment for a worker subprocess: CUDA_VISIBLE_DEVICES pins one GPU (or hides all), and
    CELLSEARCH_CPU_CORES the worker's cores."""
    env = {"TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"), "KERAS_BACKEND": "tensorflow"}
    env["CUDA_VISIBLE_DEVICES"] = devices.gpu if devices.gpu is not None else ""
    if devices.cpu_threads:
        threads = str(devices.cpu_threads)
        env.update(OMP_NUM_THREADS=threads, TF_NUM_INTRAOP_THREADS=threads, TF_NUM_INTEROP_THREADS="1")
    if devices.cpu_cores:
        env[CORES_VARIABLE] = ",".join(str(c) for c in devices.cpu_cores)
    return env


def pin_cpu_cores() -> tuple[int, ...] | None:
    """Restrict this process to the cores in CELLSEARCH_CPU_CORES (Linux); a no-op when unset or
    unsupported. Must run before TensorFlow starts: its thread pools size themselves from the affinity."""
    value = os.environ.get(CORES_VARIABLE, "").strip()
    if not value or not hasattr(os, "sched_setaffinity"):
        return None
    cores = tuple(int(c) for c in value.split(","))
    os.sched_setaffinity(0, cores)
    return cores


def configure_tensorflow(cpu_threads: int | None = None) -> list:
    """Pin CPU cores, turn on GPU memory growth (so a worker takes only what its trial needs), cap threads."""
    pin_cpu_cores()
    import tensorflow as tf

    threads = cpu_threads or int(os.environ.get("TF_NUM_INTRAOP_THREADS", "0") or 0)
    if threads:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # already initialised in this process: growth can no longer change
            pass
    return gpus


def has_gpu() -> bool:
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def resolve_switch(setting: str) -> bool:
    """'on'/'off' are explicit; 'auto' means on exactly when a GPU is present (mixed precision, XLA)."""
    return setting == "on" or (setting == "auto" and has_gpu())
