"""Live progress of a study, read from its storage: trial n/N, running, pruned, failed, best, ETA."""

from __future__ import annotations

import time
from collections import Counter
from typing import Callable

import optuna
from optuna.trial import TrialState
from tqdm import tqdm

from search.study import FINISHED


def study_counts(study: optuna.Study) -> dict[str, object]:
    trials = study.get_trials(deepcopy=False)
    states = Counter(t.state for t in trials)
    complete = [t.values[0] for t in trials if t.state == TrialState.COMPLETE and t.values]
    return {
        "finished": sum(states[s] for s in FINISHED),
        "running": states[TrialState.RUNNING],
        "complete": states[TrialState.COMPLETE],
        "pruned": states[TrialState.PRUNED],
        "failed": states[TrialState.FAIL],
        "best": max(complete) if complete else None,
    }


def watch(study: optuna.Study, total: int, is_running: Callable[[], bool], interval: float = 2.0,
          show: bool = True) -> dict:
    """Refresh a progress bar (hidden unless `show`) until `is_running()` turns false; tqdm estimates the ETA
    from the rate."""
    start = study_counts(study)["finished"]
    with tqdm(total=total, initial=min(start, total), desc=f"study {study.study_name}", unit="trial",
              dynamic_ncols=True, disable=not show) as bar:
        while True:
            alive = is_running()
            counts = study_counts(study)
            bar.n = min(counts["finished"], total)
            best = counts["best"]
            bar.set_postfix(running=counts["running"], pruned=counts["pruned"], failed=counts["failed"],
                            best="-" if best is None else f"{best:.4f}", refresh=False)
            bar.refresh()
            if not alive:
                return counts
            time.sleep(interval)


def print_interrupted(study: optuna.Study, total: int, since: float) -> None:
    """The last line of an interrupted run: where the study stands and the command that continues it."""
    from search.lifecycle import interrupted_since, resume_command

    finished = study_counts(study)["finished"]
    print(f"interrupted: {finished}/{total} trials finished, {interrupted_since(study, since)} interrupted "
          f"(queued to run again); resume with: {resume_command()}", flush=True)
