"""Ray as a cluster engine: join a cluster or start a private one, and size the worker actors to it.

Paths are made absolute before they travel to actors, which run in another working directory or on
another node; a cluster's nodes need a database URL (PostgreSQL) and an artifact store they all reach (a
shared folder or `s3://bucket/prefix`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

from common.errors import require_extra
from search.execution.devices import GPU_MEMORY, backend_name
from search.study.spec import StudySpec

ray = require_extra("ray", "ray", "--executor ray")

OBJECT_STORE_BYTES = 200 * 1024 * 1024
# Environment of every worker actor: TensorFlow's C++ logs off, Keras on TensorFlow.
ACTOR_ENV = {"TF_CPP_MIN_LOG_LEVEL": "2"}


# --------------------------------------------------------------------------------------------- paths
def absolute_spec(spec: StudySpec) -> StudySpec:
    """An actor runs in Ray's working directory, perhaps on another node: pin the spec's paths."""
    data = spec.data
    if data.path and "://" not in data.path:
        data = replace(data, path=str(Path(data.path).resolve()))
    return replace(spec, out=str(Path(spec.out).resolve()), data=data)


def absolute_storage_url(url: str) -> str:
    """sqlite:///relative.db and journal:relative.log resolve against the driver's working directory."""
    from search.execution.storage import sqlite_path

    local = sqlite_path(url)
    if local is not None and url != "sqlite:///:memory:":
        return f"sqlite:///{local.resolve().as_posix()}"
    if url.startswith("journal:"):
        return f"journal:{Path(url[len('journal:'):]).resolve().as_posix()}"
    return url


def absolute_location(location: str) -> str:
    return location if "://" in location else str(Path(location).resolve())


@contextlib.contextmanager
def scoped_environ(**values: str) -> Iterator[None]:
    """Set environment variables for a block only (Ray reads some while it starts)."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# ----------------------------------------------------------------------------------------- resources
@dataclass(frozen=True)
class RayPlan:
    """How many worker actors run at once and what each one holds."""

    workers: int
    cpus_per_trial: float
    gpus_per_trial: float

    @property
    def cpu_threads(self) -> int:
        return max(1, int(self.cpus_per_trial))

    @property
    def gpu_memory(self) -> float | None:
        """Each worker's share of a GPU's memory when it holds part of one (`devices.gpu_memory_environment`)."""
        return round(GPU_MEMORY * self.gpus_per_trial, 3) if 0 < self.gpus_per_trial < 1 else None

    def describe(self) -> str:
        device = f"{self.gpus_per_trial:g} gpu" if self.gpus_per_trial else "no gpu"
        return f"{self.workers} parallel trial(s) on ray, each {self.cpus_per_trial:g} cpu + {device}"


def plan_resources(spec: StudySpec, cluster: dict[str, float]) -> RayPlan:
    """One worker per GPU (or per `gpus_per_trial`), else one per core (at most 8, like the local plan).

    An explicit `executor.workers` beyond the GPUs shares them (the local executor's round robin); CPUs
    are split evenly so that all workers fit at once instead of queueing behind each other. `executor.cpus`
    caps the CPUs this driver takes, leaving the rest of a shared cluster to others (another driver).
    """
    total_gpus = float(cluster.get("GPU", 0.0))
    total_cpus = float(cluster.get("CPU", 1.0))
    if spec.executor.cpus:
        total_cpus = min(total_cpus, float(spec.executor.cpus))
    wanted = spec.executor.gpus_per_trial if total_gpus else 0.0
    if spec.executor.workers:
        workers = spec.executor.workers
    elif wanted:
        workers = max(1, math.floor(total_gpus / wanted + 1e-9))
    else:
        workers = max(1, min(int(total_cpus), 8))
    gpus = min(wanted, total_gpus / workers) if wanted else 0.0
    cpus = math.floor(total_cpus / workers * 100) / 100 or 0.01
    return RayPlan(workers=workers, cpus_per_trial=cpus, gpus_per_trial=round(gpus, 4))


def start_ray(spec: StudySpec, gpus: list[str]) -> bool:
    """Join `executor.address`, or start a private local Ray; returns whether this call connected.

    Locally, Ray gets `len(gpus)` GPUs and CUDA_VISIBLE_DEVICES = those ids while it starts, so each worker
    actor sees exactly its own device -- real GPUs, or logical ones on a machine without any (simulation).
    """
    if ray.is_initialized():
        return False
    common: dict[str, Any] = dict(log_to_driver=False, logging_level=logging.WARNING,
                                  runtime_env={"env_vars": {**ACTOR_ENV, "KERAS_BACKEND": backend_name()}})
    with scoped_environ(RAY_USAGE_STATS_ENABLED="0"):
        if spec.executor.address:
            ray.init(address=spec.executor.address, **common)
        else:
            with scoped_environ(CUDA_VISIBLE_DEVICES=",".join(gpus)):
                ray.init(num_cpus=os.cpu_count() or 1, num_gpus=len(gpus), include_dashboard=False,
                         object_store_memory=OBJECT_STORE_BYTES, **common)
    return True


def node_attrs() -> dict[str, str]:
    """Where this Ray worker runs, as trial user attributes."""
    return {"ray_node_id": ray.get_runtime_context().get_node_id(), "ray_node_ip": ray.util.get_node_ip_address()}
