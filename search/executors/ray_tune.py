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
   It then runs the trial through `search.runner.run_trial`, the same runner the local executor uses
   (seed, `device`, `worker`, `started_at`/`finished_at`, scratch folder, publication, failure reasons),
   with a `TuneTrialChannel`: every epoch is reported to Tune under OBJECTIVE_KEY (the objective's
   per-epoch value, which the scheduler compares). Metrics and files are published before the final report
   (the true objective, flagged final). Tune's function trainables report synchronously, so a trial
   stopped at an epoch never publishes, and one stopped at its final report has already published
   everything. Reseeded copies and warm starts marked `prune = false` carry PROTECTED_KEY in their Tune
   config and the scheduler (`protect_reseeds`) never stops them.
3. Tune feeds the results back: `StudySearch.on_trial_result` stores each epoch's validation accuracy as
   the Optuna intermediate value (step = epoch index, as the local executor does), and
   `on_trial_complete` tells the study COMPLETE (final report seen, value = the spec's objective),
   PRUNED (ASHA stopped the trial before its final report) or, for errors, hands the trial to
   `TrialBookkeeping.on_trial_error`, which records the reason and then fails it (Optuna refuses user
   attributes on finished trials, and only the callback sees the error). Every trial this run created and
   did not finish (Ctrl-C, SIGTERM, driver error) is failed as interrupted on the way out and queued to
   run again. A driver killed outright cannot: each trial actor watches the driver's pid, and within about
   a second of its death records its trial as interrupted and exits (`search.lifecycle.exit_with_driver`);
   the heartbeat the driver kept for its trials covers an actor that could not (see `run_ray`).
   After each ended trial the local workers' `FailureGuard` checks the artifact store (and counts failures
   in a row): an error the whole study shares stops every trial and leaves `run_ray` as one line.

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
import signal
import threading
import time
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
PROTECTED_KEY = "never_prune"  # reseeded copies, unprunable warm starts: the scheduler lets them finish
FINAL_KEY = "trial_finished"
EPOCH_KEY = "epoch"
OBJECTIVE_KEY = "objective"  # the running (per epoch) and final objective value in Tune's results
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
    from search.runner import is_pretrained as lookup

    return lookup(backbone)


class SearchSpace:
    """The define-by-run space as a picklable callable: the shared `suggest_params`, plus the trial number.

    OptunaSearch merges the returned constants into the Tune trial's config; that is how the trainable
    finds its Optuna trial.
    """

    def __init__(self, spec: StudySpec) -> None:
        self.spec = spec

    def __call__(self, trial: optuna.Trial) -> dict[str, Any]:
        from search.reseed import is_protected
        from search.space import suggest_params

        suggest_params(trial, self.spec, is_pretrained)
        return {TRIAL_NUMBER_KEY: trial.number, PROTECTED_KEY: is_protected(trial)}


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

        keys = objective_keys(spec)
        super().__init__(space=SearchSpace(spec), metric=keys if len(keys) > 1 else keys[0],
                         mode=["max"] * len(keys) if len(keys) > 1 else "max",
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
            metrics = self.metric if isinstance(self.metric, list) else [self.metric]
            values = [float(result[key]) for key in metrics]
            self._tell(trial, TrialState.COMPLETE, values if len(values) > 1 else values[0])
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
        """Fail every trial this searcher created that is still RUNNING; returns how many. Interrupted ones
        (reason INTERRUPTED) are queued to run again."""
        from search.lifecycle import INTERRUPTED, fail_interrupted

        for trial_id in list(self._parked_failures):
            self.record_failure(trial_id, reason)
        storage = self._ot_study._storage
        running = [trial for trial in self._ot_trials.values()
                   if storage.get_trial(trial._trial_id).state == TrialState.RUNNING]
        if reason == INTERRUPTED:
            return fail_interrupted(self._ot_study, running)
        for trial in running:
            storage.set_trial_user_attr(trial._trial_id, "fail_reason", reason)
            self._tell(trial, TrialState.FAIL)
        return len(running)

    @property
    def study(self) -> optuna.Study:
        return self._ot_study

    def running_ids(self) -> list[int]:
        """Storage ids of the trials this searcher handed to Tune that Tune has not finished."""
        return [trial._trial_id for tune_id, trial in self._ot_trials.items()
                if tune_id not in self._completed_trials]

    def save(self, checkpoint_path: str) -> None:
        return None

    def _record_epoch(self, trial: optuna.Trial, result: dict) -> None:
        """Epoch results become intermediate values (step = epoch index); the final report does not."""
        if result.get(FINAL_KEY) or EPOCH_KEY not in result or not isinstance(self.metric, str) \
                or self.metric not in result:
            return
        step = int(result[EPOCH_KEY]) - 1
        if step not in trial.storage.get_trial(trial._trial_id).intermediate_values:
            trial.report(float(result[self.metric]), step=step)

    def _tell(self, trial: optuna.Trial, state: TrialState, value: float | list[float] | None = None) -> None:
        try:
            self._ot_study.tell(trial, value, state=state)
        except Exception as exc:  # e.g. already finished by another process; never stop the study for it
            logger.warning("could not tell trial %s: %s", trial.number, exc)


class TrialBookkeeping(tune.Callback):
    """Driver-side hooks: record why a trial errored, remove scratch folders of stopped trials, and hand
    each ended trial to the local workers' FailureGuard (artifact store gone, trial after trial failing).

    Runs after the searcher's `on_trial_complete(error=True)` in the same controller step, with the
    Tune trial (and so its error) at hand. One line per failure instead of Tune's full traceback (kept
    in the trial's `fail_traceback` attribute and Tune's error.txt). The guard's error is kept in
    `stopped_by`; `StopOnStudyError` then stops every trial.
    """

    def __init__(self, searcher: StudySearch, spec: StudySpec, guard) -> None:
        self.searcher, self.spec, self.guard = searcher, spec, guard
        self.stopped_by: Exception | None = None

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        reason = self.searcher.record_failure(trial.trial_id, error_text(trial))
        logger.warning("trial %s failed: %s", (trial.config or {}).get(TRIAL_NUMBER_KEY, trial), reason)
        self._ended(trial)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self._ended(trial)

    def raise_if_stopped(self) -> None:
        if self.stopped_by is not None:
            raise self.stopped_by

    def _ended(self, trial) -> None:
        from data_pipeline.errors import CellsearchError

        number = (trial.config or {}).get(TRIAL_NUMBER_KEY)
        if number is None:
            return
        shutil.rmtree(self.spec.location.trial_work_dir(number), ignore_errors=True)
        study = self.searcher.study
        try:
            self.guard(study, find_trial(study._storage, self.spec.name, number))
        except CellsearchError as error:
            self.stopped_by = self.stopped_by or error


class StopOnStudyError(tune.Stopper):
    """Stop all trials once the bookkeeping met an error the whole study shares."""

    def __init__(self, bookkeeping: TrialBookkeeping) -> None:
        self.bookkeeping = bookkeeping

    def __call__(self, trial_id: str, result: dict) -> bool:
        return False

    def stop_all(self) -> bool:
        return self.bookkeeping.stopped_by is not None


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


class TuneTrialChannel:
    """A trial seen from a Ray actor: attributes and files go straight to the storage, epochs to Tune,
    whose scheduler decides on pruning (reseeded copies are protected there, see `protect_reseeds`)."""

    def __init__(self, storage: optuna.storages.BaseStorage, trial: optuna.trial.FrozenTrial, artifact_store,
                 metric: str) -> None:
        self.storage, self.trial, self.artifact_store, self.metric = storage, trial, artifact_store, metric
        self.number, self.params, self.user_attrs = trial.number, dict(trial.params), dict(trial.user_attrs)

    def set_user_attr(self, key: str, value) -> None:
        self.storage.set_trial_user_attr(self.trial._trial_id, key, value)

    def report(self, epoch: int, value: float, may_prune: bool) -> None:
        tune.report({EPOCH_KEY: epoch + 1, self.metric: value, FINAL_KEY: False})

    def upload(self, path: Path) -> str:
        from optuna.artifacts import upload_artifact

        return upload_artifact(artifact_store=self.artifact_store, file_path=str(path), study_or_trial=self.trial,
                               storage=self.storage)


def run_tune_trial(config: dict, *, spec: StudySpec, storage_url: str, artifacts: str, cpu_threads: int,
                   driver: tuple[str, int]) -> None:
    """The Tune function trainable: run the Optuna trial named in `config` through the shared runner.

    `driver`: the driver's Ray node id and pid. An actor on the driver's node ends itself, its trial
    recorded as interrupted, within about a second of the driver's death (Ray would keep it training for
    about a minute); on other nodes of a cluster the pid means nothing, and Ray's own timeout applies."""
    from search.devices import configure_tensorflow
    from search.lifecycle import exit_with_driver, fail_interrupted
    from search.runner import run_trial
    from search.storage import open_artifact_store, open_storage

    storage = open_storage(storage_url, heartbeat_interval=None)
    trial = find_trial(storage, spec.name, int(config[TRIAL_NUMBER_KEY]))
    node_id, driver_pid = driver
    if ray.get_runtime_context().get_node_id() == node_id:
        exit_with_driver(driver_pid, lambda: fail_interrupted(
            optuna.load_study(study_name=spec.name, storage=storage), [trial]))
    configure_tensorflow(cpu_threads)
    storage.set_trial_user_attr(trial._trial_id, "ray_trial_id", tune.get_context().get_trial_id())
    channel = TuneTrialChannel(storage, trial, open_artifact_store(artifacts), OBJECTIVE_KEY)
    outcome = run_trial(channel, spec)
    tune.report({**numeric_metrics(outcome.metrics), EPOCH_KEY: int(outcome.metrics["epochs_run"]),
                 FINAL_KEY: True, **final_values(spec, outcome.values)})


def final_values(spec: StudySpec, values: float | list[float]) -> dict[str, float]:
    """The objective value(s) under the keys the searcher reads: OBJECTIVE_KEY, or one key per objective."""
    if isinstance(values, list):
        return dict(zip(objective_keys(spec), values))
    return {OBJECTIVE_KEY: float(values)}


def objective_keys(spec: StudySpec) -> list[str]:
    from search.objectives import get_objective

    objective = get_objective(spec.algorithm.objective)
    return objective.metric_names if len(objective.directions) > 1 else [OBJECTIVE_KEY]


# ----------------------------------------------------------------------------------------- scheduler
def protect_reseeds(scheduler_class: type) -> type:
    """`scheduler_class`, except that trials flagged PROTECTED_KEY (reseeded copies, warm starts marked
    `prune = false`) always continue."""
    from ray.tune.schedulers import TrialScheduler

    class Protected(scheduler_class):
        def on_trial_result(self, tune_controller, trial, result):
            decision = super().on_trial_result(tune_controller, trial, result)
            return TrialScheduler.CONTINUE if (trial.config or {}).get(PROTECTED_KEY) else decision

    Protected.__name__ = f"Protected{scheduler_class.__name__}"
    return Protected


def make_scheduler(spec: StudySpec):
    """The spec's pruner, in Tune's terms: epochs are the resource, the objective's running value the signal."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule

    algorithm = spec.algorithm
    max_epochs = spec.space.epochs[1] + spec.space.head_epochs
    grace = max(1, min(algorithm.min_resource, max_epochs))
    common = dict(time_attr=EPOCH_KEY, metric=OBJECTIVE_KEY, mode="max")
    if algorithm.pruner == "hyperband":
        return protect_reseeds(ASHAScheduler)(max_t=max_epochs, grace_period=grace,
                                              reduction_factor=algorithm.reduction_factor, **common)
    if algorithm.pruner == "median":
        return protect_reseeds(MedianStoppingRule)(grace_period=grace, min_samples_required=4, **common)
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


def build_tuner(spec: StudySpec, bookkeeping: TrialBookkeeping, plan: RayPlan, samples: int, storage_url: str,
                artifacts: str):
    trainable = tune.with_parameters(run_tune_trial, spec=spec, storage_url=storage_url, artifacts=artifacts,
                                     cpu_threads=plan.cpu_threads,
                                     driver=(ray.get_runtime_context().get_node_id(), os.getpid()))
    tune_config = tune.TuneConfig(
        search_alg=bookkeeping.searcher, scheduler=make_scheduler(spec), num_samples=samples,
        max_concurrent_trials=plan.workers, reuse_actors=False,
        trial_dirname_creator=lambda trial: f"trial_{trial.config.get(TRIAL_NUMBER_KEY, trial.trial_id)}",
    )
    run_config = tune.RunConfig(
        name=f"tune_{time.strftime('%Y%m%d_%H%M%S')}", storage_path=str(spec.location.ray_dir),
        failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
        callbacks=[bookkeeping], stop=StopOnStudyError(bookkeeping), verbose=0,
    )
    return tune.Tuner(tune.with_resources(trainable, plan.resources()), tune_config=tune_config,
                      run_config=run_config)


def run_ray(spec: StudySpec, storage_url: str, artifacts: str, gpus: list[str], deadline: float | None,
            show_progress: bool = True) -> dict:
    """Run the study's missing trials on Ray Tune; returns a summary (workers, trials run, errors).

    Ctrl-C or SIGTERM stops Ray with its trial actors; the unfinished trials fail as interrupted and are
    queued again, one line says how to resume, and `Interrupted` propagates (see search.lifecycle). An
    artifact store that stops taking files, or trial after trial failing, stops every trial and raises its
    one-line error (StorageError, TrialsFailing). The driver keeps the heartbeats of its running trials
    (ask() starts none), so trials of a driver that died unseen fail and are queued again by the next run
    once the grace period has passed."""
    from search.lifecycle import (INTERRUPTED, FailureGuard, Interrupted, driver_signals, heartbeats,
                                  probe_artifact_store, storage_failures)
    from search.progress import print_interrupted
    from search.storage import open_artifact_store, open_storage
    from search.study import prepare_study

    spec = absolute_spec(spec)
    storage_url, artifacts = absolute_storage_url(storage_url), absolute_location(artifacts)
    storage = open_storage(storage_url, heartbeat_interval=spec.storage.heartbeat_interval,
                           grace_period=spec.storage.grace_period, max_retry=spec.storage.max_retry)
    artifact_store = open_artifact_store(artifacts)
    probe_artifact_store(artifact_store, artifacts)
    study = prepare_study(spec, storage)
    samples = missing_trials(spec, study)
    if samples <= 0 or (deadline is not None and time.time() >= deadline):
        return {"workers": 0, "trials": 0, "errors": 0}
    check_backbones(spec)
    started_at, started = time.time(), start_ray(spec, gpus)
    searcher, received = None, []
    try:
        with driver_signals() as received:  # after ray.init, which installs its own SIGTERM handler
            plan = plan_resources(spec, ray.cluster_resources())
            print(plan.describe(), flush=True)
            searcher = StudySearch(spec, storage, deadline)
            bookkeeping = TrialBookkeeping(searcher, spec, FailureGuard(artifact_store, artifacts))
            tuner = build_tuner(spec, bookkeeping, plan, samples, storage_url, artifacts)
            with progress_thread(spec, storage_url, show_progress), heartbeats(storage, searcher.running_ids), \
                    storage_failures(storage_url), scoped_environ(
                        TUNE_MAX_PENDING_TRIALS_PG=str(plan.workers), RAY_AIR_NEW_OUTPUT="0",
                        TUNE_PRINT_ALL_TRIAL_ERRORS="0", TUNE_DISABLE_SIGINT_HANDLER="1"):
                results = tuner.fit()
                bookkeeping.raise_if_stopped()
            return {"workers": plan.workers, "trials": len(results), "errors": len(results.errors)}
    except KeyboardInterrupt:  # ours, or the plain one Ray re-raises for it
        raise Interrupted(received[0] if received else signal.SIGINT) from None
    finally:
        if started:
            ray.shutdown()  # the trial actors stop before their trials are failed
        if searcher is not None:
            with storage_failures(storage_url):
                searcher.fail_unfinished(INTERRUPTED)
                if received:
                    print_interrupted(study, spec.budget.trials, started_at)
