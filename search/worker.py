"""One search worker process: `python -m search.worker --spec-file F --storage URL --index I`.

Launched by the local executor, one per GPU (pinned with CUDA_VISIBLE_DEVICES) or per CPU share. Workers
coordinate only through the shared Optuna storage, so they can as well run on other machines. SIGINT or
SIGTERM stops a worker (its trial is recorded as interrupted and queued again), and so does the death of
the driver given by `--driver-pid` (see search.lifecycle). An error the whole study shares (storage or
artifact store unusable, trial after trial failing) ends the worker with `error: ...` and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from search.cli_errors import run_cli
from search.lifecycle import Interrupted, WorkerSignals, exit_with_parent
from search.spec import spec_from_dict


def main(argv: list[str] | None = None) -> int:
    signals = WorkerSignals().install()
    parser = argparse.ArgumentParser(prog="python -m search.worker")
    parser.add_argument("--spec-file", required=True)
    parser.add_argument("--storage", required=True)
    parser.add_argument("--artifacts", required=True)
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--deadline", type=float, default=None, help="unix time after which no trial starts")
    parser.add_argument("--driver-pid", type=int, default=None, help="exit when this process dies")
    args = parser.parse_args(argv)
    exit_with_parent(args.driver_pid)
    try:
        return _work(args, signals)
    except Interrupted as stop:  # the trial is recorded: skip TensorFlow's slow teardown
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(stop.exit_code)


def _work(args: argparse.Namespace, signals: WorkerSignals) -> int:
    from search.devices import configure_tensorflow

    configure_tensorflow()
    import optuna

    from search.lifecycle import FailureGuard, storage_failures
    from search.objective import Objective
    from search.storage import open_artifact_store, open_storage
    from search.study import budget_callback, finished_count, open_study

    with open(args.spec_file) as handle:
        spec = spec_from_dict(json.load(handle), origin=args.spec_file)
    storage = open_storage(args.storage, heartbeat_interval=spec.storage.heartbeat_interval,
                           grace_period=spec.storage.grace_period, max_retry=spec.storage.max_retry)
    artifact_store = open_artifact_store(args.artifacts)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    timeout = None if args.deadline is None else max(args.deadline - time.time(), 1.0)
    callbacks = [budget_callback(spec), FailureGuard(artifact_store, args.artifacts), signals.stop_callback]
    with storage_failures(args.storage), signals.interruptible(False):
        study = open_study(spec, storage, worker_index=args.index)
        if finished_count(study) >= spec.budget.trials:
            return 0
        study.optimize(signals.objective(Objective(spec, artifact_store)), timeout=timeout, catch=(Exception,),
                       callbacks=callbacks, gc_after_trial=True)
    if signals.requested:
        raise Interrupted(signals.requested)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
