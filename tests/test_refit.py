"""The final refit and the family rotation that measures it: a refit trial's augmenter draws every family while
it trains (instrumented, as tests/test_augment_robust.py does); a build with the refit ships retrained members;
each family is held out once, trained on all the others, the same folds on every call; the augmenter a fold's
trainer builds never draws the family left out; the rotation table from tiny real trainings."""

import dataclasses
import json
import time
import types

import numpy as np
import pytest

from common.errors import DataError
from data_pipeline.corrupt import FAMILIES
from ensemble.refit import changes_in_refit, family_rotation, rotates, rotation_configs, rotation_table
from search.study.trial_config import TrialConfig
from test_augment_robust import _drawn_families  # the stream through the augmenter, with its family counts

MEMBER = TrialConfig(backbone="compact_cnn", augment_policy="corrupt", augment_strength=0.8, seed=7, epochs=14)


def test_rotation_holds_each_family_out_once_and_trains_on_the_others():
    folds = family_rotation()
    assert tuple(folds) == tuple(FAMILIES)
    for family, train in folds.items():
        assert family not in train and set(train) | {family} == set(FAMILIES)


def test_rotation_gives_the_same_families_on_every_call():
    first = family_rotation()
    assert family_rotation() == first == family_rotation(tuple(reversed(FAMILIES)))
    assert family_rotation(["colour", "noise", "colour"]) == family_rotation(["noise", "colour"]) == {
        "noise": ("colour",), "colour": ("noise",)}


def test_rotation_refuses_an_unknown_family():
    with pytest.raises(DataError, match="unknown corruption family 'fog'"):
        family_rotation(["noise", "fog"])


def test_rotation_configs_differ_from_the_member_only_in_families():
    configs = rotation_configs(MEMBER)
    assert list(configs) == list(FAMILIES)
    for family, config in configs.items():
        assert config.heldout_families == [family]
        assert config.train_families == list(family_rotation()[family])
        assert dataclasses.replace(config, train_families=None, heldout_families=None) == MEMBER
    assert not any(fold.refit for fold in rotation_configs(dataclasses.replace(MEMBER, refit=True)).values())


def test_rotation_refuses_a_policy_that_needs_the_family_left_out():
    with pytest.raises(DataError, match="policy 'light' applies the corruption family 'colour'"):
        rotation_configs(dataclasses.replace(MEMBER, augment_policy="light"))


def test_each_fold_trains_on_every_family_but_the_one_left_out(embedded):
    for family, config in rotation_configs(MEMBER).items():
        usage = _drawn_families(embedded, tuple(config.train_families), batches=12, policy=config.augment_policy)
        assert usage[family] == 0, (family, usage)
        assert all(usage[other] > 0 for other in config.train_families), (family, usage)


@pytest.mark.slow
def test_rotation_table_trains_each_fold_and_scores_the_family_left_out(tmp_path):
    tiny = dataclasses.replace(MEMBER, epochs=1, max_train_images=256, tta_views=1, batch_size=64)
    table = rotation_table(tiny, tmp_path, families=["artefact", "blur"])
    assert list(table.heldout_family) == ["blur", "artefact"]
    assert list(table.train_families) == ["artefact", "blur"]
    for row in table.itertuples():
        config = TrialConfig.from_file(tmp_path / row.heldout_family / "config.json")
        assert config.heldout_families == [row.heldout_family]
        assert 0 < row.heldout_accuracy_tta <= 1 and 0 < row.val_accuracy_tta <= 1
        assert 0 < row.searched_accuracy_tta <= 1 and 0 < row.searched_val_accuracy_tta <= 1
        assert row.gain == pytest.approx(row.heldout_accuracy_tta - row.searched_accuracy_tta)
    assert list(table.searched_trained_on_it) == [True, False]
    assert not TrialConfig.from_file(tmp_path / "searched" / "config.json").refit


def test_a_refit_trial_draws_every_family_while_it_trains(tmp_path, monkeypatch):
    import search.trial.trainer as trainer

    built = []

    def spy(*args, **kwargs):
        built.append(real(*args, **kwargs))
        return built[-1]

    real = trainer.build_augmenter
    monkeypatch.setattr(trainer, "build_augmenter", spy)
    refit = dataclasses.replace(MEMBER, refit=True, epochs=1, max_train_images=256, batch_size=64, tta_views=1)
    trainer.train_trial(refit, tmp_path)
    assert len(built) == 1
    usage = built[0].family_usage
    assert set(usage) == set(FAMILIES) and all(usage[family] > 0 for family in FAMILIES), usage
    assert TrialConfig.from_file(tmp_path / "config.json").refit


def test_only_members_whose_policy_reaches_another_family_are_refit_and_rotated():
    assert changes_in_refit(MEMBER) and rotates(MEMBER)
    for policy in ("light", "stain", "none"):
        member = dataclasses.replace(MEMBER, augment_policy=policy)
        assert not changes_in_refit(member) and not rotates(member)


@pytest.mark.slow
def test_a_study_asking_for_the_refit_ships_members_retrained_on_every_family(tmp_path):
    import json

    import optuna

    import pandas as pd

    from ensemble import build_ensemble
    from ensemble.build import BUILD_ATTR
    from search.execution.driver import REFIT_ATTR
    from search_helpers import run_search, write_tiny_spec

    spec = write_tiny_spec(tmp_path, name="refit", trials=2, train_images=320,
                           extra="\n[robustness]\nrefit = true\n")
    spec.write_text(spec.read_text().replace('augment_policies = ["light", "none"]', 'augment_policies = ["corrupt"]'))
    done = run_search("--study", str(spec))
    assert done.returncode == 0, done.stderr[-3000:]
    ens = build_ensemble("refit", pointer=str(tmp_path / "runs" / "last_study.json"), tta=1, quiet=True, gate=False,
                         progress=False)
    manifest = json.loads((ens.report_.folder / "manifest.json").read_text())
    members = [member["trial"] for member in manifest["members"]]
    assert manifest["refit"] == {"families": list(FAMILIES), "trials": members, "reused": [],
                                 "seconds": pytest.approx(manifest["refit"]["seconds"])}
    study = optuna.load_study(study_name="refit", storage=f"sqlite:///{tmp_path / 'runs' / 'refit' / 'study.db'}")
    assert study.user_attrs[REFIT_ATTR] == manifest["refit"]["seconds"] > 0  # the next timed search keeps it
    assert all(member["config"]["refit"] for member in manifest["members"])
    assert any("retrained on every family" in note for note in ens.report_.notes)
    searched = build_ensemble("refit", pointer=str(tmp_path / "runs" / "last_study.json"), tta=1, quiet=True,
                              gate=False, progress=False, refit=False, out=str(tmp_path / "searched"))
    assert json.loads((searched.report_.folder / "manifest.json").read_text())["refit"] is None
    from data_pipeline.loaders import default_data_path

    with np.load(default_data_path()) as data:
        images = data["test_images"][:64]
    assert not np.allclose(ens.member_proba(images), searched.member_proba(images))
    again = build_ensemble("refit", pointer=str(tmp_path / "runs" / "last_study.json"), tta=1, quiet=True, gate=False,
                           progress=False, out=str(tmp_path / "again"))
    assert json.loads((again.report_.folder / "manifest.json").read_text())["refit"]["reused"] == members
    assert np.allclose(again.member_proba(images), ens.member_proba(images))  # the same refit members, not retrained
    study = optuna.load_study(study_name="refit", storage=f"sqlite:///{tmp_path / 'runs' / 'refit' / 'study.db'}")
    assert study.user_attrs[REFIT_ATTR] == manifest["refit"]["seconds"]  # a reused refit measures nothing
    build_seconds = study.user_attrs[BUILD_ATTR]
    rotated = build_ensemble("refit", pointer=str(tmp_path / "runs" / "last_study.json"), tta=1, quiet=True,
                             gate=False, progress=False, rotation=True, out=str(tmp_path / "rotated"))
    table = pd.read_csv(rotated.report_.folder / "report" / "family_rotation.csv")
    assert sorted(table["heldout_family"]) == sorted(FAMILIES)
    study = optuna.load_study(study_name="refit", storage=f"sqlite:///{tmp_path / 'runs' / 'refit' / 'study.db'}")
    assert study.user_attrs[BUILD_ATTR] == build_seconds  # the rotation's folds are not build time to keep


def _candidate(config: TrialConfig, folder, number: int = 0, val_accuracy: float | None = None):
    """The trial trained into `folder` as a build's candidate; with `val_accuracy`, its searched clean validation
    predictions replaced by ones that score exactly that."""
    from ensemble.candidates import Candidate, saved_fields

    with np.load(folder / "predictions.npz") as saved:
        fields = saved_fields({k: saved[k] for k in saved.files}, [0])
    if val_accuracy is not None:
        labels, classes = fields["val_labels"], len(fields["class_names"])
        right = np.arange(len(labels)) < round(val_accuracy * len(labels))
        fields["val_probs"] = np.eye(classes)[np.where(right, labels, (labels + 1) % classes)]
    return Candidate(number=number, value=None, user_attrs={}, config=config, **fields)


def test_no_refit_starts_once_the_run_has_ended_and_the_members_stay_as_searched(tmp_path):
    from ensemble.refit import refit_members

    member = types.SimpleNamespace(number=4, config=MEMBER, gated=False, name="trial_00004",
                                   user_attrs={})  # a Candidate's fields
    started = time.monotonic()
    refit = refit_members([member], tmp_path, 1, say=lambda line: None, deadline=time.time() - 1.0)
    assert time.monotonic() - started < 5.0
    assert refit.members == [member] and refit.reused == () and refit.unstarted == (4,)
    assert any("trial(s) 4 kept as searched" in note for note in refit.notes)
    assert not (tmp_path / "trial_00004").exists()


def test_no_refit_starts_without_the_time_to_reach_half_its_searched_epochs_and_evaluate(tmp_path):
    from ensemble.refit import refit_members, seconds_worth_starting

    searched = {"epochs_run": 10, "seconds_to_first_epoch": 30.0, "train_seconds": 300.0, "evaluate_estimate_s": 20.0}
    assert seconds_worth_starting(searched) == 30.0 + 4 * 30.0 + 20.0
    assert seconds_worth_starting({}) == 0.0  # a trial that recorded no timings may always start
    member = types.SimpleNamespace(number=4, config=MEMBER, gated=False, name="trial_00004", user_attrs=searched)
    started = time.monotonic()
    refit = refit_members([member], tmp_path, 1, say=lambda line: None, deadline=time.time() + 150.0)
    assert time.monotonic() - started < 5.0
    assert refit.members == [member] and any("trial(s) 4 kept as searched" in note for note in refit.notes)
    assert refit.unstarted == (4,)  # so the build keeps the study's refit reserve rather than this run's 0 s
    assert not (tmp_path / "trial_00004").exists()


def test_a_retraining_the_run_cut_short_ships_only_if_clean_validation_holds(tmp_path):
    from ensemble.refit import _refit_candidate
    from search.train_one import main as train_one

    config = dataclasses.replace(MEMBER, epochs=1000, early_stopping_patience=1000, batch_size=64,
                                 max_train_images=320, tta_views=1, refit=True)  # only the deadline ends it
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    started = time.time()
    assert train_one(["--config", str(tmp_path / "config.json"), "--trial-dir", str(tmp_path / "refit"), "-q",
                      "--deadline", str(started + 20.0)]) == 0
    metrics = json.loads((tmp_path / "refit" / "metrics.json").read_text())
    assert time.time() <= started + 20.0 and metrics["stopped_at_deadline"] and metrics["epochs_run"] < 1000
    assert _refit_candidate(_candidate(MEMBER, tmp_path / "refit", val_accuracy=1.0), tmp_path / "refit", 1) is None
    shipped = _refit_candidate(_candidate(MEMBER, tmp_path / "refit", val_accuracy=0.0), tmp_path / "refit", 1)
    assert shipped.config.refit and shipped.model_file == tmp_path / "refit" / "model.keras"


def test_a_build_within_the_run_refits_by_the_run_end_less_the_last_build():
    import optuna

    from ensemble.build import BUILD_ATTR, FIRST_BUILD_S, refit_deadline
    from search.execution.driver import RUN_ENDS_ATTR

    study = optuna.create_study()
    assert refit_deadline(study) is None  # never timed
    ends_at = time.time() + 600.0
    study.set_user_attr(RUN_ENDS_ATTR, ends_at)
    assert refit_deadline(study) == ends_at - FIRST_BUILD_S
    study.set_user_attr(BUILD_ATTR, 42.0)
    assert refit_deadline(study) == ends_at - 42.0
    study.set_user_attr(RUN_ENDS_ATTR, time.time() - 1.0)
    assert refit_deadline(study) is None  # built after the run's time: the refit is not bounded


def test_the_combiner_is_chosen_and_fitted_on_the_members_as_searched():
    """After a refit that trains one member on the held-out families, its held-out rows are right where the other
    member is confidently wrong, and a weighted vote leaning on it would win there; those rows are no longer
    unseen, so the combiner chosen on the members as searched (a plain vote of two mirror-image members) ships,
    fitted on their rows."""
    from ensemble.build import BuildOptions, _choose_combiner, choose_members
    from ensemble.robust import ValidationRows

    n = 200
    y = np.arange(n) % 2
    rows = ValidationRows.robust(y, source=np.arange(n))
    row = np.arange(n)[:, None]
    right, wrong = np.eye(2)[y] * 0.8 + 0.1, np.eye(2)[1 - y] * 0.998 + 0.001
    first = types.SimpleNamespace(val_probs=right, shifted_probs=np.where(row < 60, wrong, right), gated=False)
    second = types.SimpleNamespace(val_probs=right, shifted_probs=np.where((row >= 60) & (row < 120), wrong, right),
                                   gated=False)
    retrained = types.SimpleNamespace(val_probs=right, shifted_probs=np.eye(2)[y] * 0.98 + 0.01, gated=False)
    options = BuildOptions(method="topk", top=2)

    searched = choose_members(options, [first, second], rows)
    shipped = choose_members(options, [first, second], rows,
                             retrain=lambda members: ([m if m is first else retrained for m in members], {}))
    assert _choose_combiner(options, [first, retrained], rows, None).chosen == "weighted"
    assert searched.choice.chosen == shipped.choice.chosen == "vote"
    identities = lambda members: sorted(map(id, members))  # noqa: E731
    assert identities(shipped.members) == identities([first, retrained])
    assert identities(shipped.searched) == identities([first, second])  # what the build fits the combiner on
