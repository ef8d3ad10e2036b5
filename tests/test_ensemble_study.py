"""Ensembles of a real tiny study (3 compact_cnn trials, 8 TTA views, on a small MedMNIST-layout subset of the
embedded cells): build CLI, combiners, no test leakage, TTA symmetry, reload, tampering, predict CLI, export.

The study is made once per test run (`tiny_study`) and shared with tests/test_ensemble_robust.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from common.errors import EnsembleError
from search_helpers import run_search, small_data, write_tiny_spec

SIZES = {"train": 600, "val": 240, "test": 320}


def tiny_study(tmp_path_factory) -> tuple[Path, Path]:
    """(folder, data): the study `enstiny` under folder/runs, searched by the first test process that asks while
    the others wait (pytest-xdist's processes share the base folder's parent). Only this module builds into it;
    tests/test_ensemble_robust.py builds from a copy."""
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp()
    shared = shared.parent if os.environ.get("PYTEST_XDIST_WORKER") else shared
    folder = shared / "ens_study"
    data = folder / "cells.npz"
    with FileLock(shared / "ens_study.lock"):
        if not (folder / "done").is_file():
            folder.mkdir(exist_ok=True)
            spec = write_tiny_spec(folder, name="enstiny", trials=3, train_images=600, data=small_data(data, SIZES))
            spec.write_text(spec.read_text().replace("tta_views = 1", "tta_views = 8"))
            done = run_search("--study", str(spec))
            assert done.returncode == 0, done.stderr[-3000:]
            (folder / "done").touch()
    return folder, data


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    return tiny_study(tmp_path_factory)


@pytest.fixture(scope="module")
def built(study):
    folder, _ = study
    out = folder / "ens"
    done = subprocess.run([sys.executable, "-m", "ensemble.build", "--top", "3", "--method", "topk",
                           "--combiner", "stacking", "--ensemble", str(out), "--distill", "--distill-epochs", "1"],
                          cwd=folder, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done


@pytest.fixture(scope="module")
def classifier(built):
    from ensemble import load_ensemble

    return load_ensemble(built[0])


@pytest.fixture(scope="module")
def test_split(study):
    with np.load(study[1]) as data:
        return data["test_images"], data["test_labels"][:, 0].astype(np.int64)


@pytest.fixture(scope="module")
def candidates(study, tmp_path_factory):
    from ensemble.candidates import artifact_store, load_candidates, open_study
    from search.study.location import StudyLocation

    folder, _ = study
    location = StudyLocation.find(pointer=folder / "runs" / "last_study.json")
    found, _ = load_candidates(open_study(location), artifact_store(location), tmp_path_factory.mktemp("cache"), 8)
    return found


def test_build_cli_writes_a_complete_artifact_and_one_table(built):
    out, done = built
    manifest = json.loads((out / "manifest.json").read_text())
    assert 1 <= len(manifest["members"]) <= 3
    assert manifest["combiner"]["kind"] == "stacking" and manifest["tta_views"] == 8
    assert manifest["views"] == list(range(8)) and manifest["input_size"] == [28, 28]
    assert len(manifest["class_names"]) == 8 and "preprocessing" in manifest
    assert {"keras", "tensorflow", "scikit-learn", "numpy"} <= set(manifest["versions"])
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(manifest["files"]) == on_disk
    assert {m["file"] for m in manifest["members"]} <= on_disk and "combiner.joblib" in on_disk
    assert {"report/confusion_test.png", "report/confusion_shifted.png", "report/robustness.csv",
            "report/robustness.png", "report/heldout_breakdown.csv"} <= on_disk
    table = pd.read_csv(out / "report" / "metrics.csv")
    assert sorted(set(table["split"])) == ["test", "test_heldout"]
    assert len(table) == 6 and table["model"].str.startswith("ensemble").sum() == 2
    assert {"accuracy", "balanced_accuracy", "macro_f1", "roc_auc_ovr", "ece"} <= set(table.columns)
    assert "best single (trial" in done.stdout and "plain average" in done.stdout
    per_class = pd.read_csv(out / "report" / "per_class.csv")
    assert {"precision", "recall"} <= set(per_class.columns) and len(per_class) == 6 * 8
    combiners = pd.read_csv(out / "report" / "combiners.csv")
    assert list(combiners["kind"]) == ["vote", "weighted", "stacking"]  # all scored, --combiner stacking chosen
    assert combiners["val_oof_shifted_accuracy"].between(0, 1).all()
    assert combiners.loc[combiners["chosen"], "kind"].tolist() == ["stacking"]
    mean = (combiners["val_oof_accuracy"] + combiners["val_oof_shifted_accuracy"]) / 2
    np.testing.assert_allclose(combiners["val_oof_objective_accuracy"], mean)
    assert manifest["objective"] == {"requested": "robust", "used": "robust",
                                     "heldout_families": ["acquisition", "artefact"]}
    assert manifest["adapt_bn"] is False and "held-out-family test copy" in done.stdout
    assert manifest["consistency_max_abs_diff"] < 1e-3  # reloaded members reproduce their saved predictions
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".ens.")]  # no staging left behind
    distilled = pd.read_csv(out / "report" / "distillation.csv")
    assert list(distilled["model"]) == ["ensemble", "student (8 views)", "student (1 view)"]
    assert manifest["student"]["file"] in on_disk


def test_a_failed_rebuild_leaves_the_existing_artifact_untouched(built, study, tmp_path, monkeypatch):
    import ensemble.build as build

    folder, _ = study
    out = tmp_path / "ens"
    shutil.copytree(built[0], out)
    before = (out / "manifest.json").read_bytes()

    def explode(*args, **kwargs):
        raise RuntimeError("member models could not be evaluated")

    monkeypatch.setattr(build, "_evaluate", explode)
    options = build.BuildOptions(pointer=str(folder / "runs" / "last_study.json"), top=2, method="topk",
                                 out=str(out), quiet=True, progress=False)
    with pytest.raises(RuntimeError, match="could not be evaluated"):
        build.build_ensemble(None, options)
    assert (out / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ens"]


@pytest.mark.slow  # 40 s, and its timing comparison needs a quiet machine
def test_build_under_an_inference_budget_takes_only_what_fits(study, candidates, tmp_path):
    from ensemble.budget import measure_candidates
    from ensemble.candidates import artifact_store
    from search.study.location import StudyLocation

    folder, _ = study
    location = StudyLocation.find(pointer=folder / "runs" / "last_study.json")
    lines: list[str] = []
    costs = measure_candidates(candidates, artifact_store(location), tmp_path, 8, "float32", say=lines.append)
    assert len(lines) == 1 and len(set(costs.values())) == 1  # three compact_cnn trials: timed once
    cost = next(iter(costs.values()))
    limit = 0.8 / (cost.shared + 2 * cost.member)  # about two of the three members fit
    out = tmp_path / "fast"
    command = [sys.executable, "-m", "ensemble.build", "--top", "3", "--method", "topk", "--no-heldout-eval",
               "--no-progress", "--ensemble", str(out), "--min-images-per-s"]
    done = subprocess.run(command + [str(limit)], cwd=folder, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    inference, n = manifest["inference"], len(manifest["members"])
    members = inference["member_seconds_per_image"]
    total = inference["shared_seconds_per_image"] + sum(members)
    assert len(members) == n and len(set(members)) == 1  # one architecture, timed once
    assert 1 / total == pytest.approx(inference["estimated_images_per_s"])
    assert inference["estimated_images_per_s"] >= limit and inference["measured_images_per_s"] > 0
    assert n == 3 or 1 / (total + members[0]) < limit  # filled the budget, no further
    assert n < 3 and "did not fit the inference budget" in done.stdout
    assert inference["precision"] == "float32" and inference["min_images_per_s"] == limit

    before = (out / "manifest.json").read_bytes()
    done = subprocess.run(command + ["1e9"], cwd=folder, capture_output=True, text=True, timeout=600)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2 and len(errors) == 1 and "fastest candidate predicts" in errors[0]
    assert (out / "manifest.json").read_bytes() == before


def test_every_combiner_on_real_member_predictions(candidates):
    from ensemble.combiners import make_combiner
    from ensemble.evaluate import score_combiners
    from ensemble.robust import ValidationRows
    from ensemble.selection import greedy_selection

    y_val = candidates[0].val_labels
    selection = greedy_selection([c.val_probs for c in candidates], y_val, max_members=3)
    assert sum(selection.weights) == pytest.approx(1.0)
    X_val = np.stack([c.val_probs for c in candidates], axis=1)
    X_test = np.stack([c.test_probs for c in candidates], axis=1)
    choice = score_combiners(X_val, ValidationRows.clean(y_val))
    assert choice.chosen in ("vote", "weighted", "stacking") and len(choice.table) == 3
    for kind in ("vote", "weighted", "stacking"):
        combiner = make_combiner(kind, calibrate=True).fit(X_val, y_val)
        np.testing.assert_allclose(combiner.predict_proba(X_test).sum(axis=1), 1.0, atol=1e-5)
        if kind != "stacking":
            assert sum(combiner.params()["weights"]) == pytest.approx(1.0)


def test_the_combiner_is_fit_on_validation_rows_only(classifier, candidates):
    """No test data fits anything: the saved stacking combiner saw exactly the clean validation images and
    their held-out-family copies (two families: each validation image twice)."""
    combiner = classifier.combiner_
    assert combiner.n_fit_samples_ == SIZES["val"] * 3 == len(candidates[0].val_ids) + len(candidates[0].shifted_probs)
    assert combiner.meta_learner_.n_features_in_ == classifier.n_members_ * 8


def test_rotation_symmetric_image_gets_the_same_prediction_on_every_view(classifier, test_split):
    from common.inference import dihedral_view

    images = test_split[0][:4]
    symmetric = np.mean([dihedral_view(images, v).astype(np.float64) for v in range(8)], axis=0)
    symmetric = np.rint(symmetric).astype(np.uint8)
    assert all(np.array_equal(dihedral_view(symmetric, v), symmetric) for v in range(8))
    views = classifier.view_member_proba(symmetric)  # (8, 4, M, C)
    np.testing.assert_allclose(views, np.broadcast_to(views[:1], views.shape), atol=1e-5)
    plain = classifier.view_member_proba(images)
    assert np.abs(plain - plain[:1]).max() > 1e-4  # while an ordinary image's views do differ


def test_saved_ensemble_reloads_and_predicts_identically(built, classifier, test_split):
    from ensemble import load_ensemble

    images, labels = test_split
    first = classifier.predict_proba(images)
    again = load_ensemble(built[0]).predict_proba(images)
    np.testing.assert_array_equal(first, again)
    np.testing.assert_allclose(first.sum(axis=1), 1.0, atol=1e-5)
    table = pd.read_csv(built[0] / "report" / "metrics.csv")
    reported = table[(table["split"] == "test") & table["model"].str.startswith("ensemble")]["accuracy"].item()
    assert np.mean(first.argmax(1) == labels) == pytest.approx(reported, abs=2 / len(labels))
    assert list(classifier.classes_) == list(range(8)) and len(classifier.class_names_) == 8
    np.testing.assert_array_equal(classifier.predict(images[:10]), first[:10].argmax(1))
    from ensemble.standalone import usable_precision

    assert classifier.precision_ == "float32"  # what the build saved
    half = load_ensemble(built[0], precision="bfloat16")
    assert half.precision_ == usable_precision("bfloat16")
    # stacking sharpens, so bfloat16 moves ambiguous images most, and the tiny study's barely trained members
    # leave many images ambiguous
    low = half.predict_proba(images)
    assert np.mean(low.argmax(1) == first.argmax(1)) >= 0.95 and np.abs(low - first).mean() < 0.01


@pytest.mark.parametrize("damage, message", [
    ("edit_member", "checksum mismatch"), ("edit_combiner", "checksum mismatch"),
    ("remove_member", "missing file"), ("remove_manifest", "no manifest.json"),
    ("unlist_member", "has no checksum"), ("truncate_manifest", "not valid JSON"),
])
def test_tampered_or_incomplete_artifact_is_refused(built, tmp_path, damage, message):
    from ensemble import load_ensemble

    copy = tmp_path / "ens"
    shutil.copytree(built[0], copy)
    manifest_path = copy / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    member = copy / manifest["members"][0]["file"]
    if damage == "edit_member":
        data = bytearray(member.read_bytes())
        data[len(data) // 2] ^= 0xFF
        member.write_bytes(bytes(data))
    elif damage == "edit_combiner":
        with open(copy / "combiner.joblib", "ab") as handle:
            handle.write(b"\0")
    elif damage == "remove_member":
        member.unlink()
    elif damage == "remove_manifest":
        manifest_path.unlink()
    elif damage == "unlist_member":
        del manifest["files"][manifest["members"][0]["file"]]
        manifest_path.write_text(json.dumps(manifest))
    else:
        manifest_path.write_text(manifest_path.read_text()[:100])
    with pytest.raises(EnsembleError, match=message):
        load_ensemble(copy)


def _predict_cli(args: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the predict CLI in a fresh process and report whether TensorFlow got imported."""
    code = ("import sys\nfrom common.cli_errors import run_cli\nfrom ensemble.predict import main\n"
            "rc = run_cli(main, sys.argv[1:])\nprint('TF-IMPORTED' if 'tensorflow' in sys.modules else 'NO-TF', "
            "file=sys.stderr)\nsys.exit(rc)")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=600, cwd=cwd)


def test_predict_cli_on_an_npz(built, classifier, test_split, tmp_path):
    images, labels = test_split
    npz = tmp_path / "an2dl.npz"
    np.savez(npz, images=images[:50], labels=labels[:50])
    out = tmp_path / "pred.csv"
    done = _predict_cli(["--ensemble", str(built[0]), "--input", str(npz), "--output", str(out)])
    assert done.returncode == 0, done.stderr[-2000:]
    assert "img/s" in done.stderr  # the tqdm progress bar
    frame = pd.read_csv(out)
    assert list(frame.columns[:5]) == ["id", "label", "class_name", "true_label", "true_class"]
    assert len(frame) == 50 and len([c for c in frame.columns if c.startswith("prob_")]) == 8
    np.testing.assert_array_equal(frame["label"], classifier.predict(images[:50]))
    assert (frame["class_name"] == classifier.class_names_[frame["label"]]).all()


def test_predict_folder_flat_folder_and_single_image(built, classifier, test_split, tmp_path, capsys):
    from PIL import Image

    from ensemble.predict import main

    images, labels = test_split
    names = classifier.class_names_
    tree, flat = tmp_path / "tree", tmp_path / "flat"
    for i in range(16):
        (tree / names[labels[i]]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(tree / names[labels[i]] / f"cell_{i:02d}.png")
        flat.mkdir(exist_ok=True)
        Image.fromarray(images[i]).save(flat / f"cell_{i:02d}.png")
    expected = classifier.predict(images[:16])
    for source in (tree, flat):
        out = tmp_path / f"{source.name}.csv"
        assert main(["--ensemble", str(built[0]), "--input", str(source), "--output", str(out), "--no-progress"]) == 0
        frame = pd.read_csv(out)
        order = [int(Path(i).stem.split("_")[1]) for i in frame["id"]]
        np.testing.assert_array_equal(frame["label"], expected[order])
        assert ("true_label" in frame) == (source is tree)
    assert main(["--ensemble", str(built[0]), "--input", str(flat / "cell_03.png"), "--no-progress"]) == 0
    printed = pd.read_csv(__import__("io").StringIO(capsys.readouterr().out))
    assert printed["id"].tolist() == ["cell_03.png"] and printed["label"].item() == expected[3]


def test_predict_rejects_bad_input_before_importing_tensorflow(built, tmp_path):
    four = tmp_path / "four.npz"
    np.savez(four, images=np.zeros((3, 28, 28, 4), np.uint8))
    grey = tmp_path / "grey.npz"
    np.savez(grey, images=np.zeros((3, 28, 28), np.uint8))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    tampered = tmp_path / "tampered"
    shutil.copytree(built[0], tampered)
    (tampered / "combiner.joblib").write_bytes(b"nope")
    cases = [
        (["--ensemble", str(built[0]), "--input", str(four)], "3 colour channels"),
        (["--ensemble", str(built[0]), "--input", str(grey)], "greyscale"),
        (["--ensemble", str(built[0]), "--input", str(tmp_path / "missing.npz")], "input not found"),
        (["--ensemble", str(built[0]), "--input", str(broken)], "unreadable image"),
        (["--ensemble", str(tmp_path / "nothing"), "--input", str(four)], "ensemble folder not found"),
        (["--ensemble", str(tampered), "--input", str(four)], "checksum mismatch"),
    ]
    for args, message in cases:
        done = _predict_cli(args)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2, (args, done.stderr[-1500:])
        assert lines[-1] == "NO-TF", (args, done.stderr[-1500:])
        errors = [line for line in lines if line.startswith("error:")]
        assert len(errors) == 1 and message in errors[0], (args, done.stderr[-1500:])


def test_codabench_export_runs_in_a_fresh_process(built, classifier, test_split, tmp_path):
    from ensemble.export import STANDALONE, export_codabench

    images = test_split[0][:12]
    zipped = export_codabench(built[0], tmp_path / "submission.zip", check=False)
    with zipfile.ZipFile(zipped) as archive:
        names = set(archive.namelist())
        assert archive.read("model.py") == STANDALONE.read_bytes()
    assert {"model.py", "manifest.json", "combiner.joblib"} <= names
    assert any(n.startswith("members/") and n.endswith(".keras") for n in names)
    np.save(tmp_path / "x28.npy", images)
    big = np.random.default_rng(0).integers(0, 256, (3, 96, 96, 3), dtype=np.uint8)
    np.save(tmp_path / "x96.npy", big)
    code = f"""
import json, sys, tempfile, zipfile, numpy as np
folder = tempfile.mkdtemp()
zipfile.ZipFile({str(zipped)!r}).extractall(folder)
sys.path.insert(0, folder)
import model
m = model.Model()
out = {{"x28": m.predict(np.load({str(tmp_path / 'x28.npy')!r})).tolist(),
       "x96": m.predict(np.load({str(tmp_path / 'x96.npy')!r})).tolist(),
       "dtype": str(m.predict(np.load({str(tmp_path / 'x28.npy')!r})).dtype),
       "leaked": sorted(k for k in ("backbones", "ensemble", "search", "data_pipeline") if k in sys.modules)}}
print(json.dumps(out))
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["leaked"] == []
    assert result["dtype"].startswith("int")
    assert result["x28"] == classifier.predict(images).tolist()
    assert result["x96"] == classifier.predict(big).tolist()  # same resize rule in both
