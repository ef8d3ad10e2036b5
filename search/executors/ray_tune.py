"""The Ray Tune executor: OptunaSearch proposes, ASHA prunes, Ray places trials on GPUs or CPU shares.

The study lives in the same Optuna storage, under the same name, as with the local executor, so either
executor can continue a study the other started, and `optuna-dashboard`, the report and the ensemble read
every trial from the storage alone.

How one trial flows
-------------------
1. `StudySearch.suggest` (in the driver) asks the study for a trial and runs the define-by-run space
   (`search.space.suggest_params`) on it. The space function also returns the Optuna trial *number* as a
   constant (OptunaSearch merges constants returned by the space into the Tune config), so every Tune
   trial's config names its Optuna trial.
2. `run_tune_trial` (in a Ray actor holding its GPU / CPU share) opens the storage itself and resolves that
   number to the trial id with the public storage API. Numbers are assigned atomically by the storage and
   unique within a study, so this mapping holds even when other executors add trials to the same study at
   the same time -- unlike matching by parameters, which two trials (or an enqueued warm start) can share.
   The actor records `device`, `worker` and its start/finish times (`started_at`, `finished_at`, unix
   seconds), and reports every epoch to Tune with the epoch's validation accuracy under the objective's
   name too (the running estimate the scheduler compares; Tune also insists every result carries the
   searcher's metric). It publishes metrics (user attributes) and files (artifact store) with
   `search.objective.publish_result`, and only then sends its final report (the true objective, flagged
   final). Tune's function trainables report synchronously, so a trial stopped at an epoch never
   publishes, and one stopped at its final report has already published everything.
3. Tune feeds the results back: `StudySearch.on_trial_result` stores each epoch's validation accuracy as
   the Optuna intermediate value (step = epoch index, as the local executor does), and
   `on_trial_complete` tells the study COMPLETE (final report seen, value = the spec's objective),
   PRUNED (ASHA stopped the trial before its final report) or, for errors, hands the trial to
   `TrialBookkeeping.on_trial_error`, which records the reason and then fails it (Optuna refuses user
   attributes on finished trials, and only the callback sees the error). Every trial this run created and
   did not finish (Ctrl-C, driver error) is failed on the way out, so no trial stays RUNNING forever.

Why trials really run in parallel
---------------------------------
Tune lets a custom searcher keep only *one* trial pending (`_get_max_pending_trials` returns 1 unless the
searcher is wrapped in a ConcurrencyLimiter or `TUNE_MAX_PENDING_TRIALS_PG` is set). A new trial is
suggested only once the previous one left PENDING, and when starting an actor (Python + TensorFlow import)
takes about as long as a short trial, trials end up running one after another. `max_concurrent_trials` =
workers wraps the searcher in a ConcurrencyLimiter, which Ray 2.60 also uses as the pending limit (older
Rays kept 1 even then: ray-project/ray#63770); we also set `TUNE_MAX_PENDING_TRIALS_PG` to the same
value for those. The limiter also
keeps the driver from asking Optuna for trials that could not start yet (they would sit RUNNING in the
storage and skew TPE's constant liar). Resources are sized so that `workers` trials fit at once: one GPU
(or `gpus_per_trial`) and `cores / workers` CPUs each. Actors are never reused, so each trial's
process sees the CUDA_VISIBLE_DEVICES Ray set for its own GPU before TensorFlow starts.

Budget: Tune samples the trials the study still misses; the deadline means "no new trial starts"
(the searcher returns FINISHED), as `--timeout` does for the local executor, instead of Tune's
`time_budget_s`, which would kill running trials mid-epoch and throw their work away.

Clusters: with `executor.address` the driver joins an existing cluster; trials then open the storage URL
and the artifact store from the worker nodes, so use a database URL (PostgreSQL) and s3:// / gs:// (or a
shared filesystem) there. A local run starts a private, quiet Ray with `len(gpus)` logical GPUs.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import socket
import threading
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import optuna
import ray
from optuna.trial import TrialState
from ray import tune
from ray.tune.search.optuna import OptunaSearch

from search.spec import StudySpec

logger = logging.getLogger(__name__)

TRIAL_NUMBER_KEY = "optuna_trial_number"
FINAL_KEY = "trial_finished"
EPOCH_KEY = "epoch"
OBJECT_STORE_BYTES = 200 * 1024 * 1024
# Environment of every trial actor: TensorFlow's C++ logs off, Keras on TensorFlow.
TRIAL_ENV = {"TF_CPP_MIN_LOG_LEVEL": "2", "KERAS_BACKEND": "tensorflow"}


# --------------------------------------------------------------------------------------------- paths
def absolute_spec(spec: StudySpec) -> StudySpec:
    """Tune may run a trial in another working directory (its trial folder, another node): pin paths."""
    data = spec.data
    if data.path and "://" not in data.path:
        data = replace(data, path=str(Path(data.path).resolve()))
    return replace(spec, out=str(Path(spec.out).resolve()), data=data)


def absolute_storage_url(url: str) -> str:
    """sqlite:///relative.db and journal:relative.log resolve against the driver's working directory."""
    from search.storage import sqlite_path

    local = sqlite_path(url)
    if local is not None and url != "sqlite:///:memory:":
        return f"sqlite:///{local.resolve().as_posix()}"
    if url.startswith("journal:"):
        return f"journal:{Path(url[len('journal:'):]).resolve().as_posix()}"
    return url


def absolute_location(location: str) -> str:
    return location if "://" in location else str(Path(location).resolve())


def trial_work_dir(spec: StudySpec, number: int) -> Path:
    """Same scratch folder as the local executor's objective; removed once the trial is published."""
    return spec.study_dir / "work" / f"trial_{number:05d}"


@contextlib.contextmanager
def scoped_environ(**values: str) -> Iterator[None]:
    """Set environment variables for a block only: Ray reads some at start-up, Tune some during fit()."""
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
    """How many trials run at once and what each one holds."""

    workers: int
    cpus_per_trial: float
    gpus_per_trial: float

    @property
    def cpu_threads(self) -> int:
        return max(1, int(self.cpus_per_trial))

    def resources(self) -> dict[str, float]:
        return {"cpu": self.cpus_per_trial, "gpu": self.gpus_per_trial}

    def describe(self) -> str:
        device = f"{self.gpus_per_trial:g} gpu" if self.gpus_per_trial else "no gpu"
        return f"{self.workers} parallel trial(s) on ray, each {self.cpus_per_trial:g} cpu + {device}"


def plan_resources(spec: StudySpec, cluster: dict[str, float]) -> RayPlan:
    """One trial per GPU (or per `gpus_per_trial`), else one per core (at most 8, like the local plan).

    An explicit `executor.workers` beyond the GPUs shares them (the local executor's round robin); CPUs
    are split evenly so that all `workers` trials fit at once instead of queueing behind each other.
    """
    total_gpus = float(cluster.get("GPU", 0.0))
    total_cpus = float(cluster.get("CPU", 1.0))
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

    Locally, Ray gets `len(gpus)` GPUs and CUDA_VISIBLE_DEVICES = those ids while it starts, so each trial
    actor sees exactly its own device -- real GPUs, or logical ones on a machine without any (simulation).
    """
    if ray.is_initialized():
        return False
    common: dict[str, Any] = dict(log_to_driver=False, logging_level=logging.WARNING,
                                  runtime_env={"env_vars": TRIAL_ENV})
    with scoped_environ(RAY_USAGE_STATS_ENABLED="0"):
        if spec.executor.address:
            ray.init(address=spec.executor.address, **common)
        else:
            with scoped_environ(CUDA_VISIBLE_DEVICES=",".join(gpus)):
                ray.init(num_cpus=os.cpu_count() or 1, num_gpus=len(gpus), include_dashboard=False,
                         object_store_memory=OBJECT_STORE_BYTES, **common)
    return True


# ------------------------------------------------------------------------------------------ searcher
def is_pretrained(backbone: str) -> bool:
    from search.objective import is_pretrained as lookup

    return lookup(backbone)


class SearchSpace:
    """The define-by-run space as a picklable callable: the shared `suggest_params`, plus the trial number.

    OptunaSearch merges the returned constants into the Tune trial's config; that is how the trainable
    finds its Optuna trial.
    """

    def __init__(self, spec: StudySpec) -> None:
        self.spec = spec

    def __call__(self, trial: optuna.Trial) -> dict[str, Any]:
        from search.space import suggest_params

        suggest_params(trial, self.spec, is_pretrained)
        return {TRIAL_NUMBER_KEY: trial.number}


class StudySearch(OptunaSearch):
    """OptunaSearch bound to the study, with the bookkeeping the local executor's objective does.

    Differences from the stock searcher, and why:
    - intermediate values are each epoch's validation accuracy at step = epoch index (the stock one uses
      Tune's `training_iteration`, and would also record the final report as an extra step);
    - a trial is COMPLETE only after its final report; stopped earlier by the scheduler it is PRUNED;
    - failures are parked until `record_failure` can store the reason (see TrialBookkeeping);
    - no new trial is suggested after the deadline;
    - `save` is a no-op: the Optuna storage already is the search state (re-run to continue a study),
      and the pickled Study would be stale anyway.
    """

    def __init__(self, spec: StudySpec, storage: optuna.storages.BaseStorage, deadline: float | None) -> None:
        from search.study import make_sampler

        super().__init__(space=SearchSpace(spec), metric=spec.algorithm.objective, mode="max",
                         sampler=make_sampler(spec.algorithm), study_name=spec.name, storage=storage)
        self._deadline = deadline
        self._parked_failures: dict[str, optuna.Trial] = {}

    def suggest(self, trial_id: str) -> dict | str | None:
        if self._deadline is not None and time.time() >= self._deadline:
            return self.FINISHED
        return super().suggest(trial_id)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id not in self._completed_trials:
            self._record_epoch(self._ot_trials[trial_id], result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        self._completed_trials.add(trial_id)
        trial = self._ot_trials[trial_id]
        if error:
            self._parked_failures[trial_id] = trial
        elif result and result.get(FINAL_KEY):
            self._tell(trial, TrialState.COMPLETE, float(result[self.metric]))
        else:
            # The scheduler skips on_trial_result for the epoch it stops a trial at: record it here.
            self._record_epoch(trial, result or {})
            self._tell(trial, TrialState.PRUNED)

    def record_failure(self, trial_id: str, reason: str) -> str | None:
        """Keep the trainable's own reason if it wrote one (it had the exception), then fail the trial.

        Returns the reason the trial now holds (None if this trial was not parked here)."""
        trial = self._parked_failures.pop(trial_id, None)
        if trial is None:
            return None
        storage = self._ot_study._storage
        kept = storage.get_trial(trial._trial_id).user_attrs.get("fail_reason")
        if kept is None:
            kept = reason[:500]
            storage.set_trial_user_attr(trial._trial_id, "fail_reason", kept)
        self._tell(trial, TrialState.FAIL)
        return kept

    def fail_unfinished(self, reason: str) -> int:
        """Fail every trial this searcher created that is still RUNNING; returns how many."""
        for trial_id in list(self._parked_failures):
            self.record_failure(trial_id, reason)
        storage, failed = self._ot_study._storage, 0
        for trial_id, trial in self._ot_trials.items():
            if storage.get_trial(trial._trial_id).state == TrialState.RUNNING:
                storage.set_trial_user_attr(trial._trial_id, "fail_reason", reason)
                self._tell(trial, TrialState.FAIL)
                self._completed_trials.add(trial_id)
                failed += 1
        return failed

    def save(self, checkpoint_path: str) -> None:
        return None

    def _record_epoch(self, trial: optuna.Trial, result: dict) -> None:
        """Epoch results become intermediate values (step = epoch index); the final report does not."""
        if result.get(FINAL_KEY) or EPOCH_KEY not in result or self.metric not in result:
            return
        step = int(result[EPOCH_KEY]) - 1
        if step not in trial.storage.get_trial(trial._trial_id).intermediate_values:
            trial.report(float(result[self.metric]), step=step)

    def _tell(self, trial: optuna.Trial, state: TrialState, value: float | None = None) -> None:
        try:
            self._ot_study.tell(trial, value, state=state)
        except Exception as exc:  # e.g. already finished by another process; never stop the study for it
            logger.warning("could not tell trial %s: %s", trial.number, exc)


class TrialBookkeeping(tune.Callback):
    """Driver-side hooks: record why a trial errored, and remove scratch folders of stopped trials.

    Runs after the searcher's `on_trial_complete(error=True)` in the same controller step, with the
    Tune trial (and so its error) at hand. One line per failure instead of Tune's full traceback (kept
    in the trial's `fail_traceback` attribute and Tune's error.txt).
    """

    def __init__(self, searcher: StudySearch, spec: StudySpec) -> None:
        self.searcher = searcher
        self.spec = spec

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        reason = self.searcher.record_failure(trial.trial_id, error_text(trial))
        logger.warning("trial %s failed: %s", (trial.config or {}).get(TRIAL_NUMBER_KEY, trial), reason)
        self._clean(trial)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self._clean(trial)

    def _clean(self, trial) -> None:
        number = (trial.config or {}).get(TRIAL_NUMBER_KEY)
        if number is not None:
            shutil.rmtree(trial_work_dir(self.spec, number), ignore_errors=True)


def error_text(trial) -> str:
    """The last line of Tune's error report for `trial` (the exception), or a generic reason.

    Read from the driver's local copy: `trial.get_error()` reads the storage copy, synced only later."""
    try:
        error = Path(trial.error_file).read_text() if trial.error_file else trial.get_error()
    except Exception:  # the error file may be unreadable; the reason is best effort
        error = None
    lines = [line for line in str(error or "").strip().splitlines() if line.strip()]
    return f"ray trial errored: {lines[-1].strip()}" if lines else "ray trial errored (see the ray logs)"


# ----------------------------------------------------------------------------------------- trainable
def find_trial(storage: optuna.storages.BaseStorage, study_name: str, number: int) -> optuna.trial.FrozenTrial:
    study_id = storage.get_study_id_from_name(study_name)
    return storage.get_trial(storage.get_trial_id_from_study_id_trial_number(study_id, number))


def numeric_metrics(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def run_tune_trial(config: dict, *, spec: StudySpec, storage_url: str, artifacts: str, cpu_threads: int) -> None:
    """The Tune function trainable: train the Optuna trial named in `config`, publish it, report to Tune."""
    from search.devices import configure_tensorflow
    from search.objective import device_label, publish_result
    from search.space import config_from_params
    from search.storage import open_artifact_store, open_storage
    from search.trainer import train_trial

    configure_tensorflow(cpu_threads)
    number = int(config[TRIAL_NUMBER_KEY])
    params = {k: v for k, v in config.items() if k != TRIAL_NUMBER_KEY}
    storage = open_storage(storage_url, heartbeat_interval=None)
    trial = find_trial(storage, spec.name, number)
    attrs = {"device": device_label(), "worker": f"{socket.gethostname()}:{os.getpid()}",
             "ray_trial_id": tune.get_context().get_trial_id(), "started_at": time.time()}
    for key, value in attrs.items():
        storage.set_trial_user_attr(trial._trial_id, key, value)
    objective = spec.algorithm.objective
    work_dir = trial_work_dir(spec, number)

    def report(epoch: int, val_accuracy: float) -> None:
        tune.report({EPOCH_KEY: epoch + 1, "val_accuracy": val_accuracy, objective: val_accuracy,
                     FINAL_KEY: False})

    try:
        trial_config = config_from_params(params, spec, is_pretrained, (spec.algorithm.seed or 0) + number)
        result = train_trial(trial_config, work_dir, report=report)
        storage.set_trial_user_attr(trial._trial_id, "finished_at", time.time())
        publish_result(trial, result, open_artifact_store(artifacts), storage=storage)
    except Exception as exc:
        storage.set_trial_user_attr(trial._trial_id, "fail_reason", f"{type(exc).__name__}: {exc}"[:500])
        storage.set_trial_user_attr(trial._trial_id, "fail_traceback", traceback.format_exc()[-2000:])
        raise
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    tune.report({**numeric_metrics(result.metrics), EPOCH_KEY: int(result.metrics["epochs_run"]),
                 objective: float(result.metrics[objective]), FINAL_KEY: True})


# ----------------------------------------------------------------------------------------- scheduler
def make_scheduler(spec: StudySpec):
    """The spec's pruner, in Tune's terms: epochs are the resource, the objective's running value the signal."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule

    algorithm = spec.algorithm
    max_epochs = spec.space.epochs[1] + spec.space.head_epochs
    grace = max(1, min(algorithm.min_resource, max_epochs))
    common = dict(time_attr=EPOCH_KEY, metric=algorithm.objective, mode="max")
    if algorithm.pruner == "hyperband":
        return ASHAScheduler(max_t=max_epochs, grace_period=grace, reduction_factor=algorithm.reduction_factor,
                             **common)
    if algorithm.pruner == "median":
        return MedianStoppingRule(grace_period=grace, min_samples_required=4, **common)
    return FIFOScheduler()


# ---------------------------------------------------------------------------------------------- run
def missing_trials(spec: StudySpec, study: optuna.Study) -> int:
    from search.study import finished_count

    return spec.budget.trials - finished_count(study)


def check_backbones(spec: StudySpec) -> None:
    """Fail before Ray starts on an unknown backbone, and load the registry once, outside the searcher
    (whose define-by-run function should be instant)."""
    for backbone in spec.space.backbones:
        is_pretrained(backbone)


@contextlib.contextmanager
def progress_thread(spec: StudySpec, storage_url: str, show: bool) -> Iterator[None]:
    """The local executor's progress bar, fed from the storage by a thread while Tune runs."""
    if not show:
        yield
        return
    from search.progress import watch
    from search.storage import open_storage

    done = threading.Event()
    study = optuna.load_study(study_name=spec.name, storage=open_storage(storage_url, heartbeat_interval=None))
    thread = threading.Thread(target=watch, args=(study, spec.budget.trials, lambda: not done.is_set()),
                              daemon=True, name="study-progress")
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(timeout=10)


def build_tuner(spec: StudySpec, searcher: StudySearch, plan: RayPlan, samples: int, storage_url: str,
                artifacts: str):
    trainable = tune.with_parameters(run_tune_trial, spec=spec, storage_url=storage_url, artifacts=artifacts,
                                     cpu_threads=plan.cpu_threads)
    tune_config = tune.TuneConfig(
        search_alg=searcher, scheduler=make_scheduler(spec), num_samples=samples,
        max_concurrent_trials=plan.workers, reuse_actors=False,
        trial_dirname_creator=lambda trial: f"trial_{trial.config.get(TRIAL_NUMBER_KEY, trial.trial_id)}",
    )
    run_config = tune.RunConfig(
        name=f"tune_{time.strftime('%Y%m%d_%H%M%S')}", storage_path=str(spec.study_dir / "ray"),
        failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
        callbacks=[TrialBookkeeping(searcher, spec)], verbose=0,
    )
    return tune.Tuner(tune.with_resources(trainable, plan.resources()), tune_config=tune_config,
                      run_config=run_config)


def run_ray(spec: StudySpec, storage_url: str, artifacts: str, gpus: list[str], deadline: float | None,
            show_progress: bool = True) -> dict:
    """Run the study's missing trials on Ray Tune; returns a summary (workers, trials run, errors)."""
    from search.storage import open_artifact_store, open_storage
    from search.study import prepare_study

    spec = absolute_spec(spec)
    storage_url, artifacts = absolute_storage_url(storage_url), absolute_location(artifacts)
    # No heartbeats: trials made with ask() get no heartbeat thread; Tune watches the actors instead.
    storage = open_storage(storage_url, heartbeat_interval=None)
    open_artifact_store(artifacts)
    samples = missing_trials(spec, prepare_study(spec, storage))
    if samples <= 0 or (deadline is not None and time.time() >= deadline):
        return {"workers": 0, "trials": 0, "errors": 0}
    check_backbones(spec)
    started = start_ray(spec, gpus)
    searcher = None
    try:
        plan = plan_resources(spec, ray.cluster_resources())
        print(plan.describe(), flush=True)
        searcher = StudySearch(spec, storage, deadline)
        tuner = build_tuner(spec, searcher, plan, samples, storage_url, artifacts)
        with progress_thread(spec, storage_url, show_progress), scoped_environ(
                TUNE_MAX_PENDING_TRIALS_PG=str(plan.workers), RAY_AIR_NEW_OUTPUT="0",
                TUNE_PRINT_ALL_TRIAL_ERRORS="0"):
            results = tuner.fit()
        return {"workers": plan.workers, "trials": len(results), "errors": len(results.errors)}
    finally:
        if searcher is not None:
            searcher.fail_unfinished("ray executor stopped before the trial finished")
        if started:
            ray.shutdown()
