"""`--timeout` bounds the run: trials running at the deadline stop at an epoch boundary, are evaluated and
published in time, and the study (report included) ends within 5% of the time given."""

import subprocess
import sys
import time

import numpy as np
import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

from common.errors import ConfigError
from data_pipeline.loaders import DEFAULT_DATA
from search.execution.lifecycle import PUBLISHED_BY
from search.execution.driver import (FIRST_REFIT_SHARE, FIRST_WRAP_UP_S, REFIT_ATTR, RUN_ENDS_ATTR, WRAP_UP_ATTR,
                                     Deadlines, apply_overrides)
from search.execution.worker import DeadlineGuard
from search.study.spec import load_spec
from search.study.trial_config import TrialConfig
from search.trial.trainer import DEADLINE_MARGIN, Deadline, is_complete, train_trial, trials_end_by
from search_helpers import run_search, write_tiny_spec

TINY = dict(backbone="compact_cnn", epochs=40, batch_size=64, learning_rate=3e-3, max_train_images=320,
            augment_policy="none", tta_views=1, seed=0)


def test_the_deadline_rule_counts_the_next_epoch_evaluation_and_publication_with_a_margin():
    deadline = Deadline(at=100.0, overhead_s=5.0)
    latest = 100.0 - 5.0 - (1 + DEADLINE_MARGIN) * (10.0 + 5.0)  # publication; the epoch and evaluation, longer
    assert latest < 100.0 - 5.0 - (10.0 + 5.0)
    assert deadline.leaves_room(epoch_s=10.0, evaluate_s=5.0, now=latest - 0.01)
    assert not deadline.leaves_room(epoch_s=10.0, evaluate_s=5.0, now=latest + 0.1)
    assert deadline.epochs_left(epoch_s=10.0, evaluate_s=5.0, now=latest - 0.01) == 1
    assert deadline.epochs_left(epoch_s=10.0, evaluate_s=5.0, now=latest - 11.1) == 2
    assert not Deadline(at=100.0, overhead_s=25.0).leaves_room(epoch_s=0.0, evaluate_s=0.0, now=80.0)


def test_a_trial_stops_at_an_epoch_boundary_in_time_to_be_evaluated(tmp_path):
    started = time.time()
    endless = {**TINY, "epochs": 1000, "early_stopping_patience": 1000}  # neither ends it before the deadline
    announced = []
    with trials_end_by(Deadline(started + 25.0)):
        result = train_trial(TrialConfig(**endless), tmp_path,
                             trained=lambda seconds: announced.append((time.time(), seconds)))
    assert time.time() <= started + 25.0
    [(trained_at, finishing_s)] = announced  # once, when training ended, with the time planned for the rest
    assert trained_at == pytest.approx(started + result.metrics["train_seconds"], abs=0.5)
    assert finishing_s == pytest.approx((1 + DEADLINE_MARGIN) * result.metrics["evaluate_estimate_s"] + 5.0)
    assert result.metrics["stopped_at_deadline"] is True
    assert 1 <= result.metrics["epochs_run"] < endless["epochs"]
    assert is_complete(tmp_path)
    history = pd.read_csv(tmp_path / "history.csv")
    assert len(history) == result.metrics["epochs_run"]  # whole epochs only
    assert 0 <= result.metrics["best_epoch"] < len(history)


def test_without_a_deadline_nothing_stops_early(tmp_path):
    result = train_trial(TrialConfig(**{**TINY, "epochs": 2}), tmp_path)
    assert result.metrics["stopped_at_deadline"] is False
    assert result.metrics["epochs_run"] == 2


def _timed_objective(trial):
    """A trial that took 6 s to its first epoch and 20 s in all, 16 s of them training; its trainer estimated
    the evaluation at 3 s (as the trainer records them)."""
    for key, value in dict(started_at=time.time() - 20.0, train_seconds=16.0, seconds_to_first_epoch=6.0,
                           evaluate_estimate_s=3.0).items():
        trial.set_user_attr(key, value)
    return 0.5


def test_the_worker_measures_publication_and_starts_no_trial_that_cannot_end_in_time():
    roomy, tight = Deadline(time.time() + 60), Deadline(time.time() + 8)
    for deadline, trials in ((roomy, 3), (tight, 1)):
        study = optuna.create_study()
        study.optimize(_timed_objective, n_trials=3, callbacks=[DeadlineGuard(deadline)])
        assert len(study.trials) == trials  # 6 s to a first epoch and 4 s finishing fit in 60 s, not in 8 s
        assert deadline.overhead_s == pytest.approx(1.0, abs=0.5)  # 4 s after training, 3 s of them estimated


def test_workers_end_before_the_wrap_up_the_last_run_measured():
    study = optuna.create_study()
    assert Deadlines.plan(study, 1000.0, None) is None
    first = Deadlines.plan(study, 1000.0, 100.0)
    assert first.workers == 1100.0 - FIRST_WRAP_UP_S and first.backstop == first.workers + 2.0
    study.set_user_attr(WRAP_UP_ATTR, 7.0)
    assert Deadlines.plan(study, 1000.0, 100.0).workers == 1093.0


def test_the_backstop_waits_for_trained_trials_to_be_published_never_past_the_last_resort():
    study = optuna.create_study()
    deadlines = Deadlines.plan(study, 1000.0, 100.0)
    assert (deadlines.backstop, deadlines.last_resort) == (deadlines.workers + 2.0, deadlines.workers + 5.0)
    assert not deadlines.passed(study, now=deadlines.backstop - 0.1)
    assert deadlines.passed(study, now=deadlines.backstop)  # nothing running
    evaluating, training = study.ask(), study.ask()
    evaluating.set_user_attr(PUBLISHED_BY, deadlines.backstop + 2.0)
    assert deadlines.passed(study, now=deadlines.backstop)  # one trial still trains: stop both
    study.tell(training, 0.5)
    assert not deadlines.passed(study, now=deadlines.backstop + 1.0)  # only a trained one: wait for it
    assert deadlines.passed(study, now=deadlines.backstop + 2.0)
    evaluating.set_user_attr(PUBLISHED_BY, deadlines.last_resort + 10.0)
    assert deadlines.passed(study, now=deadlines.last_resort)  # never past the last resort
    study.tell(evaluating, 0.5)
    assert deadlines.passed(study, now=deadlines.backstop + 0.5)


def test_a_study_that_refits_keeps_time_for_the_refit_the_last_build_measured():
    study = optuna.create_study()
    study.set_user_attr(WRAP_UP_ATTR, 7.0)
    assert Deadlines.plan(study, 1000.0, 100.0, refit=True).workers == 1093.0 - FIRST_REFIT_SHARE * 100.0
    study.set_user_attr(REFIT_ATTR, 12.0)
    assert Deadlines.plan(study, 1000.0, 100.0, refit=True).workers == 1081.0
    study.set_user_attr(REFIT_ATTR, 80.0)  # never more than half the time given
    assert Deadlines.plan(study, 1000.0, 100.0, refit=True).workers == 1043.0


def test_a_timeout_must_be_positive():
    with pytest.raises(ConfigError, match="budget.timeout_s"):
        apply_overrides(load_spec("quick"), timeout=0)


def test_a_timeout_too_short_for_any_trial_starts_none(tmp_path):
    search = run_search("--spec", str(write_tiny_spec(tmp_path)), "--timeout", "1")
    assert search.returncode == 0, search.stdout + search.stderr
    assert "timeout: no time left for a trial: 1 s given" in search.stdout
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'runs' / 'tiny' / 'study.db'}")
    assert study.trials == []
    assert time.time() - 120.0 < study.user_attrs[RUN_ENDS_ATTR] < time.time()  # a build now would not be bounded


def _small_copy(folder) -> str:
    """The embedded cells, a few hundred per split, so that a trial fits in a minute on a busy 2-core CPU."""
    with np.load(DEFAULT_DATA) as full:
        step = {"train": 12, "val": 4, "test": 8}  # the file is sorted by class: every n-th image keeps them all
        arrays = {key: full[key][::step[key.split("_")[0]]] for key in full.files}
    path = folder / "small.npz"
    np.savez(path, **arrays)
    return str(path)


@pytest.mark.slow
@pytest.mark.parametrize("executor", ["local", "ray"])
def test_a_timed_study_ends_within_five_percent_with_its_trials_recorded(tmp_path, executor):
    spec = write_tiny_spec(tmp_path, name="timed", trials=20, min_epochs=40, max_epochs=40, train_images=320)
    spec.write_text(spec.read_text().replace("early_stopping_patience = 3", "early_stopping_patience = 40"))
    started = time.monotonic()
    search = run_search("--spec", str(spec), "--timeout", "60", "--workers", "1", "--data", _small_copy(tmp_path),
                        "--executor", executor)
    wall = time.monotonic() - started
    assert search.returncode == 0, search.stdout + search.stderr
    assert wall <= 63.0, f"{wall:.1f} s for --timeout 60"
    study = optuna.load_study(study_name="timed", storage=f"sqlite:///{tmp_path / 'runs' / 'timed' / 'study.db'}")
    assert {t.state for t in study.trials} <= {TrialState.COMPLETE, TrialState.PRUNED}
    last = study.trials[-1]
    assert last.user_attrs["stopped_at_deadline"] is True  # 40 epochs do not fit: the last one stopped
    assert abs(last.user_attrs[PUBLISHED_BY] - last.datetime_complete.timestamp()) < 15.0  # announced when trained
    build = subprocess.run([sys.executable, "-m", "ensemble.build", "--study", "timed", "--out", str(tmp_path / "runs"),
                            "--tta", "1"], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stdout + build.stderr
