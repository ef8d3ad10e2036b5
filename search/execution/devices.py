"""Device set-up for one worker process under any Keras backend: which GPU it owns, its share of GPU memory,
threads, mixed precision, XLA.

Everything here must run before the backend touches a device, so workers call `configure_backend` first.
The backend is the driver's KERAS_BACKEND (TensorFlow when unset), passed on to every worker; TensorFlow is
imported only when it is the backend.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from common.inference import cpu_has_bfloat16
from common.malloc import malloc_environment


#: Environment variable naming the CPU cores a worker is pinned to ("0,1"); the CPU analogue of
#: CUDA_VISIBLE_DEVICES.
CORES_VARIABLE = "CELLSEARCH_CPU_CORES"
#: Of a GPU's memory, what the workers sharing it split between them (the rest is the driver's and CUDA's).
GPU_MEMORY = 0.9
BACKENDS = ("jax", "tensorflow", "torch")


def backend_name() -> str:
    """The Keras backend: Keras' own once imported, else KERAS_BACKEND, else TensorFlow (Keras' default)."""
    if "keras" in sys.modules:
        return sys.modules["keras"].backend.backend()
    return os.environ.get("KERAS_BACKEND", "tensorflow")


@dataclass(frozen=True)
class WorkerDevices:
    """What one worker process may use: a GPU id (None for CPU), its share of CPU threads and, when the
    cores split evenly between workers, the cores themselves (so workers never migrate onto each other)."""

    gpu: str | None = None
    cpu_threads: int | None = None
    cpu_cores: tuple[int, ...] | None = None
    gpu_memory: float | None = None  # the share of its GPU's memory, when workers share the GPU


def pin_environment(devices: WorkerDevices, compile_cache: Path | None = None) -> dict[str, str]:
    """Environment for a worker subprocess: the Keras backend, CUDA_VISIBLE_DEVICES pinning one GPU (or hiding
    all), JAX allocating GPU memory as needed rather than 75% up front and, when workers share the GPU, up to
    its `gpu_memory` share (unless the user set a fraction), CELLSEARCH_CPU_CORES the worker's cores, glibc's
    malloc settings (`common.malloc`), and under JAX its persistent compilation cache in `compile_cache`
    (unless JAX_COMPILATION_CACHE_DIR names one already), so a graph one trial compiled loads from disk in the
    next (`benchmarks/bench_compile_cache.py`)."""
    env = {"TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"), "KERAS_BACKEND": backend_name(),
           "XLA_PYTHON_CLIENT_PREALLOCATE": os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE", "false")}
    if compile_cache is not None and env["KERAS_BACKEND"] == "jax":
        env["JAX_COMPILATION_CACHE_DIR"] = os.environ.get("JAX_COMPILATION_CACHE_DIR", str(compile_cache))
        # a trial's compile time is dozens of graphs under JAX's default 1 s threshold: cache them all
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
                                                                           "0")
    env.update(gpu_memory_environment(devices.gpu_memory))
    env["CUDA_VISIBLE_DEVICES"] = devices.gpu if devices.gpu is not None else ""
    if devices.cpu_threads:
        threads = str(devices.cpu_threads)
        env.update(OMP_NUM_THREADS=threads, TF_NUM_INTRAOP_THREADS=threads, TF_NUM_INTEROP_THREADS="1")
        if devices.cpu_threads == 1:  # XLA's CPU client (JAX) otherwise runs Eigen on every core
            env["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()
    if devices.cpu_cores:
        env[CORES_VARIABLE] = ",".join(str(c) for c in devices.cpu_cores)
    env.update(malloc_environment(devices.cpu_threads))
    return env


def gpu_memory_environment(share: float | None) -> dict[str, str]:
    """Under JAX, the cap on a worker's `share` of its GPU's memory (nothing without a share, under another
    backend, or when the user set a fraction: JAX refuses both of its names at once)."""
    fractions = ("XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_CLIENT_MEM_FRACTION")
    if not share or backend_name() != "jax" or any(os.environ.get(f) for f in fractions):
        return {}
    return {fractions[0]: f"{share:.3f}"}  # the name every JAX version reads


def pin_cpu_cores() -> tuple[int, ...] | None:
    """Restrict this process to the cores in CELLSEARCH_CPU_CORES (Linux); a no-op when unset or
    unsupported. Must run before TensorFlow starts: its thread pools size themselves from the affinity."""
    value = os.environ.get(CORES_VARIABLE, "").strip()
    if not value or not hasattr(os, "sched_setaffinity"):
        return None
    cores = tuple(int(c) for c in value.split(","))
    os.sched_setaffinity(0, cores)
    return cores


def configure_backend(cpu_threads: int | None = None) -> list:
    """Pin CPU cores and cap threads; under TensorFlow also turn on GPU memory growth (so a worker takes only
    what its trial needs). Returns the GPUs the backend sees."""
    pin_cpu_cores()
    threads = cpu_threads or int(os.environ.get("TF_NUM_INTRAOP_THREADS", "0") or 0)
    backend = backend_name()
    if backend == "torch":
        import torch

        if threads:
            torch.set_num_threads(threads)
        return list(range(torch.cuda.device_count()))
    if backend == "jax":
        return _jax_gpus()
    import tensorflow as tf

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


def _jax_gpus() -> list:
    import jax

    try:
        return jax.devices("gpu")
    except RuntimeError:  # no GPU platform
        return []


def has_gpu() -> bool:
    backend = backend_name()
    if backend == "torch":
        import torch

        return torch.cuda.is_available()
    if backend == "jax":
        return bool(_jax_gpus())
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def resolve_switch(setting: str) -> bool:
    """'on'/'off' are explicit; 'auto' means on exactly when a GPU is present (mixed precision, XLA)."""
    return setting == "on" or (setting == "auto" and has_gpu())


def training_policy(setting: str) -> str:
    """The Keras dtype policy a trial trains under for its `mixed_precision` setting. `auto`: float16 mixed
    precision on a GPU; bfloat16 mixed precision under TensorFlow on a CPU with native bfloat16 dot products
    (trials train 1.4x faster there, to the same accuracy; docs/benchmarks.md); float32 elsewhere."""
    if setting == "bfloat16":
        return "mixed_bfloat16"
    if resolve_switch(setting):
        return "mixed_float16"
    native = setting == "auto" and backend_name() == "tensorflow" and cpu_has_bfloat16()
    return "mixed_bfloat16" if native else "float32"


def jit_compile(setting: str) -> bool:
    """`model.compile(jit_compile=...)` for a trial's setting: always under JAX (its only fast path), never
    under PyTorch (`torch.compile` costs more than a trial saves), the setting under TensorFlow."""
    backend = backend_name()
    return backend == "jax" or (backend == "tensorflow" and resolve_switch(setting))
