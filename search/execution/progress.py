"""Live progress of a study, read from its storage: trial n/N, each running trial's epoch and last score,
pruned, failed, best, ETA. `tqdm.auto` draws a notebook widget in Jupyter and a text bar elsewhere."""

from __future__ import annotations

import time
from collections import Counter
from typing import Callable

import optuna
from optuna.trial import TrialState
from tqdm.auto import tqdm

from search.study.optuna_study import FINISHED


def study_counts(study: optuna.Study) -> dict[str, object]:
    trials = study.get_trials(deepcopy=False)
    head_epochs = study.user_attrs.get("spec", {}).get("space", {}).get("head_epochs", 0)
    states = Counter(t.state for t in trials)
    complete = [t.values[0] for t in trials if t.state == TrialState.COMPLETE and t.values]
    running = [t for t in trials if t.state == TrialState.RUNNING]
    return {
        "finished": sum(states[s] for s in FINISHED),
        "running": states[TrialState.RUNNING],
        "complete": states[TrialState.COMPLETE],
        "pruned": states[TrialState.PRUNED],
        "failed": states[TrialState.FAIL],
        "best": max(complete) if complete else None,
        "epochs": " ".join(_epoch_of(t, head_epochs) for t in running),
    }


def total_epochs(params: dict, head_epochs: int) -> int | None:
    """Epochs a trial trains for: its `epochs`, plus the head stage of a pretrained backbone; None if unknown."""
    from backbones import get_backbone
    from common.errors import BackboneError

    if "epochs" not in params:
        return None
    try:
        pretrained = get_backbone(params.get("backbone", "")).pretrained
    except BackboneError:
        pretrained = False
    return params["epochs"] + (head_epochs if pretrained else 0)


def _epoch_of(trial: optuna.trial.FrozenTrial, head_epochs: int = 0) -> str:
    """`#7:ep4/20=0.9123`: a running trial, its last reported epoch (1-based) of its total, and that epoch's
    objective value."""
    if not trial.intermediate_values:
        return f"#{trial.number}:starting"
    step = max(trial.intermediate_values)
    total = total_epochs(trial.params, head_epochs)
    return f"#{trial.number}:ep{step + 1}{'' if total is None else f'/{total}'}={trial.intermediate_values[step]:.4f}"


def watch(study: optuna.Study, total: int, is_running: Callable[[], bool], interval: float = 2.0,
          show: bool = True, check: float = 0.25) -> dict:
    """Refresh a progress bar (hidden unless `show`) every `interval` s until `is_running()`, asked every `check`
    s so that the run ends with its workers, turns false; tqdm estimates the ETA from the rate."""
    start = study_counts(study)["finished"]
    with tqdm(total=total, initial=min(start, total), desc=f"study {study.study_name}", unit="trial",
              dynamic_ncols=True, disable=not show) as bar:
        while True:
            alive = is_running()
            counts = study_counts(study)
            bar.n = min(counts["finished"], total)
            best = counts["best"]
            bar.set_postfix(running=counts["epochs"] or 0, pruned=counts["pruned"], failed=counts["failed"],
                            best="-" if best is None else f"{best:.4f}", refresh=False)
            bar.refresh()
            if not alive:
                return counts
            _sleep_while(is_running, interval, check)


def _sleep_while(is_running: Callable[[], bool], seconds: float, check: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and is_running():
        time.sleep(min(check, max(deadline - time.monotonic(), 0)))


def print_interrupted(study: optuna.Study, total: int, since: float) -> None:
    """The last line of an interrupted run: where the study stands and the command that continues it."""
    from search.execution.lifecycle import interrupted_since, resume_command

    finished = study_counts(study)["finished"]
    print(f"interrupted: {finished}/{total} trials finished, {interrupted_since(study, since)} interrupted "
          f"(queued to run again); resume with: {resume_command()}", flush=True)
