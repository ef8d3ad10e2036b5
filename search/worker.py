"""One search worker process: `python -m search.worker --spec-file F --storage URL --index I`.

Launched by the local executor, one per GPU (pinned with CUDA_VISIBLE_DEVICES) or per CPU share. Workers
coordinate only through the shared Optuna storage, so they can as well run on other machines.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from search.spec import spec_from_dict


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m search.worker")
    parser.add_argument("--spec-file", required=True)
    parser.add_argument("--storage", required=True)
    parser.add_argument("--artifacts", required=True)
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--deadline", type=float, default=None, help="unix time after which no trial starts")
    args = parser.parse_args(argv)

    from search.devices import configure_tensorflow

    configure_tensorflow()
    import optuna
    from optuna.trial import TrialState

    from search.objective import Objective
    from search.storage import open_artifact_store, open_storage
    from search.study import FINISHED, finished_count, open_study

    with open(args.spec_file) as handle:
        spec = spec_from_dict(json.load(handle), origin=args.spec_file)
    storage = open_storage(args.storage, heartbeat_interval=spec.storage.heartbeat_interval,
                           grace_period=spec.storage.grace_period, max_retry=spec.storage.max_retry)
    study = open_study(spec, storage, worker_index=args.index)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if finished_count(study) >= spec.budget.trials:
        return 0
    timeout = None if args.deadline is None else max(args.deadline - time.time(), 1.0)
    # Counting other workers' RUNNING trials keeps a finishing worker from starting one trial too many.
    study.optimize(
        Objective(spec, open_artifact_store(args.artifacts)), timeout=timeout, catch=(Exception,),
        callbacks=[optuna.study.MaxTrialsCallback(spec.budget.trials, states=(*FINISHED, TrialState.RUNNING))],
        gc_after_trial=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
