"""Reseeding: train the study's best configurations once more with new seeds, as extra ensemble members.

Members that differ only in initialisation, data order and augmentation draws are the cheapest diversity
an ensemble can get: each is as good as the configuration it copies, and their errors are partly
independent. A search spends its budget exploring, so it typically ends with one or two strong trials
and many weaker ones; `python -m search.run --reseed-top K` adds one copy of each of the K best. A copy is
an enqueued trial with the same parameters; its seed is the spec's seed plus its trial number, so it
differs from the original; it is marked with the user attribute `reseed_of` and never pruned (it was
chosen, not sampled).
"""

from __future__ import annotations

import optuna
from optuna.trial import TrialState

from common.errors import ConfigError

RESEED_ATTR = "reseed_of"
PROTECTED_ATTR = "never_prune"  # warm starts the spec marks `prune = false`


def is_reseed(trial: optuna.trial.FrozenTrial | optuna.Trial) -> bool:
    return RESEED_ATTR in trial.user_attrs


def is_protected(trial) -> bool:
    """Chosen, not sampled, so never pruned: reseeded copies and warm starts marked `prune = false`."""
    return is_reseed(trial) or bool(trial.user_attrs.get(PROTECTED_ATTR))


def enqueue_reseeds(study: optuna.Study, top: int) -> list[int]:
    """Enqueue a copy of each of the `top` best completed original trials that has no live copy yet
    (a failed copy does not count). Returns the numbers of the trials copied now."""
    if top < 1:
        raise ConfigError(f"--reseed-top must be >= 1, got {top}")
    trials = study.get_trials(deepcopy=False)
    copied = {t.user_attrs[RESEED_ATTR] for t in trials if is_reseed(t) and t.state != TrialState.FAIL}
    originals = [t for t in trials if t.state == TrialState.COMPLETE and not is_reseed(t)]
    best = sorted(originals, key=lambda t: (-t.value, t.number))[:top]
    enqueued = []
    for trial in best:
        if trial.number not in copied:
            study.enqueue_trial(trial.params, user_attrs={RESEED_ATTR: trial.number})
            enqueued.append(trial.number)
    return enqueued


def waiting_count(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
