"""One search worker: `python -m search.execution.worker --spec-file F --storage URL --index I`, and `work`, its loop.

The local executor launches this module once per GPU (pinned with CUDA_VISIBLE_DEVICES) or per CPU share;
the Ray executor runs `work` in Ray actors. Workers coordinate only through the shared Optuna storage, so
they can as well run on other machines. SIGINT or SIGTERM stops a worker (its trial is recorded as
interrupted and queued again), and so does the death of the driver given by `--driver-pid` (see
search.execution.lifecycle). An error the whole study shares (storage or artifact store unusable, trial after trial
failing) ends the worker with `error: ...` and exit code 2.
"""

from __future__ import annotations

import argparse
import json
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
    parser.add_argument("--deadline", type=float, default=None, help="unix time after which no trial starts")
    parser.add_argument("--driver-pid", type=int, default=None, help="exit when this process dies")
    args = parser.parse_args(argv)
    exit_with_parent(args.driver_pid)
    with open(args.spec_file) as handle:
        spec = spec_from_dict(json.load(handle), origin=args.spec_file)
    try:
        work(spec, args.storage, args.artifacts, signals, index=args.index, deadline=args.deadline)
        return 0
    except Interrupted as stop:  # the trial is recorded: skip TensorFlow's slow teardown
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(stop.exit_code)


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

    storage = open_storage(storage_url, heartbeat_interval=spec.storage.heartbeat_interval,
                           grace_period=spec.storage.grace_period, max_retry=spec.storage.max_retry)
    artifact_store = open_artifact_store(artifacts)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    timeout = None if deadline is None else max(deadline - time.time(), 1.0)
    callbacks = [budget_callback(spec), FailureGuard(artifact_store, artifacts), signals.stop_callback]
    objective = with_attrs(Objective(spec, artifact_store), trial_attrs or {})
    with storage_failures(storage_url), signals.interruptible(False):
        study = open_study(spec, storage, worker_index=index)
        if finished_count(study) >= spec.budget.trials:
            return
        study.optimize(signals.objective(objective), timeout=timeout, catch=(Exception,), callbacks=callbacks,
                       gc_after_trial=True)
    if signals.requested:
        raise Interrupted(signals.requested)


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
