"""Own data as users have it: the classes come from the data, greyscale is converted, a CSV of files and labels,
in-memory arrays, and a 5-class set of real cells followed through search, ensemble build and predict, by the
Python API and by the commands."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import cellsearch as cs
from common.errors import DataError, DataWarning
from data_pipeline.loaders import from_arrays, load
from search_helpers import run_search, write_tiny_spec

#: Five blood-cell classes under names of the user's own, as labels of a 5-class data set.
KEPT = (0, 1, 4, 6, 7)
NAMES = ("alpha", "beta", "gamma", "delta", "epsilon")
SORTED = tuple(sorted(NAMES))  # names are put in label order alphabetically


def five_classes(embedded, per_class: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Real 28x28 cells of 5 classes, with class-name labels."""
    rows = np.concatenate([np.flatnonzero(embedded.labels == c)[:per_class] for c in KEPT])
    names = np.array(NAMES)[np.searchsorted(KEPT, embedded.labels[rows])]
    return embedded.images[rows], names


def save_pngs(images: np.ndarray, folder: Path, mode: str = "RGB") -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, image in enumerate(images):
        Image.fromarray(image).convert(mode).save(folder / f"{i:03d}.png")
        names.append(f"{folder.name}/{i:03d}.png")
    return names


# ------------------------------------------------------------------------------------ classes from data

def test_a_three_class_npz_has_three_classes(tmp_path, embedded):
    images, labels = embedded.images[:30], np.arange(30) % 3
    np.savez(tmp_path / "ints.npz", images=images, labels=labels)
    np.savez(tmp_path / "named.npz", images=images, labels=labels, class_names=np.array(["x", "y", "z"]))
    np.savez(tmp_path / "strings.npz", images=images, labels=np.array(["red", "blue", "green"])[labels])
    assert load(tmp_path / "ints.npz").class_names == ("class_0", "class_1", "class_2")
    assert load(tmp_path / "named.npz").class_names == ("x", "y", "z")
    strings = load(tmp_path / "strings.npz")
    assert strings.class_names == ("blue", "green", "red")
    assert np.array(strings.class_names)[strings.labels].tolist() == np.array(["red", "blue", "green"])[labels].tolist()


def test_blood_cell_names_keep_the_canonical_label_order(embedded):
    data = from_arrays(embedded.images[:4], ["platelet", "ig", "basophil", "platelet"])
    assert data.class_names == ("basophil", "ig", "platelet") and data.labels.tolist() == [2, 1, 0, 2]


# ------------------------------------------------------------------------------------------- greyscale

def _one_warning(caught) -> str:
    messages = [str(w.message) for w in caught if issubclass(w.category, DataWarning)]
    assert len(messages) == 1, messages
    return messages[0]


@pytest.mark.parametrize("shape", ["nhw", "nhw1"])
def test_greyscale_medmnist_npz_becomes_rgb_with_one_warning(tmp_path, embedded, shape):
    grey = embedded.images[:, :, :, 1]
    grey = grey if shape == "nhw" else grey[..., None]
    arrays = {}
    for split, rows in (("train", slice(0, 40)), ("val", slice(40, 60)), ("test", slice(60, 80))):
        arrays[f"{split}_images"] = grey[rows]
        arrays[f"{split}_labels"] = (np.arange(80)[rows] % 2)[:, None]
    np.savez(tmp_path / "grey.npz", **arrays)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = load(tmp_path / "grey.npz")
    assert "greyscale" in _one_warning(caught)
    assert data.image_shape == (28, 28, 3) and set(data.splits) == {"train", "val", "test"}
    assert np.array_equal(data.images[..., 0], grey[:80].reshape(80, 28, 28))
    assert np.array_equal(data.images[..., 0], data.images[..., 2])


def test_a_folder_of_greyscale_images_becomes_rgb_with_one_warning(tmp_path, embedded):
    for label in (0, 1):
        save_pngs(embedded.images[embedded.labels == label][:5], tmp_path / f"kind_{label}", mode="L")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = load(tmp_path, image_size=20)
    assert "10 of 10 images are greyscale" in _one_warning(caught)
    assert data.image_shape == (20, 20, 3) and data.class_names == ("kind_0", "kind_1")
    assert np.array_equal(data.images[..., 0], data.images[..., 1])


# ------------------------------------------------------------------------------------------ CSV layout

def _csv_layout(tmp_path: Path, embedded, labels) -> Path:
    files = save_pngs(embedded.images[:len(labels)], tmp_path / "images")
    path = tmp_path / "labels.csv"
    pd.DataFrame({"filename": files, "label": labels}).to_csv(path, index=False)
    return path


def test_a_csv_of_file_names_and_labels_is_a_data_set(tmp_path, embedded):
    labels = ["gamma", "alpha", "beta", "alpha", "gamma", "beta"]
    data = load(_csv_layout(tmp_path, embedded, labels), image_size=28)
    assert data.class_names == ("alpha", "beta", "gamma")
    assert np.array(data.class_names)[data.labels].tolist() == labels
    assert data.ids[0] == "images/000.png"
    assert np.array_equal(data.images, embedded.images[:6])  # PNG is lossless, 28 px kept as it is
    resized = load(tmp_path / "labels.csv", image_size=16)
    assert resized.image_shape == (16, 16, 3)


def test_integer_csv_labels_are_class_numbers(tmp_path, embedded):
    data = load(_csv_layout(tmp_path, embedded, [2, 0, 1, 1]))
    assert data.class_names == ("class_0", "class_1", "class_2") and data.labels.tolist() == [2, 0, 1, 1]


@pytest.mark.parametrize(("edit", "message"), [
    (lambda f: f.rename(columns={"filename": "picture"}), "no file-name column .*found picture, label"),
    (lambda f: f.drop(columns="label"), "no label column"),
    (lambda f: f.assign(filename=f["filename"].str.replace("images/", "")), "3 listed file.* not found"),
    (lambda f: f.assign(label=["a", "", "b"]), "empty label at index 1"),
    (lambda f: f.assign(filename=[f["filename"][0]] * 3), "listed twice"),
    (lambda f: f.iloc[:0], "no rows"),
])
def test_a_bad_csv_fails_with_one_line_naming_the_problem(tmp_path, embedded, edit, message):
    path = _csv_layout(tmp_path, embedded, ["a", "b", "a"])
    edit(pd.read_csv(path)).to_csv(path, index=False)
    with pytest.raises(DataError, match=message) as caught:
        load(path)
    assert "\n" not in str(caught.value)


def test_a_bad_csv_fails_before_any_worker(tmp_path, embedded):
    path = _csv_layout(tmp_path, embedded, ["a", "b", "a"])
    pd.read_csv(path).assign(label=["a", "", "b"]).to_csv(path, index=False)
    with pytest.raises(cs.errors.DataError, match="empty label"):
        cs.search(tiny_spec(tmp_path), data=str(path), progress=False)
    assert not (tmp_path / "runs" / "own" / "study.db").exists()


# ------------------------------------------------------------------------------ the spec's data options

def tiny_spec(folder: Path, **data) -> dict:
    return {"name": "own", "out": str(folder / "runs"), "data": data,
            "space": {"backbones": ["compact_cnn"], "augment_policies": ["none"], "optimizers": ["adamw"],
                      "learning_rate": [3e-3, 5e-3], "batch_size": [64], "epochs": [1, 1]},
            "budget": {"trials": 2, "tta_views": 1, "early_stopping_patience": 2},
            "algorithm": {"pruner": "none", "n_startup_trials": 2},
            "storage": {"heartbeat_interval": 2, "grace_period": 6}}


def test_image_size_reaches_every_trial_and_bad_values_are_refused(tmp_path, raw_sample_dir):
    from search.study.trial_config import TrialConfig
    from search.execution.data_check import load_and_clean
    from search.study.space import fixed_fields
    from search.study.spec import spec_from_dict
    from search.trial.data import split_dataset

    spec = spec_from_dict(tiny_spec(tmp_path, path=str(raw_sample_dir), image_size=24, center_crop=200))
    assert load_and_clean(spec).class_names[3] == "immature_granulocyte"
    assert split_dataset(TrialConfig(**fixed_fields(spec))).image_shape == (24, 24, 3)
    tmp_path = tmp_path / "refused"
    with pytest.raises(cs.errors.ConfigError, match="'data.image_size': 0"):
        cs.search(tiny_spec(tmp_path), image_size=0, progress=False)
    with pytest.raises(cs.errors.ConfigError, match="'data.image_size'"):
        spec_from_dict(tiny_spec(tmp_path, image_size="big"))
    assert not (tmp_path / "runs").exists()


def test_arrays_are_written_once_to_the_study_folder(tmp_path, embedded):
    from cellsearch._api import _arrays_path
    from search.study.spec import spec_from_dict

    images, labels = five_classes(embedded, per_class=4)
    spec = spec_from_dict(tiny_spec(tmp_path))
    path = Path(_arrays_path((images, labels), spec))
    assert path == (tmp_path / "runs" / "own" / "data.npz").resolve()
    assert load(path).class_names == SORTED
    stamp = path.stat().st_mtime_ns
    assert _arrays_path((images, labels), spec) == str(path) and path.stat().st_mtime_ns == stamp
    with pytest.raises(DataError, match="was run on other in-memory data"):
        _arrays_path((images[::-1], labels), spec)
    with pytest.raises(DataError, match="expected a path, \\(images, labels\\)"):
        _arrays_path(images, spec)


# ---------------------------------------------------------------------- 5 classes, end to end, by the API

@pytest.fixture(scope="module")
def five(tmp_path_factory, embedded):
    """A search on in-memory arrays of 5 classes (names as labels) and the ensemble of its 2 trials."""
    folder = tmp_path_factory.mktemp("own_api")
    images, labels = five_classes(embedded)
    study = cs.search(tiny_spec(folder), data=(images, labels), workers=1, progress=False)
    ens = cs.build_ensemble(study, top=2, tta=1, progress=False, quiet=True)
    return folder, study, ens


def test_arrays_of_five_classes_make_a_five_class_ensemble(five, embedded):
    folder, study, ens = five
    assert study.optuna_study.user_attrs["spec"]["data"]["path"] == str((folder / "runs/own/data.npz").resolve())
    assert ens.class_names_.tolist() == list(SORTED)
    manifest = json.loads((ens.report_.folder / "manifest.json").read_text())
    assert manifest["class_names"] == list(SORTED)
    images, labels = five_classes(embedded)
    proba = ens.predict_proba(images[::50])
    assert proba.shape == (10, 5) and np.allclose(proba.sum(axis=1), 1, atol=1e-4)
    assert set(ens.class_names_[ens.predict(images[::50])]) <= set(NAMES)


def test_leaderboard_is_a_dataframe_of_the_complete_trials_best_first(five):
    _, study, _ = five
    board = study.leaderboard()
    assert isinstance(board, pd.DataFrame) and board.index.name == "number"
    assert sorted(board.index) == [0, 1] and board["value"].is_monotonic_decreasing
    assert {"backbone", "val_accuracy_tta"} <= set(board.columns)
    assert len(study.leaderboard(top=1)) == 1
    html = study._repr_html_()
    assert "<table" in html and "own" in html and "2 complete" in html


def test_evaluate_returns_the_metrics_of_the_ensemble_and_its_members(five, embedded):
    _, _, ens = five
    images, labels = five_classes(embedded)
    table = ens.evaluate(images[::5], labels[::5])
    assert list(table.index) == ["ensemble", *ens.member_names]
    assert {"accuracy", "balanced_accuracy", "log_loss", "ece"} <= set(table.columns)
    assert 0.3 < table.loc["ensemble", "accuracy"] <= 1 and (table["log_loss"] > 0).all()
    as_ints = ens.evaluate(images[::5], np.searchsorted(SORTED, labels[::5]))
    assert np.allclose(as_ints.to_numpy(), table.to_numpy())
    with pytest.raises(DataError, match="unknown label 'zeta'"):
        ens.evaluate(images[:2], ["alpha", "zeta"])
    assert "gamma" in ens._repr_html_() and "<table" in ens._repr_html_()


def test_predict_takes_paths_a_folder_and_pil_images(five, embedded, tmp_path):
    _, _, ens = five
    images, _ = five_classes(embedded)
    images = images[::50]
    files = [tmp_path / name for name in save_pngs(images, tmp_path / "cells")]
    expected = ens.predict_proba(images)
    assert np.allclose(ens.predict_proba(tmp_path / "cells"), expected, atol=1e-5)
    assert np.allclose(ens.predict_proba([str(f) for f in files]), expected, atol=1e-5)
    assert np.allclose(ens.predict_proba([Image.open(f) for f in files]), expected, atol=1e-5)
    assert np.allclose(ens.predict_proba(Image.open(files[0])), expected[:1], atol=1e-5)
    grey = np.asarray(Image.fromarray(images[0]).convert("L"))[None]
    with pytest.warns(DataWarning, match="greyscale"):
        assert ens.predict_proba(grey).shape == (1, 5)


def test_export_codabench_from_the_ensemble_object(five, tmp_path):
    _, _, ens = five
    out = cs.export_codabench(ens, tmp_path / "submission.zip", check=False)
    with zipfile.ZipFile(out) as archive:
        assert "model.py" in archive.namelist()
        assert json.loads(archive.read("manifest.json"))["class_names"] == list(SORTED)


def test_build_ensemble_keywords_are_the_build_options():
    import dataclasses
    import inspect

    from ensemble.build import BuildOptions

    parameters = dict(list(inspect.signature(cs.build_ensemble).parameters.items())[1:])
    assert all(p.kind == inspect.Parameter.KEYWORD_ONLY for p in parameters.values())
    assert {name: p.default for name, p in parameters.items()} == {
        f.name: f.default for f in dataclasses.fields(BuildOptions)}


# ----------------------------------------------------------------------- 5 classes, end to end, by the CLI

@pytest.mark.slow  # the same flow through the Python API runs by default
def test_five_classes_by_the_commands(tmp_path, embedded):
    images, labels = five_classes(embedded)
    data = tmp_path / "five.npz"
    order = np.searchsorted(SORTED, labels)
    np.savez(data, images=images, labels=order, class_names=np.array(SORTED))
    spec = write_tiny_spec(tmp_path, name="five", trials=2, max_epochs=1)
    done = run_search("--study", str(spec), "--data", str(data), "--workers", "1")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "5 classes (alpha, beta, delta, epsilon, gamma)" in done.stdout
    built = subprocess.run([sys.executable, "-m", "ensemble.build", "--top", "2", "--no-progress"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    ensemble = tmp_path / "runs" / "five" / "ensemble"
    manifest = json.loads((ensemble / "manifest.json").read_text())
    assert manifest["class_names"] == list(SORTED) and manifest["tta_views"] == 1  # the study's own views
    np.savez(tmp_path / "new.npz", images=images[::25], labels=order[::25])
    predicted = subprocess.run([sys.executable, "-m", "ensemble.predict", "--ensemble", str(ensemble), "--input",
                                str(tmp_path / "new.npz"), "--output", str(tmp_path / "p.csv"), "--no-progress"],
                               capture_output=True, text=True, timeout=300)
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    frame = pd.read_csv(tmp_path / "p.csv")
    assert len(frame) == 20 and set(frame["class_name"]) <= set(NAMES)
    assert [c for c in frame.columns if c.startswith("prob_")] == [f"prob_{n}" for n in SORTED]


def test_predict_crops_raw_jpegs_like_the_training_data(raw_sample_dir):
    """Raw PBC JPEGs need the centre crop the embedded set was made with (200 px, then resized): `--center-crop`
    overrides the ensemble's own crop, and the images read are those `load_folder` makes with that crop."""
    from data_pipeline.loaders import load_folder
    from ensemble.predict import read_inputs

    manifest = {"input_size": [28, 28], "class_names": list(load_folder(raw_sample_dir, 28).class_names),
                "data": {"center_crop": None}}
    plain, cropped = read_inputs(raw_sample_dir, manifest), read_inputs(raw_sample_dir, manifest, 200)
    expected = load_folder(raw_sample_dir, image_size=28, center_crop=200)
    assert np.array_equal(np.sort(cropped.labels), np.sort(expected.labels))
    assert np.abs(cropped.images.astype(int) - plain.images.astype(int)).mean() > 5  # the cell fills the frame
    manifest["data"]["center_crop"] = 200
    assert np.array_equal(read_inputs(raw_sample_dir, manifest).images, cropped.images)
