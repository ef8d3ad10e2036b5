"""Tiny real studies on the Ray executor: real Ray (simulated GPUs), real Optuna, real training.

One study runs through `python -m search.run --executor ray` on two simulated GPUs; a failing study calls
`run_ray` directly on CPU shares. About two minutes on two shared cores. The cluster of two nodes is in
test_ray_cluster.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from optuna.artifacts import download_artifact
from optuna.trial import TrialState

from search.execution.ray_cluster import RayPlan, plan_resources
from search.execution.ray_executor import WORKER_ATTR, run_ray
from common.errors import WorkerFailed
from search.trial.objective import ARTIFACT_ATTR_PREFIX
from search.study.spec import load_spec, spec_from_dict
from search.execution.storage import open_artifact_store
from search.trial.trainer import ARTIFACT_FILES
from search_helpers import run_search, write_tiny_spec

TRIALS = 3


def load_study(spec_path: Path) -> optuna.Study:
    spec = load_spec(str(spec_path))
    return optuna.load_study(study_name=spec.name, storage=spec.location.storage)


def ran_together(a: optuna.trial.FrozenTrial, b: optuna.trial.FrozenTrial) -> bool:
    """Both trials were training at the same moment (times recorded inside the Ray actors)."""
    end_a = a.user_attrs.get("finished_at", a.datetime_complete.timestamp())
    end_b = b.user_attrs.get("finished_at", b.datetime_complete.timestamp())
    return a.user_attrs["started_at"] < end_b and b.user_attrs["started_at"] < end_a


@pytest.fixture(scope="module")
def ray_study(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ray")
    spec_path = write_tiny_spec(folder, name="raytiny", trials=TRIALS, pruner="hyperband")
    done = run_search("--study", str(spec_path), "--executor", "ray", "--gpus", "0,1")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return spec_path, done


def test_every_trial_finishes_in_the_optuna_study(ray_study):
    spec_path, done = ray_study
    assert "2 parallel trial(s) on ray, each 1 cpu + 1 gpu" in done.stdout
    trials = load_study(spec_path).get_trials()
    assert len(trials) == TRIALS
    # Optuna's Hyperband pruner decides on whichever trial reaches a rung first: how many are pruned varies.
    assert {t.state for t in trials} <= {TrialState.COMPLETE, TrialState.PRUNED}
    assert any(t.state == TrialState.COMPLETE for t in trials)
    for trial in trials:
        assert trial.user_attrs["device"] in ("gpu:0", "gpu:1")
        assert trial.intermediate_values, f"trial {trial.number} has no per-epoch values"
        assert min(trial.intermediate_values) == 0  # steps are epoch indices, as with the local executor
        assert trial.user_attrs["ray_node_ip"] and len(trial.user_attrs["ray_node_id"]) > 20
    assert len({t.user_attrs[WORKER_ATTR] for t in trials}) == 2, "one worker actor ran every trial"


def test_trials_ran_in_parallel_on_distinct_devices(ray_study):
    spec_path, _ = ray_study
    trials = load_study(spec_path).get_trials()
    pairs = [(a, b) for i, a in enumerate(trials) for b in trials[i + 1:] if ran_together(a, b)]
    assert pairs, "no two trials trained at the same time"
    assert all(a.user_attrs["device"] != b.user_attrs["device"] for a, b in pairs)


def test_storage_alone_describes_each_completed_trial(ray_study, tmp_path):
    spec_path, _ = ray_study
    spec = load_spec(str(spec_path))
    store = open_artifact_store(str(spec.study_dir / "artifacts"))
    for trial in load_study(spec_path).get_trials(states=(TrialState.COMPLETE,)):
        assert trial.value == pytest.approx(trial.user_attrs["val_robust_tta"])
        assert trial.user_attrs["seed"] == (spec.algorithm.seed or 0) + trial.number  # same runner as local
        assert len(trial.intermediate_values) == trial.user_attrs["epochs_run"]
        assert 0 <= trial.user_attrs["test_accuracy"] <= 1
        for name in ARTIFACT_FILES:
            assert ARTIFACT_ATTR_PREFIX + name in trial.user_attrs
        target = tmp_path / f"metrics_{trial.number}.json"
        download_artifact(artifact_store=store, file_path=str(target),
                          artifact_id=trial.user_attrs[ARTIFACT_ATTR_PREFIX + "metrics.json"])
        assert json.loads(target.read_text())["val_robust_tta"] == trial.value
        config = tmp_path / f"config_{trial.number}.json"
        download_artifact(artifact_store=store, file_path=str(config),
                          artifact_id=trial.user_attrs[ARTIFACT_ATTR_PREFIX + "config.json"])
        assert json.loads(config.read_text())["learning_rate"] == trial.params["learning_rate"]
    assert not any((spec.study_dir / "work").glob("trial_*")), "scratch folders were left behind"


def test_a_finished_study_is_not_run_again(ray_study):
    spec_path, _ = ray_study
    spec = load_spec(str(spec_path))
    summary = run_ray(spec, spec.location.storage, str(spec.study_dir / "artifacts"), ["0", "1"],
                      None, show_progress=False)
    assert summary["trials"] == 0
    assert len(load_study(spec_path).get_trials()) == TRIALS


def test_failing_trials_are_recorded_and_stop_the_study_in_one_line(tmp_path):
    """Also the CPU-only path: no GPU listed, so the two worker actors share the two cores."""
    spec = spec_from_dict({
        "name": "rayfail", "out": str(tmp_path / "runs"),
        "data": {"path": str(tmp_path / "missing.npz")},
        "space": {"backbones": ["compact_cnn"], "epochs": [1, 1], "batch_size": [64]},
        "budget": {"trials": 2, "tta_views": 1},
        "algorithm": {"pruner": "none"},
        "executor": {"workers": 2},
    })
    url = f"sqlite:///{tmp_path / 'study.db'}"
    with pytest.raises(WorkerFailed, match=r"^worker \d stopped: 5 trials in a row failed, the last with: .*missing"):
        run_ray(spec, url, str(tmp_path / "artifacts"), [], None, show_progress=False)
    trials = optuna.load_study(study_name="rayfail", storage=url).get_trials()
    assert len(trials) >= 5
    # A trial killed before it started training has no worker recorded: the next run recovers it (stale).
    assert not [t for t in trials if t.state == TrialState.RUNNING and WORKER_ATTR in t.user_attrs]
    for trial in trials:
        if trial.user_attrs.get("fail_reason") != "interrupted" and trial.state == TrialState.FAIL:
            assert trial.user_attrs["device"] == "cpu"
            assert "missing.npz" in trial.user_attrs["fail_reason"]
            assert "Traceback" in trial.user_attrs["fail_traceback"]


@pytest.mark.parametrize("cluster, executor, expected", [
    ({"CPU": 2, "GPU": 2}, {}, RayPlan(workers=2, cpus_per_trial=1, gpus_per_trial=1)),
    ({"CPU": 8, "GPU": 2}, {"gpus_per_trial": 0.5}, RayPlan(workers=4, cpus_per_trial=2, gpus_per_trial=0.5)),
    ({"CPU": 2, "GPU": 2}, {"workers": 4}, RayPlan(workers=4, cpus_per_trial=0.5, gpus_per_trial=0.5)),
    ({"CPU": 4}, {}, RayPlan(workers=4, cpus_per_trial=1, gpus_per_trial=0)),
    ({"CPU": 32}, {}, RayPlan(workers=8, cpus_per_trial=4, gpus_per_trial=0)),
    ({"CPU": 2}, {"workers": 2, "cpus": 1}, RayPlan(workers=2, cpus_per_trial=0.5, gpus_per_trial=0)),
])
def test_resource_plan_fits_all_workers_at_once(cluster, executor, expected):
    plan = plan_resources(spec_from_dict({"executor": executor}), cluster)
    assert plan == expected
    assert plan.workers * plan.cpus_per_trial <= cluster["CPU"]
    assert plan.workers * plan.gpus_per_trial <= cluster.get("GPU", 0)


def test_workers_holding_part_of_a_gpu_are_capped_at_their_share_of_its_memory():
    assert RayPlan(4, 2, 0.5).gpu_memory == 0.45 and RayPlan(8, 1, 0.25).gpu_memory == 0.225
    assert RayPlan(2, 1, 1).gpu_memory is None and RayPlan(4, 1, 0).gpu_memory is None  # a whole GPU, or none
