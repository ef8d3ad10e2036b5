"""The shipped presets: every one optimises the robust objective, and the README's first command (`quick`)
trains members for robustness; read from the spec files, no training."""

import pytest

from search.run import parse_args, spec_from_args
from search.study.goals import canonical_objective, ensemble_objective
from search.study.space import warm_start_trials
from search.study.spec import STUDIES_DIR, load_spec

PRESETS = sorted(path.name.removesuffix(".toml") for path in STUDIES_DIR.iterdir() if path.name.endswith(".toml"))
#: The policies written to train for robustness: corruptions from the training families, stain shifts, and
#: the consistency-loss variants (data_pipeline.policies).
ROBUST_POLICIES = {"corrupt", "corrupt_jsd", "augmix_jsd", "stain"}


def test_every_preset_is_listed():
    assert {"quick", "fast", "medium", "accurate", "default", "an2dl_gpu", "best"} <= set(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_optimises_the_robust_objective(name):
    spec = load_spec(name)
    assert canonical_objective(spec.algorithm.objective) == "robust"
    assert ensemble_objective(spec.algorithm.objective) == "robust"  # the build selects for the same goal
    assert ROBUST_POLICIES & set(spec.space.augment_policies), "a robust objective needs robust members to find"


def test_quick_trains_robust_members_first():
    spec = load_spec("quick")
    policies = [params["augment_policy"] for params, _ in warm_start_trials(spec)]
    assert spec.budget.trials >= len(policies), "every warm start runs"
    robust = [policy for policy in policies if policy in ROBUST_POLICIES]
    assert len(robust) > len(policies) / 2, policies
    assert spec.robustness.heldout_families, "trials are scored on families no member trained on"


def test_the_clean_objective_stays_a_choice():
    spec = spec_from_args(parse_args(["--study", "quick", "--objective", "clean"]))
    assert canonical_objective(spec.algorithm.objective) == "clean"
    assert ensemble_objective(spec.algorithm.objective) == "clean"
