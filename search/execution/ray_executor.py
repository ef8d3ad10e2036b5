"""The Ray executor: Ray places the study's workers on nodes and GPUs, the study's storage decides.

Each worker slot is a Ray actor holding its CPU / GPU share (spread over the nodes by Ray's SPREAD
scheduling) that runs the local executor's worker loop, `search.execution.worker.work`: Optuna's `study.optimize`
with the spec's sampler and pruner (Hyperband, Optuna's ASHA-style successive halving, or median) against
the shared storage. Ray Tune is not used: its searcher and scheduler would keep a second book of the
trials the storage already keeps, and pruning decisions would differ between executors.

The driver only starts actors and watches them:
- an actor that dies with its node is restarted by Ray on a node with room (`max_restarts`) and its loop
  retried (`max_task_retries`); the lost trial's heartbeat goes stale, and Optuna fails it and queues it
  again (RetryHeartbeatStaleTrialCallback) for whichever worker asks next;
- an actor whose loop ended (budget filled, deadline) is killed, which frees its share; the loop honours the
  deadline as a local worker does, and actors still running at the deadline's backstop are stopped like
  after Ctrl-C;
- an error the whole study shares (artifact store, storage, trial after trial failing) ends an actor's loop;
  the driver stops the others and raises it as one line, as the local executor does;
- Ctrl-C or SIGTERM: the driver kills its actors and fails their running trials as interrupted, queued
  again; a SIGKILLed driver's actors are killed by Ray (they are owned by the driver), and those on the
  driver's node also watch its pid and record their trial as interrupted first. A private Ray (no
  `--address`) is reaped by a watchdog process a few seconds after its driver died.
Each trial records where it ran: `ray_node_id`, `ray_node_ip` and `ray_worker` (driver run and slot).
A second driver on the same study simply adds its own actors: the storage shares the trials out.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from typing import TYPE_CHECKING

from common.malloc import malloc_environment
from search.execution.devices import gpu_memory_environment
from search.execution.ray_cluster import (absolute_location, absolute_spec, absolute_storage_url, node_attrs,
                                          plan_resources, ray, start_ray)
from search.study.spec import StudySpec

if TYPE_CHECKING:
    from search.execution.driver import Deadlines

ACTOR_RESTARTS = 4  # per slot: a slot lost with its node starts again elsewhere, a crashing one gives up
STOP_GRACE_S = 3  # an actor whose driver died gets this long to record its trial as interrupted
WORKER_ATTR = "ray_worker"


@ray.remote(max_restarts=ACTOR_RESTARTS, max_task_retries=-1)
class StudyWorker:
    """One worker slot: `search.execution.worker.work` in a Ray actor, with the local worker's signal handling."""

    def __init__(self, label: str, driver: tuple[str, int]) -> None:
        from search.execution.lifecycle import WorkerSignals, exit_with_driver

        self.label = label
        self.signals = WorkerSignals()
        if threading.current_thread() is threading.main_thread():
            self.signals.install()
        self.idle = threading.Event()
        self.idle.set()
        node_id, driver_pid = driver
        if ray.get_runtime_context().get_node_id() == node_id:
            exit_with_driver(driver_pid, self.interrupt)

    def interrupt(self) -> None:
        """Stop the trial in progress the way SIGTERM stops a local worker, and wait until it is recorded."""
        if not self.idle.is_set():
            os.kill(os.getpid(), signal.SIGTERM)
            self.idle.wait(STOP_GRACE_S)

    def run(self, spec: StudySpec, storage_url: str, artifacts: str, index: int, deadline: float | None,
            cpu_threads: int) -> str:
        """The worker loop; "done" at the end of the budget or the deadline, "interrupted" after a signal."""
        from common.errors import Interrupted
        from search.execution.worker import work

        self.idle.clear()
        try:
            work(spec, storage_url, artifacts, self.signals, index=index, deadline=deadline,
                 cpu_threads=cpu_threads, trial_attrs={**node_attrs(), WORKER_ATTR: self.label})
            return "done"
        except Interrupted:
            return "interrupted"
        finally:
            self.idle.set()


class WorkerPool:
    """The driver's actors, one per slot of the plan, and their loops in flight."""

    def __init__(self, spec: StudySpec, storage_url: str, artifacts: str, plan, deadline: float | None) -> None:
        run_id = uuid.uuid4().hex[:8]
        driver = (ray.get_runtime_context().get_node_id(), os.getpid())
        options = dict(num_cpus=plan.cpus_per_trial, num_gpus=plan.gpus_per_trial, scheduling_strategy="SPREAD")
        if env := {**gpu_memory_environment(plan.gpu_memory), **malloc_environment(plan.cpu_threads)}:
            options["runtime_env"] = {"env_vars": env}  # merged into the job's env_vars (start_ray)
        self.labels = [f"{run_id}:{index}" for index in range(plan.workers)]
        self.actors = [StudyWorker.options(**options).remote(label, driver) for label in self.labels]
        self.loops = {actor.run.remote(spec, storage_url, artifacts, index, deadline, plan.cpu_threads): index
                      for index, actor in enumerate(self.actors)}

    def alive(self) -> bool:
        """Whether a loop still runs. An actor whose loop ended is killed; raises WorkerFailed with the one
        line of a loop that stopped on an error the study shares."""
        from common.errors import WorkerFailed
        from search.execution.storage import first_line

        ready, _ = ray.wait(list(self.loops), num_returns=len(self.loops), timeout=0) if self.loops else ([], [])
        for ref in ready:
            index = self.loops.pop(ref)
            ray.kill(self.actors[index])
            try:
                ray.get(ref)
            except ray.exceptions.RayTaskError as error:
                raise WorkerFailed(f"worker {index} stopped: {first_line(error.cause)}") from None
            except ray.exceptions.RayActorError as error:  # restarts used up: the others go on
                print(f"worker {index} lost: {first_line(error)}", flush=True)
        return bool(self.loops)

    def stop(self) -> None:
        for index in self.loops.values():
            ray.kill(self.actors[index])
        self.loops.clear()


def run_ray(spec: StudySpec, storage_url: str, artifacts: str, gpus: list[str], deadlines: Deadlines | None,
            show_progress: bool = True) -> dict:
    """Run the study's missing trials on Ray worker actors; returns a summary (workers, trials this run added).

    Ctrl-C or SIGTERM stops every actor; their unfinished trials fail as interrupted and are queued again, one
    line says how to resume, and `Interrupted` propagates (see search.execution.lifecycle). Actors still running
    past the deadlines' backstop (`Deadlines.passed`) are stopped the same way, without that line. An error the
    study shares stops every actor and raises its line (WorkerFailed)."""
    from common.errors import Interrupted
    from search.execution.lifecycle import (driver_signals, fail_interrupted, probe_artifact_store, running_trials,
                                            start_reaper, storage_failures)
    from search.execution.local import until
    from search.execution.progress import print_interrupted, watch
    from search.execution.storage import open_artifact_store, open_storage
    from search.study.optuna_study import finished_count, create_or_load_study

    deadline = deadlines and deadlines.workers
    spec = absolute_spec(spec)
    storage_url, artifacts = absolute_storage_url(storage_url), absolute_location(artifacts)
    storage = open_storage(storage_url, heartbeat_interval=spec.storage.heartbeat_interval,
                           grace_period=spec.storage.grace_period, max_retry=spec.storage.max_retry)
    probe_artifact_store(open_artifact_store(artifacts), artifacts)
    study = create_or_load_study(spec, storage)
    before = len(study.get_trials(deepcopy=False))
    if finished_count(study) >= spec.budget.trials or (deadline is not None and time.time() >= deadline):
        return {"workers": 0, "trials": 0}
    started_at, started = time.time(), start_ray(spec, gpus)
    # A private Ray's agents outlive a SIGKILLed driver by a minute (they report to its dead GCS): reap them.
    reaper = start_reaper("ray", STOP_GRACE_S) if started else None
    pool, received = None, []
    try:
        with driver_signals() as received:  # after ray.init, which installs its own SIGTERM handler
            plan = plan_resources(spec, ray.cluster_resources())
            print(plan.describe(), flush=True)
            pool = WorkerPool(spec, storage_url, artifacts, plan, deadline)
            with storage_failures(storage_url):
                watch(study, spec.budget.trials, until(deadlines, study, pool.alive), show=show_progress)
            return {"workers": plan.workers, "trials": len(study.get_trials(deepcopy=False)) - before}
    except KeyboardInterrupt:  # ours, or the plain one Ray re-raises for it
        raise Interrupted(received[0] if received else signal.SIGINT) from None
    finally:
        if pool is not None:
            pool.stop()
        if started:
            ray.shutdown()
            reaper.terminate()
        if pool is not None:
            with storage_failures(storage_url):
                fail_interrupted(study, storage_url, running_trials(study, WORKER_ATTR, pool.labels))
                if received:
                    print_interrupted(study, spec.budget.trials, started_at)
