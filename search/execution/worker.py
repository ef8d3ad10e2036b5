"""One search worker: `python -m search.execution.worker --spec-file F --storage URL --index I`, and `work`, its loop.

The local executor launches this module once per GPU (pinned with CUDA_VISIBLE_DEVICES) or per CPU share;
the Ray executor runs `work` in Ray actors. Workers coordinate only through the shared Optuna storage, so
they can as well run on other machines. SIGINT or SIGTERM stops a worker (its trial is recorded as
interrupted and queued again), and so does the death of the driver given by `--driver-pid` (see
search.execution.lifecycle). An error the whole study shares (storage or artifact store unusable, trial after trial
failing) ends the worker with `error: ...` and exit code 2. With a `--deadline`, trials end by it: the one
running stops training at an epoch boundary in time to be evaluated and published (search.trial.trainer), and
no trial starts that could not train an epoch by then.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable

from common.cli_errors import run_cli
from common.errors import Interrupted
from search.execution.lifecycle import WorkerSignals, exit_with_parent
from search.study.spec import StudySpec, spec_from_dict


def main(argv: list[str] | None = None) -> int:
    signals = WorkerSignals().install()
    parser = argparse.ArgumentParser(prog="python -m search.execution.worker")
    parser.add_argument("--spec-file", required=True)
    parser.add_argument("--storage", required=True)
    parser.add_argument("--artifacts", required=True)
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--deadline", type=float, default=None,
                        help="unix time by which trials end: none starts after it, a running one stops training "
                             "at an epoch boundary in time to be evaluated and published")
    parser.add_argument("--driver-pid", type=int, default=None, help="exit when this process dies")
    args = parser.parse_args(argv)
    exit_with_parent(args.driver_pid)
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("search.trial").setLevel(logging.INFO)
    with open(args.spec_file) as handle:
        spec = spec_from_dict(json.load(handle), origin=args.spec_file)
    try:
        work(spec, args.storage, args.artifacts, signals, index=args.index, deadline=args.deadline)
        code = 0
    except Interrupted as stop:
        code = stop.exit_code
    sys.stdout.flush()  # every trial is recorded: skip TensorFlow's slow teardown, which a deadline cannot wait for
    sys.stderr.flush()
    os._exit(code)


def work(spec: StudySpec, storage_url: str, artifacts: str, signals: WorkerSignals, *, index: int = 0,
         deadline: float | None = None, cpu_threads: int | None = None, trial_attrs: dict | None = None) -> None:
    """Run trials of the study with Optuna's `study.optimize` until the budget or the deadline is reached.

    The one worker loop of every executor, so sampling, pruning, heartbeats and retries are Optuna's alone.
    `trial_attrs` are recorded on each trial (a Ray worker's node). Raises `Interrupted` after a stop signal,
    a CellsearchError on an error the whole study shares."""
    from search.execution.devices import configure_backend

    configure_backend(cpu_threads)
    import optuna

    from search.execution.lifecycle import FailureGuard, storage_failures
    from search.trial.objective import Objective
    from search.execution.storage import open_artifact_store, open_storage
    from search.study.optuna_study import budget_callback, finished_count, open_study
    from search.trial.trainer import Deadline, trials_end_by

    storage = open_storage(storage_url, heartbeat_interval=spec.storage.heartbeat_interval,
                           grace_period=spec.storage.grace_period, max_retry=spec.storage.max_retry)
    artifact_store = open_artifact_store(artifacts)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    timeout = None if deadline is None else deadline - time.time()
    if timeout is not None and timeout <= 0:
        return
    trial_deadline = None if deadline is None else Deadline(deadline)
    callbacks = [budget_callback(spec), FailureGuard(artifact_store, artifacts), signals.stop_callback]
    if trial_deadline is not None:
        callbacks.append(DeadlineGuard(trial_deadline))
    objective = with_attrs(Objective(spec, artifact_store), trial_attrs or {})
    with storage_failures(storage_url), signals.interruptible(False), trials_end_by(trial_deadline):
        study = open_study(spec, storage, worker_index=index)
        signals.record_when_stuck(study, storage_url)
        if finished_count(study) >= spec.budget.trials:
            return
        study.optimize(signals.objective(objective), timeout=timeout, catch=(Exception,), callbacks=callbacks,
                       gc_after_trial=True)
    if signals.requested:
        raise Interrupted(signals.requested)


class DeadlineGuard:
    """Optuna callback of a worker with a deadline: after each finished trial, measure what finishing it took
    beyond the trainer's estimate of its evaluation (the deadline's `overhead_s`), and stop the loop when a
    trial as quick as it was to its first epoch, evaluation and publication included, would end past the
    deadline."""

    def __init__(self, deadline) -> None:
        self.deadline = deadline
        self.epoch_s = self.evaluate_s = 0.0  # the last finished trial: start to first epoch end, evaluation

    def __call__(self, study, trial) -> None:
        attrs = trial.user_attrs
        if attrs.get("evaluate_estimate_s") is not None and "started_at" in attrs and trial.datetime_complete:
            finished_s = trial.datetime_complete.timestamp() - attrs["started_at"] - attrs["train_seconds"]
            self.evaluate_s = attrs["evaluate_estimate_s"]
            self.deadline.overhead_s = max(finished_s - self.evaluate_s, 0.0)
            self.epoch_s = attrs["seconds_to_first_epoch"]
        if not self.deadline.leaves_room(self.epoch_s, self.evaluate_s):
            study.stop()


def with_attrs(objective: Callable, attrs: dict) -> Callable:
    """`objective`, recording `attrs` on each trial first."""
    if not attrs:
        return objective

    def run(trial):
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        return objective(trial)

    return run


if __name__ == "__main__":
    sys.exit(run_cli(main))
