"""Create or load the Optuna study a spec describes: sampler, pruner, direction, warm start."""

from __future__ import annotations

import json

import optuna
from optuna.trial import TrialState

from search.study.experimental import experimental_features
from search.study.goals import get_objective
from search.study.space import warm_start_trials
from search.study.spec import AlgorithmSpec, StudySpec

# What `budget.trials` counts: a failed or interrupted trial does not, its configuration is queued again.
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def make_sampler(algorithm: AlgorithmSpec, worker_index: int = 0) -> optuna.samplers.BaseSampler:
    """Each worker gets its own seed, or parallel workers would propose identical configurations."""
    seed = None if algorithm.seed is None else algorithm.seed + 1000 * worker_index
    if algorithm.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    with experimental_features():  # grouped TPE
        return optuna.samplers.TPESampler(
            multivariate=algorithm.multivariate, group=algorithm.multivariate, constant_liar=True,
            n_startup_trials=algorithm.n_startup_trials, seed=seed,
        )


def make_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    """Resources are epochs: a trial reports validation accuracy once per epoch of every stage."""
    algorithm = spec.algorithm
    max_epochs = spec.space.epochs[1] + spec.space.head_epochs
    if algorithm.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=algorithm.min_resource, max_resource=max_epochs,
                                              reduction_factor=algorithm.reduction_factor)
    if algorithm.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=algorithm.min_resource)
    return optuna.pruners.NopPruner()


def open_study(spec: StudySpec, storage, worker_index: int = 0) -> optuna.Study:
    return optuna.create_study(
        study_name=spec.name, storage=storage, directions=get_objective(spec.algorithm.objective).directions,
        load_if_exists=True, sampler=make_sampler(spec.algorithm, worker_index), pruner=make_pruner(spec),
    )


def create_or_load_study(spec: StudySpec, storage) -> optuna.Study:
    """The driver's set-up: fail and queue again the trials of workers that died unseen (see
    search.execution.lifecycle), record the spec, and enqueue known-good configurations first."""
    from search.execution.lifecycle import recover_stale_trials

    study = open_study(spec, storage)
    recover_stale_trials(study)
    study.set_user_attr("spec", json.loads(json.dumps(spec.to_dict())))
    with experimental_features():
        study.set_metric_names(get_objective(spec.algorithm.objective).metric_names)
    if not study.get_trials(deepcopy=False):
        for params, user_attrs in warm_start_trials(spec):
            study.enqueue_trial(params, user_attrs=user_attrs)
    return study


def finished_count(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def budget_callback(spec: StudySpec) -> optuna.study.MaxTrialsCallback:
    """A worker starts no trial once the finished ones plus those running anywhere (other workers, other
    drivers) fill the budget, so parallel workers overshoot it by at most one trial each."""
    return optuna.study.MaxTrialsCallback(spec.budget.trials, states=(*FINISHED, TrialState.RUNNING))
