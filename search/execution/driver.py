"""The search driver: everything `python -m search.run` and `cellsearch.search` do, in one function.

Order matters: the spec and the data are checked (and the data cleaned and split) before any worker
starts, so bad input fails in seconds with one line; only then are the storage, the study and the
workers set up.

`budget.timeout_s` (`--timeout`) bounds the whole run, counted from its start: workers get a deadline that
leaves room for the driver's own wrap-up (workers exiting, the report), as this study's last run measured it;
their trials end by it (see search.execution.worker), and a worker still running a little past it is stopped,
its trial recorded as interrupted and queued again.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import optuna

from common.errors import ConfigError
from search.study.spec import StudySpec, validate_spec

WRAP_UP_ATTR = "wrap_up_seconds"  # study attribute: the last trial's end to the report's, as last measured
FIRST_WRAP_UP_S = 15.0  # assumed until a run of the study has measured it
REFIT_ATTR = "refit_seconds"  # study attribute: the last refit build's retraining, as it measured it
FIRST_REFIT_SHARE = 0.25  # of the timeout, kept for the build's refit until a build of the study has measured it
RUN_ENDS_ATTR = "run_ends_at"  # study attribute: the unix time the last timed run gave search and build; None untimed
BACKSTOP_FRACTION = 0.02  # of the timeout: how long past their deadline workers may run before being stopped
LAST_RESORT_FRACTION = 0.05  # of the timeout: how long past it a worker may finish a trained trial

#: Keyword overrides of `run_study`/`cellsearch.search` and the spec key each one sets.
OVERRIDES: dict[str, tuple[str, str]] = {
    "trials": ("budget", "trials"), "timeout": ("budget", "timeout_s"),
    "storage": ("storage", "url"), "artifacts": ("storage", "artifacts"),
    "executor": ("executor", "kind"), "workers": ("executor", "workers"), "gpus": ("executor", "gpus"),
    "cpus": ("executor", "cpus"), "address": ("executor", "address"), "data": ("data", "path"),
    "image_size": ("data", "image_size"), "objective": ("algorithm", "objective"),
    "mixed_precision": ("executor", "mixed_precision"),
}


def apply_overrides(spec: StudySpec, *, out: str | None = None, name: str | None = None,
                    **overrides: Any) -> StudySpec:
    """A copy of `spec` with the given values (None: keep the spec's); validated again."""
    spec = dataclasses.replace(spec, **{section: dataclasses.replace(getattr(spec, section))
                                        for section in {s for s, _ in OVERRIDES.values()}})
    for key, value in overrides.items():
        if key not in OVERRIDES:
            raise ConfigError(f"unknown search option {key!r} (known: {', '.join(OVERRIDES)})")
        if value is not None:
            section, field = OVERRIDES[key]
            setattr(getattr(spec, section), field, value)
    spec.out = out or spec.out
    spec.name = name or spec.name
    validate_spec(spec, "options")
    return spec


def _plan_reseeds(spec: StudySpec, study: optuna.Study, top: int, say) -> None:
    """Enqueue the copies and shrink the budget to exactly the waiting trials: a reseed run adds no search."""
    from search.study.reseed import enqueue_reseeds, waiting_count
    from search.study.optuna_study import finished_count

    copied = enqueue_reseeds(study, top)
    waiting = waiting_count(study)
    spec.budget.trials = finished_count(study) + waiting
    say(f"reseeding: copies of trial(s) {copied or 'none (all already copied)'} enqueued; "
          f"{waiting} waiting trial(s) to run")


@dataclass(frozen=True)
class Deadlines:
    """A timed run's unix times: `workers`, by which trials end; `backstop`, after which workers still
    running are stopped, unless every trial still running has trained and announced when its evaluation and
    publication end (`PUBLISHED_BY`): those are waited for until then, never past `last_resort`. A trial
    stopped while it evaluates loses its whole training."""

    workers: float
    backstop: float
    last_resort: float

    def passed(self, study: optuna.Study, now: float | None = None) -> bool:
        """Whether workers still running are to be stopped now."""
        from optuna.trial import TrialState

        from search.execution.lifecycle import PUBLISHED_BY

        now = time.time() if now is None else now
        if now < self.backstop:
            return False
        if now >= self.last_resort:
            return True
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        ends = [trial.user_attrs.get(PUBLISHED_BY) for trial in running]
        return None in ends or now >= max(ends, default=now)

    @classmethod
    def plan(cls, study: optuna.Study, started_at: float, timeout_s: float | None,
             refit: bool = False) -> "Deadlines | None":
        """With `refit` (the spec's `[robustness] refit`), the time the build will spend retraining its members
        is kept too, so that search and build together end in the time given."""
        if not timeout_s:
            return None
        workers = started_at + timeout_s - study.user_attrs.get(WRAP_UP_ATTR, FIRST_WRAP_UP_S)
        if refit:
            workers -= refit_reserve(study, timeout_s)
        return cls(workers, workers + BACKSTOP_FRACTION * timeout_s, workers + LAST_RESORT_FRACTION * timeout_s)


def refit_reserve(study: optuna.Study, timeout_s: float) -> float:
    """Seconds kept for the build's refit: what the study's last refit took, else a share of the timeout."""
    return min(study.user_attrs.get(REFIT_ATTR, FIRST_REFIT_SHARE * timeout_s), 0.5 * timeout_s)


def record_wrap_up(study: optuna.Study, started_at: float) -> None:
    """Store how long the run took from its last trial's end to now, for the next run's deadlines (the CLI
    calls it again once it has printed its summary)."""
    ends = [t.datetime_complete.timestamp() for t in study.get_trials(deepcopy=False) if t.datetime_complete]
    if ends and max(ends) >= started_at:
        study.set_user_attr(WRAP_UP_ATTR, time.time() - max(ends))


def _describe(device) -> str:
    if device.gpu is not None:
        return f"gpu {device.gpu}"
    cores = f" on core(s) {','.join(map(str, device.cpu_cores))}" if device.cpu_cores else ""
    return f"cpu x{device.cpu_threads}{cores}"


def _execute(spec: StudySpec, study: optuna.Study, show_progress: bool, say, started_at: float) -> None:
    from search.execution.devices_plan import parse_gpus, plan_workers, usable_cores
    from search.study.optuna_study import finished_count

    location = spec.location
    deadlines = Deadlines.plan(study, started_at, spec.budget.timeout_s, spec.robustness.refit)
    if deadlines and spec.robustness.refit:
        say(f"timeout: about {refit_reserve(study, spec.budget.timeout_s):.0f} s kept for the build's refit "
            f"([robustness] refit)")
    deadline = deadlines.workers if deadlines else None
    if deadline is not None and time.time() >= deadline:
        report_s = started_at + spec.budget.timeout_s - deadline
        say(f"timeout: no time left for a trial: {spec.budget.timeout_s:g} s given, {time.time() - started_at:.0f} s "
            f"spent starting, about {report_s:.0f} s kept for the report")
        return
    gpus = parse_gpus(spec.executor.gpus)
    if spec.executor.kind == "ray":
        from search.execution.ray_executor import run_ray

        run_ray(spec, location.storage, location.artifacts, gpus, deadlines, show_progress=show_progress)
        return
    from search.execution.local import run_local

    remaining = max(spec.budget.trials - finished_count(study), 1)
    devices = plan_workers(gpus, spec.executor.workers, usable_cores(spec.executor.cpus))[:remaining]
    say(f"{len(devices)} worker(s): " + ", ".join(_describe(d) for d in devices))
    run_local(spec, study, location.storage, location.artifacts, devices, deadlines, show_progress=show_progress)


def run_study(spec: StudySpec, *, reseed_top: int | None = None, show_progress: bool = True,
              quiet: bool = False, started_at: float | None = None) -> optuna.Study:
    """Prepare the data, open (or continue) the study, run its missing trials, and write its report.

    Returns the Optuna study. Running it again continues the study until it holds `budget.trials`
    finished trials. `quiet`: no notes on the data, the workers and the storage (errors still show).
    `started_at`: the unix time `budget.timeout_s` counts from (default: now; the CLI gives its own start).
    """
    started_at = time.time() if started_at is None else started_at
    from search.execution.extras import require_extras
    from search.execution.data_check import load_and_clean, upload_cleaning_report
    from search.reports.study_report import write_report
    from search.execution.storage import open_artifact_store, open_storage
    from search.study.optuna_study import create_or_load_study

    if reseed_top is not None and reseed_top < 1:
        raise ConfigError(f"invalid reseed_top value {reseed_top}: need at least 1")
    require_extras(spec)
    say = (lambda message: None) if quiet else (lambda message: print(message, flush=True))
    prepared = load_and_clean(spec)
    say(prepared.describe())
    location = spec.location
    storage = open_storage(location.storage, heartbeat_interval=spec.storage.heartbeat_interval,
                           grace_period=spec.storage.grace_period, max_retry=spec.storage.max_retry)
    artifact_store = open_artifact_store(location.artifacts)
    study = create_or_load_study(spec, storage)
    upload_cleaning_report(study, artifact_store, prepared)
    if reseed_top is not None:
        _plan_reseeds(spec, study, reseed_top, say)
    location.remember()
    say(f"study {spec.name!r}: storage {location.storage}, artifacts {location.artifacts}, "
        f"executor {spec.executor.kind}")
    timeout_s = spec.budget.timeout_s
    study.set_user_attr(RUN_ENDS_ATTR, started_at + timeout_s if timeout_s else None)
    _execute(spec, study, show_progress, say, started_at)
    write_report(study, location.report_dir, artifact_store=artifact_store)
    record_wrap_up(study, started_at)
    return study
