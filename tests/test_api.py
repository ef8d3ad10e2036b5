"""The Python API (`import cellsearch as cs`): the three-line flow, fail-fast input checks, cleaning inside a
search, the one trial runner, and one error line from every command."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

import cellsearch as cs
from search_helpers import small_data
from search.trial.objective import Objective
from search.execution.data_check import load_and_clean
from search.study.reseed import RESEED_ATTR
from search.study.spec import spec_from_dict
from search.study.optuna_study import create_or_load_study
from search.execution.storage import open_artifact_store, open_storage

TINY = {
    "name": "tiny",
    "data": {"max_train_images": 320},
    "space": {"backbones": ["compact_cnn"], "augment_policies": ["light", "none"], "optimizers": ["adamw"],
              "learning_rate": [2e-3, 5e-3], "batch_size": [64], "epochs": [1, 2]},
    "budget": {"trials": 2, "tta_views": 2, "early_stopping_patience": 3},
    "algorithm": {"pruner": "none", "n_startup_trials": 2},
    "storage": {"heartbeat_interval": 2, "grace_period": 6},
}


def tiny_spec(tmp_path: Path, **sections) -> dict:
    spec = json.loads(json.dumps(TINY))
    spec["out"] = str(tmp_path / "runs")
    spec["data"]["path"] = str(small_data(tmp_path / "small_cells.npz"))
    for section, values in sections.items():
        spec[section] = {**spec.get(section, {}), **values} if isinstance(values, dict) else values
    return spec


def test_three_line_flow_in_a_fresh_process(tmp_path, embedded):
    images = embedded.split("test").images[:16]
    np.save(tmp_path / "images.npy", images)
    script = textwrap.dedent(f"""
        import json, numpy as np
        import cellsearch as cs
        study = cs.search({tiny_spec(tmp_path)!r}, workers=2, progress=False)
        ens = cs.build_ensemble(study, top=2)  # the views the study saved (its spec: 2)
        ens.save({str(tmp_path / "my_ensemble")!r}); again = cs.load_ensemble({str(tmp_path / "my_ensemble")!r})
        images = np.load({str(tmp_path / "images.npy")!r})
        labels, proba = again.predict(images), again.predict_proba(images)
        print(json.dumps({{"labels": np.asarray(labels).tolist(), "proba": np.asarray(proba).shape,
                          "same": bool(np.allclose(proba, ens.predict_proba(images), atol=1e-5)),
                          "best": study.best_trial.number, "views": ens.get_params()["tta_views"]}}))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["proba"] == [16, 8] and len(result["labels"]) == 16 and result["same"]
    assert result["best"] in (0, 1) and result["views"] == 2


def _bad_npz(tmp_path: Path, images: np.ndarray, labels: np.ndarray) -> str:
    path = tmp_path / "bad.npz"
    np.savez(path, images=images, labels=labels)
    return str(path)


@pytest.mark.parametrize(("make", "message"), [
    (lambda rng: (rng.integers(0, 255, (40, 28, 28, 4), dtype=np.uint8), np.arange(40) % 8), "colour channels"),
    (lambda rng: (rng.integers(0, 255, (16, 28, 28, 3), dtype=np.uint8), np.arange(16) % 8), "class"),
])
def test_bad_data_fails_in_seconds_before_any_worker(tmp_path, make, message):
    images, labels = make(np.random.default_rng(0))
    data = _bad_npz(tmp_path, images, labels)
    started = time.perf_counter()
    with pytest.raises(cs.errors.DataError, match=message):
        cs.search(tiny_spec(tmp_path), data=data, progress=False)
    assert time.perf_counter() - started < 30
    assert not (tmp_path / "runs" / "tiny" / "logs").exists()  # no worker was started
    assert not (tmp_path / "runs" / "tiny" / "study.db").exists()


def test_bad_options_and_unknown_policies_fail_before_any_worker(tmp_path):
    with pytest.raises(cs.errors.ConfigError, match="unknown augmentation policy 'sparkle'"):
        cs.search(tiny_spec(tmp_path, space={"augment_policies": ["sparkle"]}), progress=False)
    with pytest.raises(cs.errors.ConfigError, match="unknown search option 'trails'"):
        cs.search(tiny_spec(tmp_path), trails=3, progress=False)
    with pytest.raises(cs.errors.ConfigError, match="'budget.trials'"):
        cs.search(tiny_spec(tmp_path), trials=0, progress=False)
    assert not (tmp_path / "runs").exists()


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    folder = tmp_path_factory.mktemp("api")
    # the embedded set itself, with its real duplicates for the cleaning to remove
    study = cs.search(tiny_spec(folder, data={"path": ""}, budget={"trials": 1}), workers=1, progress=False)
    return study


def test_cleaning_runs_inside_a_search_and_its_report_is_a_study_artifact(searched, tmp_path):
    from optuna.artifacts import download_artifact

    study = searched.optuna_study
    store = open_artifact_store(searched.location.artifacts)
    target = tmp_path / "cleaning_report.csv"
    download_artifact(artifact_store=store, file_path=str(target),
                      artifact_id=study.user_attrs["artifact:cleaning_report.csv"])
    import pandas as pd

    report = pd.read_csv(target)
    removed = set(report.loc[~report["kept"], "id"].astype(str))
    assert "exact_duplicate" in set(report["reason"]) and removed
    assert removed == set(json.loads(searched.location.removed_ids_file.read_text()))
    trial = study.get_trials(states=(TrialState.COMPLETE,))[0]
    predictions = tmp_path / "predictions.npz"
    download_artifact(artifact_store=store, file_path=str(predictions),
                      artifact_id=trial.user_attrs["artifact:predictions.npz"])
    with np.load(predictions) as saved:
        seen = set(saved["val_ids"].astype(str)) | set(saved["test_ids"].astype(str))
    assert not seen & removed  # the split was made after cleaning


def test_the_dashboard_shows_named_objectives_and_trial_plots(searched):
    study = searched.optuna_study
    assert study.metric_names == ["val_robust_tta"]
    trial = study.get_trials(states=(TrialState.COMPLETE,))[0]
    assert {"artifact:training_curves.png", "artifact:confusion_matrix.png"} <= set(trial.user_attrs)
    assert {"seed", "val_corrupted_accuracy", "val_corrupted_accuracy_tta", "val_accuracy_acquisition",
            "val_accuracy_artefact"} <= set(trial.user_attrs)


def test_local_runner_records_the_seed_and_never_prunes_chosen_trials(tmp_path):
    """A sampled-like warm start is pruned; the copies of one marked `prune = false` and a reseeded copy are
    chosen, so they run to the end, each with its own seed."""
    params = {"backbone": "compact_cnn", "augment_policy": "none", "optimizer": "adamw", "learning_rate": 3e-3,
              "weight_decay": 1e-4, "batch_size": 64, "dropout": 0.0, "label_smoothing": 0.0, "epochs": 2,
              "class_weighting": False}
    spec = spec_from_dict(tiny_spec(tmp_path, budget={"trials": 4},
                                    warm_start=[params, {**params, "copies": 2, "prune": False}]))
    load_and_clean(spec)
    study = create_or_load_study(spec, open_storage(spec.location.storage, heartbeat_interval=None))
    study.pruner = optuna.pruners.ThresholdPruner(lower=1.01)  # prunes every trial it may prune
    study.enqueue_trial(params, user_attrs={RESEED_ATTR: 0})
    study.optimize(Objective(spec, open_artifact_store(spec.location.artifacts)), n_trials=4)
    original, *chosen = study.get_trials()
    assert original.state == TrialState.PRUNED
    assert [t.state for t in chosen] == [TrialState.COMPLETE] * 3
    assert [t.user_attrs.get("warm_start") for t in chosen] == [1, 1, None]
    assert all(len(t.intermediate_values) == 2 for t in chosen)  # each reported every epoch, and was kept
    assert len({t.user_attrs["seed"] for t in (original, *chosen)}) == 4


CLI_ERRORS = [
    ("search.run", ["--study", "no_such_spec"], "study spec not found"),
    ("search.run", ["--study", "quick", "--data", "{tmp}/missing.npz"], "data path not found"),
    ("search.run", ["--study", "quick", "--storage", "postgresql://x:y@127.0.0.1:1/none"], "cannot use storage"),
    ("search.train_one", ["--config", "{tmp}/weights.json"], "weights file not found"),
    ("ensemble.build", ["--pointer", "{tmp}/nothing.json"], "no study given"),
    ("ensemble.predict", ["--ensemble", "{tmp}", "--input", "{tmp}/x.npz", "--output", "{tmp}/p.csv"], "manifest"),
]


@pytest.mark.parametrize(("module", "args", "message"), CLI_ERRORS)
def test_every_command_prints_one_line_per_error(tmp_path, module, args, message):
    (tmp_path / "weights.json").write_text(json.dumps(
        {"backbone": "mobilenet_v3_small", "weights": str(tmp_path / "gone.weights.h5"), "epochs": 1}))
    args = [a.format(tmp=tmp_path) for a in args]
    done = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and message in lines[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr


def test_progress_shows_each_running_trials_epoch_and_score():
    from search.execution.progress import study_counts

    study = optuna.create_study(direction="maximize")
    first, second = study.ask(), study.ask()
    first.report(0.41, 0)
    first.report(0.83, 1)
    done = study.ask()
    study.tell(done, 0.9)
    counts = study_counts(study)
    assert counts["epochs"] == f"#{first.number}:ep2=0.8300 #{second.number}:starting"
    assert (counts["running"], counts["complete"], counts["best"]) == (2, 1, 0.9)


def test_progress_ends_when_the_workers_do_not_at_its_next_refresh():
    from search.execution.progress import watch

    study = optuna.create_study(direction="maximize")
    study.tell(study.ask(), 0.5)
    ends = time.monotonic() + 0.3
    started = time.monotonic()
    counts = watch(study, 1, lambda: time.monotonic() < ends, interval=60, show=False)
    assert counts["complete"] == 1
    assert time.monotonic() - started < 30  # half the refresh interval: it did not wait for the refresh


@pytest.mark.slow  # tests/test_reports.py checks the Pareto-front report by default; this twin trains
def test_multi_objective_study_reports_its_pareto_front(tmp_path):
    """`multi`: clean and held-out accuracy as two objectives, no per-epoch reports, a Pareto front."""
    from search.reports.study_report import write_report
    from search.study.optuna_study import create_or_load_study

    spec = spec_from_dict(tiny_spec(tmp_path, algorithm={"objective": "multi", "pruner": "none"},
                                    budget={"trials": 2}))
    load_and_clean(spec)
    study = create_or_load_study(spec, open_storage(spec.location.storage, heartbeat_interval=None))
    study.optimize(Objective(spec, open_artifact_store(spec.location.artifacts)), n_trials=2)
    assert study.metric_names == ["val_accuracy_tta", "val_corrupted_accuracy_tta"]
    for trial in study.trials:
        assert trial.state == TrialState.COMPLETE and not trial.intermediate_values
        assert trial.values == [trial.user_attrs["val_accuracy_tta"], trial.user_attrs["val_corrupted_accuracy_tta"]]
    write_report(study, spec.location.report_dir)
    import pandas as pd

    front = pd.read_csv(spec.location.report_dir / "pareto_front.csv")
    assert set(front["number"]) == {t.number for t in study.best_trials}


def test_build_ensemble_takes_every_build_option_with_its_default():
    import dataclasses
    import inspect

    from ensemble.build import BuildOptions

    parameters = dict(inspect.signature(cs.build_ensemble).parameters)
    parameters.pop("study")
    fields = {f.name: f.default for f in dataclasses.fields(BuildOptions)}
    assert {name: p.default for name, p in parameters.items()} == fields
