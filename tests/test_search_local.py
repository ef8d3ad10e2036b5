"""Tiny real studies through `python -m search.run` with the local executor: parallel workers on simulated
devices, artifacts and attributes in the storage, resume after a killed worker, pruning, failures, storages,
and optuna-dashboard listing the study over HTTP."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
from optuna.artifacts import download_artifact
from optuna.trial import TrialState

from search.trial.objective import ARTIFACT_ATTR_PREFIX, Objective
from search.execution.data_check import load_and_clean
from search.study.spec import load_spec
from search.execution.storage import open_artifact_store, open_storage
from search.study.optuna_study import make_pruner
from search_helpers import require_postgres, run_search, write_tiny_spec



def load_study(spec_path: Path) -> optuna.Study:
    spec = load_spec(str(spec_path))
    return optuna.load_study(study_name=spec.name, storage=spec.location.storage)


def overlaps(a: optuna.trial.FrozenTrial, b: optuna.trial.FrozenTrial) -> bool:
    return a.datetime_start < b.datetime_complete and b.datetime_start < a.datetime_complete


@pytest.fixture(scope="module")
def parallel_study(tmp_path_factory):
    folder = tmp_path_factory.mktemp("parallel")
    spec_path = write_tiny_spec(folder, name="parallel", trials=2)
    done = run_search("--study", str(spec_path), "--gpus", "0,1")
    assert done.returncode == 0, done.stderr[-3000:]
    return spec_path, done


def test_two_workers_run_trials_in_parallel_on_distinct_devices(parallel_study):
    spec_path, done = parallel_study
    trials = load_study(spec_path).get_trials(states=(TrialState.COMPLETE,))
    assert len(trials) == 2
    assert "2 worker(s): gpu 0, gpu 1" in done.stdout
    pairs = [(a, b) for i, a in enumerate(trials) for b in trials[i + 1:] if overlaps(a, b)]
    assert pairs, "no two trials overlapped in time"
    assert all(a.user_attrs["device"] != b.user_attrs["device"] for a, b in pairs)
    assert {t.user_attrs["device"] for t in trials} == {"gpu:0", "gpu:1"}


def test_storage_alone_describes_each_trial(parallel_study, tmp_path):
    spec_path, _ = parallel_study
    spec = load_spec(str(spec_path))
    store = open_artifact_store(str(spec.study_dir / "artifacts"))
    for trial in load_study(spec_path).get_trials(states=(TrialState.COMPLETE,)):
        assert trial.value == pytest.approx(trial.user_attrs["val_robust_tta"])
        assert trial.user_attrs["val_robust_tta"] == pytest.approx(
            (trial.user_attrs["val_accuracy_tta"] + trial.user_attrs["val_corrupted_accuracy_tta"]) / 2)
        assert 0 <= trial.user_attrs["test_accuracy"] <= 1
        target = tmp_path / f"metrics_{trial.number}.json"
        download_artifact(artifact_store=store, file_path=str(target),
                          artifact_id=trial.user_attrs[ARTIFACT_ATTR_PREFIX + "metrics.json"])
        assert json.loads(target.read_text())["val_robust_tta"] == trial.value
        assert ARTIFACT_ATTR_PREFIX + "model.keras" in trial.user_attrs


def test_report_and_last_study_pointer(parallel_study):
    spec_path, done = parallel_study
    spec = load_spec(str(spec_path))
    report = spec.study_dir / "report"
    assert (report / "top_trials.csv").is_file()
    assert (report / "optimization_history.html").is_file()
    pointer = json.loads((Path(spec.out) / "last_study.json").read_text())
    assert pointer["study"] == "parallel" and pointer["storage"].startswith("sqlite:///")
    assert "optuna-dashboard sqlite:///" in done.stdout


@pytest.mark.slow  # by default test_interrupt's signal test checks that a rerun resumes the study
def test_running_again_continues_the_study(parallel_study):
    spec_path, _ = parallel_study
    before = {t.number for t in load_study(spec_path).get_trials(states=(TrialState.COMPLETE,))}
    done = run_search("--study", str(spec_path), "--trials", "3", "--workers", "1")
    assert done.returncode == 0, done.stderr[-3000:]
    after = load_study(spec_path).get_trials(states=(TrialState.COMPLETE,))
    assert before < {t.number for t in after} and len(after) == 3


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get_json(url: str, deadline: float):
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return json.loads(response.read())
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.5)


def test_optuna_dashboard_lists_the_study_and_its_trials(parallel_study):
    spec_path, _ = parallel_study
    spec = load_spec(str(spec_path))
    port = _free_port()
    dashboard = Path(sys.executable).parent / "optuna-dashboard"
    server = subprocess.Popen([str(dashboard), spec.location.storage, "--host", "127.0.0.1",
                               "--port", str(port), "--artifact-dir", str(spec.study_dir / "artifacts")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        studies = _get_json(f"http://127.0.0.1:{port}/api/studies", deadline)["study_summaries"]
        listed = {s["study_name"]: s["study_id"] for s in studies}
        assert "parallel" in listed
        detail = _get_json(f"http://127.0.0.1:{port}/api/studies/{listed['parallel']}", deadline)
        assert len([t for t in detail["trials"] if t["state"] == "Complete"]) >= 2
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.slow  # over a minute on 2 cores
def test_killed_worker_loses_no_completed_trial_and_its_trial_is_retried(tmp_path):
    # Trials long enough (several seconds even on a slow runner) that the poll below sees one running.
    spec_path = write_tiny_spec(tmp_path, name="resume", trials=3, min_epochs=3, max_epochs=3, train_images=1200)
    spec = load_spec(str(spec_path))
    driver = subprocess.Popen([sys.executable, "-m", "search.run", "--no-progress", "--study", str(spec_path),
                               "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        victim = _wait_for_running_after_complete(spec, deadline=time.time() + 300)
        os.kill(int(victim.user_attrs["worker"].rsplit(":", 1)[1]), signal.SIGKILL)
        driver.wait(timeout=120)
    finally:
        driver.kill()
    completed_before = {t.number for t in load_study(spec_path).get_trials(states=(TrialState.COMPLETE,))}
    time.sleep(spec.storage.grace_period + 1)  # the killed trial's heartbeat goes stale
    done = run_search("--study", str(spec_path), "--workers", "1")
    assert done.returncode == 0, done.stderr[-3000:]
    trials = {t.number: t for t in load_study(spec_path).get_trials()}
    assert completed_before <= {n for n, t in trials.items() if t.state == TrialState.COMPLETE}
    assert trials[victim.number].state == TrialState.FAIL
    retries = [t for t in trials.values() if t.system_attrs.get("failed_trial") == victim.number]
    assert retries and retries[0].state == TrialState.COMPLETE
    assert retries[0].params == victim.params


def _wait_for_running_after_complete(spec, deadline: float) -> optuna.trial.FrozenTrial:
    storage_url = spec.location.storage
    while time.time() < deadline:
        time.sleep(0.2)
        try:
            trials = optuna.load_study(study_name=spec.name, storage=storage_url).get_trials()
        except (KeyError, Exception):
            continue
        states = [t.state for t in trials]
        running = [t for t in trials if t.state == TrialState.RUNNING and "worker" in t.user_attrs]
        if TrialState.COMPLETE in states and running:
            return running[0]
    raise AssertionError("no trial was running after a completed one")


def _in_process_study(tmp_path, pruner: str = "none", train_images: int = 320):
    spec = load_spec(str(write_tiny_spec(tmp_path, pruner=pruner, train_images=train_images)))
    load_and_clean(spec)  # what the driver does before any trial: clean and split
    storage = open_storage(spec.location.storage, heartbeat_interval=None)
    study = optuna.create_study(study_name=spec.name, storage=storage, direction="maximize",
                                pruner=make_pruner(spec), sampler=optuna.samplers.RandomSampler(seed=0))
    return spec, study, Objective(spec, open_artifact_store(str(spec.study_dir / "artifacts")))


def test_median_pruner_prunes_a_hopeless_trial(tmp_path):
    spec, study, objective = _in_process_study(tmp_path, pruner="median", train_images=2000)
    spec.space.learning_rate = [1e-7, 5e-3]
    spec.space.epochs = [2, 2]
    study.pruner = optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0)
    good = {"backbone": "compact_cnn", "augment_policy": "none", "optimizer": "adam", "learning_rate": 5e-3,
            "batch_size": 64, "dropout": 0.0, "label_smoothing": 0.0, "epochs": 2, "class_weighting": False}
    study.enqueue_trial(good)
    study.enqueue_trial({**good, "learning_rate": 1e-7})
    study.optimize(objective, n_trials=2)
    states = [t.state for t in study.get_trials()]
    assert states == [TrialState.COMPLETE, TrialState.PRUNED]


def test_a_failing_trial_is_recorded_with_its_reason_and_the_study_goes_on(tmp_path):
    spec, study, objective = _in_process_study(tmp_path)
    spec.space.backbones = ["mobilenet_v3_small", "compact_cnn"]
    spec.space.weights = str(tmp_path / "missing.weights.h5")
    base = {"augment_policy": "none", "optimizer": "adam", "learning_rate": 3e-3, "batch_size": 64,
            "dropout": 0.0, "label_smoothing": 0.0, "epochs": 1, "class_weighting": False}
    study.enqueue_trial({**base, "backbone": "mobilenet_v3_small", "unfreeze_fraction": 0.5,
                         "finetune_lr_factor": 0.1})
    study.enqueue_trial({**base, "backbone": "compact_cnn"})
    study.optimize(objective, n_trials=2, catch=(Exception,))
    failed, complete = study.get_trials()
    assert failed.state == TrialState.FAIL and "missing.weights.h5" in failed.user_attrs["fail_reason"]
    assert complete.state == TrialState.COMPLETE


def test_unreachable_storage_is_one_clear_line(tmp_path):
    spec_path = write_tiny_spec(tmp_path)
    done = run_search("--study", str(spec_path), "--storage", "postgresql://nobody:secret@127.0.0.1:1/none")
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0
    assert "cannot use storage postgresql://nobody:***@127.0.0.1:1/none" in done.stderr
    assert "secret" not in done.stderr


@pytest.mark.slow  # test_interrupt.py's two drivers run a whole study on PostgreSQL in the default run
def test_postgresql_storage_runs_a_study(tmp_path):
    url = require_postgres()
    name = f"pg_{os.getpid()}_{int(time.time())}"
    spec_path = write_tiny_spec(tmp_path, name=name, trials=1)
    done = run_search("--study", str(spec_path), "--storage", url, "--workers", "1")
    assert done.returncode == 0, done.stderr[-3000:]
    study = optuna.load_study(study_name=name, storage=url)
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE]
    optuna.delete_study(study_name=name, storage=url)


@pytest.mark.slow  # the same flow as the PostgreSQL and default SQLite storages, on a journal file
def test_journal_storage_runs_a_study(tmp_path):
    spec_path = write_tiny_spec(tmp_path, name="journal", trials=1)
    journal = tmp_path / "study.journal"
    done = run_search("--study", str(spec_path), "--storage", f"journal:{journal}", "--workers", "1")
    assert done.returncode == 0, done.stderr[-3000:]
    study = optuna.load_study(study_name="journal", storage=open_storage(f"journal:{journal}"))
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE]


@pytest.mark.slow  # over a minute on 2 cores
def test_reseeding_trains_the_best_configurations_again_with_new_seeds(tmp_path):
    spec_path = write_tiny_spec(tmp_path, name="reseed", trials=3, min_epochs=1, max_epochs=2)
    assert run_search("--study", str(spec_path), "--workers", "1").returncode == 0
    originals = load_study(spec_path).get_trials(states=(TrialState.COMPLETE,))
    best_two = [t.number for t in sorted(originals, key=lambda t: (-t.value, t.number))[:2]]
    done = run_search("--study", str(spec_path), "--workers", "1", "--reseed-top", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"copies of trial(s) {best_two} enqueued" in done.stdout
    trials = load_study(spec_path).get_trials()
    copies = [t for t in trials if "reseed_of" in t.user_attrs]
    assert len(trials) == 5 and [t.user_attrs["reseed_of"] for t in copies] == best_two
    for copy in copies:
        original = trials[copy.user_attrs["reseed_of"]]
        assert copy.state == TrialState.COMPLETE and copy.params == original.params
        assert copy.user_attrs["seed"] != original.user_attrs["seed"]
    again = run_search("--study", str(spec_path), "--workers", "1", "--reseed-top", "2")
    assert "none (all already copied)" in again.stdout and len(load_study(spec_path).get_trials()) == 5
    bad = run_search("--study", str(spec_path), "--reseed-top", "0")
    assert bad.returncode == 2 and "invalid reseed_top value 0" in bad.stderr
