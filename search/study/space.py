"""The define-by-run search space: conditional where it matters.

Unfreeze depth, the fine-tuning learning-rate factor and gradual unfreezing exist only for pretrained backbones
(models from scratch train everything in one stage); weight decay only for optimizers that decouple it; augmentation
strength only when there is an augmentation policy.
"""

from __future__ import annotations

from typing import Any, Callable

import optuna

from search.study.trial_config import TrialConfig
from search.study.goals import early_stopping_monitor
from search.study.spec import WARM_START_KEYS, StudySpec


def suggest_params(trial: optuna.Trial, spec: StudySpec, is_pretrained: Callable[[str], bool]) -> dict[str, Any]:
    space = spec.space
    params: dict[str, Any] = {"backbone": trial.suggest_categorical("backbone", space.backbones)}
    if is_pretrained(params["backbone"]):
        params["unfreeze_fraction"] = trial.suggest_float("unfreeze_fraction", *space.unfreeze_fraction)
        params["finetune_lr_factor"] = trial.suggest_float("finetune_lr_factor", *space.finetune_lr_factor,
                                                           log=True)
        params["gradual_unfreeze"] = trial.suggest_categorical("gradual_unfreeze", space.gradual_unfreeze)
    params["augment_policy"] = trial.suggest_categorical("augment_policy", space.augment_policies)
    if params["augment_policy"] != "none":
        params["augment_strength"] = trial.suggest_float("augment_strength", *space.augment_strength)
    params["optimizer"] = trial.suggest_categorical("optimizer", space.optimizers)
    params["learning_rate"] = trial.suggest_float("learning_rate", *space.learning_rate, log=True)
    if params["optimizer"] != "adam":
        params["weight_decay"] = trial.suggest_float("weight_decay", *space.weight_decay, log=True)
    params["batch_size"] = trial.suggest_categorical("batch_size", space.batch_size)
    params["dropout"] = trial.suggest_float("dropout", *space.dropout)
    params["label_smoothing"] = trial.suggest_float("label_smoothing", *space.label_smoothing)
    params["epochs"] = trial.suggest_int("epochs", *space.epochs)
    params["class_weighting"] = trial.suggest_categorical("class_weighting", space.class_weighting)
    return params


def fixed_fields(spec: StudySpec) -> dict[str, Any]:
    """Everything of a TrialConfig that the spec fixes for every trial: data, cleaning, split, budget,
    robustness protocol."""
    data, budget, robustness, location = spec.data, spec.budget, spec.robustness, spec.location
    return dict(
        data=data.path, image_size=data.image_size, center_crop=data.center_crop,
        val_fraction=data.val_fraction, test_fraction=data.test_fraction, split_seed=data.split_seed,
        split_file=str(location.split_file), max_train_images=data.max_train_images,
        exclude_file=str(location.removed_ids_file) if spec.cleaning.enabled else None,
        head_epochs=spec.space.head_epochs, early_stopping_patience=budget.early_stopping_patience,
        time_budget_s=budget.trial_time_budget_s, tta_views=budget.tta_views,
        train_families=list(robustness.train_families), heldout_families=list(robustness.heldout_families),
        robust_seed=robustness.seed, early_stopping_monitor=early_stopping_monitor(spec.algorithm.objective),
        mixed_precision=spec.executor.mixed_precision,
    )


def config_from_params(params: dict[str, Any], spec: StudySpec, is_pretrained: Callable[[str], bool],
                       seed: int) -> TrialConfig:
    """The full TrialConfig for sampled `params`: the spec fills everything the search does not tune."""
    fixed = {**fixed_fields(spec), "seed": seed}
    if is_pretrained(params["backbone"]):
        fixed["weights"] = spec.space.weights
    else:
        fixed["weight_decay"] = params.get("weight_decay", 0.0)
    values = {**fixed, **params}
    values.setdefault("weight_decay", 0.0)
    values.setdefault("augment_strength", 0.0)
    return TrialConfig(**values)


def warm_start_trials(spec: StudySpec) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(parameters, user attributes) of each warm-start trial to enqueue, in the spec's order, skipping entries
    whose choices are not in this spec's space (they would break the sampler): an entry with `copies = N` runs
    N times (each trial has its own seed), one with `prune = false` is never pruned."""
    from search.study.reseed import PROTECTED_ATTR

    allowed = {"backbone": spec.space.backbones, "augment_policy": spec.space.augment_policies,
               "optimizer": spec.space.optimizers, "batch_size": spec.space.batch_size}
    trials = []
    for index, entry in enumerate(spec.warm_start):
        params = {k: v for k, v in entry.items() if k not in WARM_START_KEYS}
        if not all(params.get(key, choices[0]) in choices for key, choices in allowed.items()):
            continue
        attrs = {"warm_start": index} | ({PROTECTED_ATTR: True} if entry.get("prune") is False else {})
        trials += [(params, attrs)] * entry.get("copies", 1)
    return trials
