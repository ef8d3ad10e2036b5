"""Robust ensembles of the real tiny study (shared with test_ensemble_study.py): the Python API returns the
fitted classifier with its report, selection and combiner use the trials' held-out-family validation copy,
older studies fall back to clean validation, and test-time BatchNorm adaptation is a switch that never
touches the artifact."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from test_ensemble_study import SIZES, candidates, study, test_split  # noqa: F401  (shared fixtures)


@pytest.fixture(scope="module")
def location(study, tmp_path_factory):  # noqa: F811
    """The study in a copy of its own: test_ensemble_study.py may be building from the original at the same time."""
    from search.study.location import StudyLocation

    runs = tmp_path_factory.mktemp("robust_study") / "runs"
    shutil.copytree(study[0] / "runs", runs)
    return StudyLocation("enstiny", out=str(runs))


@pytest.fixture(scope="module")
def robust(location, tmp_path_factory):
    from ensemble import build_ensemble

    out = tmp_path_factory.mktemp("robust") / "ens"
    return build_ensemble(location, top=2, method="greedy", out=str(out), quiet=True, progress=False), out


def test_build_ensemble_returns_the_fitted_classifier_with_its_report(robust, test_split):  # noqa: F811
    from ensemble import EnsembleClassifier, load_ensemble
    from ensemble.build import EnsembleReport

    ens, out = robust
    images, labels = test_split
    assert isinstance(ens, EnsembleClassifier) and isinstance(ens.report_, EnsembleReport)
    report = ens.report_
    assert report.folder == out and report.objective == "robust" and ens.manifest_["adapt_bn"] is False
    probs = ens.predict_proba(images)  # no reload needed
    np.testing.assert_allclose(load_ensemble(out).predict_proba(images), probs, atol=1e-6)
    assert report.score("test") == pytest.approx(np.mean(probs.argmax(1) == labels), abs=2 / len(labels))
    summary = report.robustness
    assert set(summary.per_family) == {"acquisition", "artefact"} and set(summary.per_severity) == {1, 2, 3, 4, 5}
    assert summary.shifted_accuracy == pytest.approx(report.score("test_heldout"))
    assert summary.ece_shifted == pytest.approx(report.score("test_heldout", "ece"), abs=1e-6)
    assert summary.n_shifted == 2 * SIZES["test"]
    heldout = report.heldout.set_index(["family", "severity"])
    assert heldout.loc[("all", "all"), "n"] == 2 * SIZES["test"]
    assert heldout.filter(like="ensemble").loc[("acquisition", "all")].item() == pytest.approx(
        summary.per_family["acquisition"])
    for name in ("robustness.csv", "robustness.png", "robustness.json", "confusion_shifted.png", "members.csv"):
        assert f"report/{name}" in ens.manifest_["files"]
    assert ens.manifest_["heldout_test"]["seed"] == 1  # robust_seed 0 + 1: not the validation copy's draws
    text = report.summary()
    assert "test_heldout" in text and "acquisition" in text and "ece" in text


def test_selection_and_combiner_use_the_saved_shifted_validation_copy(robust, candidates):  # noqa: F811
    from ensemble.robust import ValidationRows
    from ensemble.selection import greedy_selection

    ens, _ = robust
    reference = candidates[0]
    assert all(c.shares_shifted_copy(reference) for c in candidates)
    rows = ValidationRows.robust(reference.val_labels, reference.shifted.source)
    expected = greedy_selection([rows.stack(c.val_probs, c.shifted_probs) for c in candidates], rows.y, 2,
                                sample_weight=rows.sample_weight)
    assert [m["trial"] for m in ens.manifest_["members"]] == [candidates[i].number for i in expected.indices]
    assert ens.combiner_.n_fit_samples_ == len(rows.y) == 3 * SIZES["val"]  # validation rows only
    members = ens.report_.members
    np.testing.assert_allclose(members["val_objective_accuracy"],
                               (members["val_accuracy"] + members["val_shifted_accuracy"]) / 2)


def test_an_older_study_falls_back_to_clean_validation_with_one_note(study, tmp_path, capsys):  # noqa: F811
    from ensemble import build_ensemble
    from search.study.location import StudyLocation

    runs = tmp_path / "runs"
    shutil.copytree(study[0] / "runs", runs)
    stripped = 0
    for path in (runs / "enstiny" / "artifacts").rglob("*"):
        if path.is_file() and zipfile.is_zipfile(path):
            with np.load(path) as saved:
                arrays = {k: saved[k] for k in saved.files}
            if "shifted_view_probs" in arrays:
                with open(path, "wb") as handle:  # a trial from before the robustness protocol
                    np.savez(handle, **{k: v for k, v in arrays.items() if not k.startswith("shifted_")})
                stripped += 1
    assert stripped == 3
    old = build_ensemble(StudyLocation("enstiny", out=str(runs)), top=2, method="topk", heldout_eval=False,
                         out=str(tmp_path / "ens"), progress=False)
    printed = capsys.readouterr().out
    assert printed.count("objective robust -> clean") == 1
    assert old.report_.objective == "clean" and old.manifest_["objective"]["used"] == "clean"
    assert old.combiner_.n_fit_samples_ == SIZES["val"] and old.report_.robustness is None


def test_the_clean_objective_ignores_the_shifted_copy(location, tmp_path, capsys):
    from ensemble import build_ensemble

    ens = build_ensemble(location, top=1, method="topk", objective="clean", heldout_eval=False,
                         out=str(tmp_path / "ens"), progress=False)
    assert "note" not in capsys.readouterr().out
    assert ens.report_.objective == "clean" and ens.combiner_.n_fit_samples_ == SIZES["val"]


def test_the_seed_of_build_ensemble_reaches_the_cross_validation_folds(location, tmp_path):
    """`seed` (`--seed`) shuffles the folds combiners are scored and calibrated on: the same seed repeats
    every out-of-fold score, another one changes them."""
    from ensemble import build_ensemble

    def scores(seed: int, name: str) -> pd.DataFrame:
        ens = build_ensemble(location, top=2, method="topk", tta=1, heldout_eval=False, seed=seed,
                             out=str(tmp_path / name), quiet=True, progress=False)
        assert ens.manifest_["build_options"]["seed"] == seed
        return ens.report_.combiners.set_index("combiner").filter(like="val_oof")

    first = scores(0, "a")
    pd.testing.assert_frame_equal(scores(0, "b"), first)
    other = scores(1, "c")
    assert not np.allclose(other[["val_oof_log_loss"]], first[["val_oof_log_loss"]], rtol=0, atol=1e-12)


def _shifted_batch(images: np.ndarray) -> np.ndarray:
    from data_pipeline.corrupt import shifted_copy

    copy = shifted_copy(images, ("acquisition",), seed=7)
    return copy.images[copy.severity >= 4]


def test_bn_adaptation_is_a_switch_and_never_touches_the_artifact(robust, test_split, tmp_path):  # noqa: F811
    from ensemble import load_ensemble
    from ensemble.standalone import Model, read_manifest, sha256_file

    _, out = robust
    batch = _shifted_batch(test_split[0])
    files = {p: sha256_file(p) for p in out.rglob("*") if p.is_file()}
    clf = load_ensemble(out)
    assert clf.adapt_bn is False and clf.manifest_["adapt_bn"] is False
    off = clf.predict_proba(batch)
    on = clf.predict_proba(batch, adapt_bn=True)
    assert np.abs(on - off).max() > 1e-3  # adapting to the shifted batch changes the probabilities
    np.testing.assert_array_equal(clf.predict_proba(batch), off)  # and only when switched on
    np.testing.assert_allclose(load_ensemble(out, adapt_bn=True).predict_proba(batch), on, atol=1e-6)
    assert Model(out, adapt_bn=True).predict(batch).tolist() == on.argmax(1).tolist()  # the Codabench entry
    assert Model(out).predict(batch).tolist() == off.argmax(1).tolist()

    npz, csv = tmp_path / "shifted.npz", tmp_path / "pred.csv"
    np.savez(npz, images=batch)
    done = subprocess.run([sys.executable, "-m", "ensemble.predict", "--ensemble", str(out), "--input", str(npz),
                           "--output", str(csv), "--adapt-bn", "--no-progress"], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert pd.read_csv(csv)["label"].tolist() == on.argmax(1).tolist()

    read_manifest(out)  # every sha256 entry still verifies
    assert {p: sha256_file(p) for p in out.rglob("*") if p.is_file()} == files
    assert sorted(Path(p).name for p in files) == sorted(p.name for p in out.rglob("*") if p.is_file())


def test_the_gate_is_offered_by_default_under_the_robust_objective_and_ships_only_what_it_chose(
        location, robust, test_split, tmp_path):  # noqa: F811
    from ensemble import build_ensemble, load_ensemble
    from ensemble.standalone import Model

    ens, _ = robust
    images, _ = test_split
    notes = [n for n in ens.report_.notes if n.startswith("gate:")]
    assert len(notes) == 1  # joined the candidates (how much it votes on), or why not
    log = ens.manifest_["selection"]["log"]
    gated = [name for name in ens.member_names if name.endswith("_gated")]
    if "joins the candidates gated" in notes[0]:
        assert any(line.startswith("gated candidate") for line in log)
        assert bool(gated) == log[-1].endswith(tuple(f"added at weight {w:.2f}" for w in (0.25, 1 / 3, 0.5)))
    assert ("gated_weight" in ens.manifest_["combiner"]) == bool(gated)
    if gated:
        np.testing.assert_allclose(Model(ens.report_.folder).predict_proba(images), ens.predict_proba(images),
                                   atol=1e-5)
    plain = build_ensemble(location, top=2, method="greedy", out=str(tmp_path / "plain"), gate=False, quiet=True,
                           progress=False)
    assert not any(n.startswith("gate:") for n in plain.report_.notes)
    assert not any(name.endswith("_gated") for name in load_ensemble(tmp_path / "plain").member_names)


def test_the_gated_candidate_carries_what_its_saved_model_predicts(candidates, location, tmp_path):  # noqa: F811
    """Built from the specialist's saved predictions and the gate's statistics, without predicting again."""
    from backbones import load_model
    from ensemble.candidates import artifact_store, download
    from ensemble.gate import gated_candidate
    from ensemble.standalone import abstains
    from search.trial.data import load_trial_data
    from search.trial.views import predict_views

    specialist = candidates[0]
    model_file = download(artifact_store(location), specialist, "model.keras", tmp_path / "model.keras")
    gated, _ = gated_candidate(specialist, model_file, tmp_path / "gate")
    model, data = load_model(gated.model_file, compile=False), load_trial_data(specialist.config)
    for images, probs in ((data.val.images, gated.val_probs), (data.val_shifted.images, gated.shifted_probs),
                          (data.test.images, gated.test_probs)):
        np.testing.assert_allclose(probs, predict_views(model, images, 8).mean(axis=0), atol=1e-4)
    assert 0 < abstains(gated.shifted_probs).mean() < 1 and abstains(gated.val_probs).mean() < 0.2
