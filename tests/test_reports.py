"""Robustness report, trial plots, the study report and the report pages (index.html), on hand-made
predictions, real Optuna studies and real cleaning of planted data."""

from __future__ import annotations

import base64
import io
import json
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from optuna.artifacts import FileSystemArtifactStore, download_artifact, get_all_artifact_meta, upload_artifact
from PIL import Image

from common.errors import DataError
from data_pipeline.corrupt import shifted_copy
from common.metrics import expected_calibration_error
from common.plots import confusion_matrix_png, training_curves_png
from search.reports.study_report import top_trials, write_report
from search.trial.run_trial import ARTIFACT_ATTR_PREFIX
from common.robust_report import ALL, REPORT_FILES, ShiftedRows, robustness_table, write_robustness_report

optuna.logging.set_verbosity(optuna.logging.WARNING)
CLASSES = ["basophil", "eosinophil", "erythroblast", "immature_granulocyte", "lymphocyte", "monocyte",
           "neutrophil", "platelet"]
C = len(CLASSES)


def probs_for(labels: np.ndarray, correct: np.ndarray, confidence: float = 0.8) -> np.ndarray:
    """Probabilities whose argmax is the label where `correct`, the next class elsewhere."""
    predicted = np.where(correct, labels, (labels + 1) % C)
    probs = np.full((len(labels), C), (1 - confidence) / (C - 1))
    probs[np.arange(len(labels)), predicted] = confidence
    return probs


def assert_png(path: Path, min_side: int = 300, max_side: int = 1600) -> None:
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert all(min_side <= side <= max_side for side in image.size), image.size


# family, severity, shifted correct out of 4, clean correct out of 4
CELLS = [("noise", 1, 4, 4), ("noise", 2, 2, 4), ("blur", 1, 3, 4), ("blur", 2, 1, 3)]


def hand_example():
    family = np.repeat([c[0] for c in CELLS], 4)
    severity = np.repeat([c[1] for c in CELLS], 4)
    shifted_correct = np.concatenate([np.arange(4) < c[2] for c in CELLS])
    clean_correct = np.concatenate([np.arange(4) < c[3] for c in CELLS])
    labels = np.arange(16) % C
    return labels, probs_for(labels, clean_correct), probs_for(labels, shifted_correct), family, severity


def test_robustness_table_on_a_hand_made_example():
    labels, clean, shifted, family, severity = hand_example()
    kind = np.where(family == "noise", "gaussian_noise", "defocus_blur")
    table = robustness_table(labels, clean, shifted, family, severity, kind).set_index(["family", "severity"])
    expected = {("noise", 1): (1.0, 1.0), ("noise", 2): (0.5, 1.0), ("blur", 1): (0.75, 1.0),
                ("blur", 2): (0.25, 0.75), ("noise", ALL): (0.75, 1.0), ("blur", ALL): (0.5, 0.875),
                (ALL, 1): (0.875, 1.0), (ALL, 2): (0.375, 0.875), (ALL, ALL): (0.625, 0.9375)}
    assert list(table.index) == list(expected)
    for key, (accuracy, clean_accuracy) in expected.items():
        row = table.loc[key]
        assert row.accuracy == pytest.approx(accuracy)
        assert row.clean_accuracy == pytest.approx(clean_accuracy)
        assert row["drop"] == pytest.approx(clean_accuracy - accuracy)
    assert table.loc[("blur", 2)].n == 4 and table.loc[("noise", ALL)].n == 8 and table.loc[(ALL, ALL)].n == 16
    assert table.loc[("blur", 1)].kinds == "defocus_blur"
    assert table.loc[(ALL, ALL)].ece == pytest.approx(expected_calibration_error(shifted, labels))
    # every prediction at confidence 0.8: the ECE is |accuracy - 0.8|
    assert table.loc[("noise", 2)].ece == pytest.approx(0.3)


def test_robustness_table_rejects_misaligned_arrays():
    labels, clean, shifted, family, severity = hand_example()
    with pytest.raises(DataError, match="one length"):
        robustness_table(labels, clean[:-1], shifted, family, severity)
    with pytest.raises(DataError, match="non-empty"):
        robustness_table(labels[:0], clean[:0], shifted[:0], family[:0], severity[:0])


def test_robustness_report_maps_shifted_rows_to_their_source(tmp_path):
    labels_shifted, clean_shifted, shifted, family, severity = hand_example()
    # 20 clean images; shifted row i was made from clean image source[i] (reversed, with repeats)
    source = 19 - np.arange(16)
    labels = np.zeros(20, dtype=int)
    labels[source] = labels_shifted
    clean_correct = np.ones(20, dtype=bool)
    clean_correct[source] = clean_shifted.argmax(1) == labels_shifted
    clean_correct[:4] = False  # images no shifted row comes from count for clean accuracy only
    rows = ShiftedRows(source=source, family=family, kind=np.full(16, "k"), severity=severity)
    summary = write_robustness_report(tmp_path, labels, probs_for(labels, clean_correct), shifted, rows, CLASSES,
                                      title="hand")
    assert summary.clean_accuracy == pytest.approx(15 / 20)
    assert summary.shifted_accuracy == pytest.approx(0.625)
    assert summary.per_family == pytest.approx({"noise": 0.75, "blur": 0.5})
    assert summary.per_severity == pytest.approx({1: 0.875, 2: 0.375})
    assert summary.table.set_index(["family", "severity"]).loc[(ALL, ALL)].clean_accuracy == pytest.approx(0.9375)
    assert summary.ece_clean == pytest.approx(abs(0.75 - 0.8))
    assert summary.ece_shifted == pytest.approx(abs(0.625 - 0.8))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(REPORT_FILES)
    saved = json.loads((tmp_path / "robustness.json").read_text())
    assert saved["shifted_accuracy"] == pytest.approx(0.625) and saved["per_severity"]["2"] == pytest.approx(0.375)
    assert saved["n_clean"] == 20 and saved["n_shifted"] == 16
    csv = pd.read_csv(tmp_path / "robustness.csv")
    assert len(csv) == len(summary.table) and {"ece", "clean_ece", "drop", "n"} <= set(csv.columns)


def test_robustness_report_accepts_a_shifted_copy(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 28, 28, 3), dtype=np.uint8)
    labels = np.arange(40) % C
    copy = shifted_copy(images, ["acquisition", "artefact"], seed=1)
    clean = probs_for(labels, rng.random(40) < 0.9)
    shifted = probs_for(labels[copy.source], rng.random(len(copy.source)) < 0.6)
    summary = write_robustness_report(tmp_path, labels, clean, shifted, copy, CLASSES)
    assert set(summary.per_family) == {"acquisition", "artefact"}
    assert set(summary.per_severity) == set(copy.severity.tolist())
    assert summary.n_shifted == 80
    assert summary.shifted_accuracy == pytest.approx(np.mean(shifted.argmax(1) == labels[copy.source]))
    for name in ("robustness.png", "confusion_shifted.png"):
        assert_png(tmp_path / name)


def history_frame() -> pd.DataFrame:
    epochs = np.arange(9)
    return pd.DataFrame({"epoch": epochs, "stage": ["head"] * 3 + ["finetune_1"] * 3 + ["finetune_2"] * 3,
                         "loss": 2 * np.exp(-epochs / 3), "accuracy": 1 - 0.8 * np.exp(-epochs / 3),
                         "val_loss": 2.2 * np.exp(-epochs / 4), "val_accuracy": 0.95 - 0.8 * np.exp(-epochs / 4)})


def test_trial_plots_are_valid_pngs(tmp_path):  # their speed is bench material, not a test's
    rng = np.random.default_rng(0)
    labels = rng.integers(0, C, 500)
    probs = probs_for(labels, rng.random(500) < 0.8)
    for name, draw in (("curves.png", lambda p: training_curves_png(history_frame(), p, title="trial 3")),
                       ("confusion.png", lambda p: confusion_matrix_png(labels, probs, CLASSES, p, "trial 3"))):
        draw(tmp_path / name)
        assert_png(tmp_path / name)
    training_curves_png(history_frame().drop(columns="stage"), tmp_path / "one_stage.png")
    assert_png(tmp_path / "one_stage.png")


def predictions_npz(path: Path, rng: np.random.Generator, clean_rate: float, shifted: bool) -> Path:
    labels = np.arange(64) % C
    arrays = {"class_names": np.array(CLASSES), "val_labels": labels,
              "val_view_probs": np.stack([probs_for(labels, rng.random(64) < clean_rate) for _ in range(2)])}
    if shifted:
        rows = ShiftedRows(source=np.tile(np.arange(64), 2), family=np.repeat(["acquisition", "artefact"], 64),
                           kind=np.repeat(["jpeg_compression", "dust"], 64), severity=np.tile(np.arange(64) % 5 + 1, 2))
        arrays.update({f"shifted_{k}": getattr(rows, k) for k in ("source", "family", "kind", "severity")})
        arrays["shifted_view_probs"] = np.stack([probs_for(labels[rows.source], rng.random(128) < 0.5)] * 2)
    np.savez_compressed(path, **arrays)
    return path


def add_trial(study, store, values, scratch: Path, shifted: bool = True, clean_rate: float = 0.9) -> int:
    trial = study.ask({"learning_rate": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)})
    trial.set_user_attr("backbone", "compact_cnn")
    if store is not None:
        folder = scratch / f"trial_{trial.number}"
        folder.mkdir()
        path = predictions_npz(folder / "predictions.npz", np.random.default_rng(trial.number), clean_rate, shifted)
        artifact_id = upload_artifact(artifact_store=store, file_path=str(path), study_or_trial=trial)
        trial.set_user_attr(ARTIFACT_ATTR_PREFIX + "predictions.npz", artifact_id)  # as run_trial records it
    study.tell(trial, values)
    return trial.number


@pytest.fixture()
def sqlite_study(tmp_path):
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'study.db'}")
    for folder in ("artifacts", "scratch"):
        (tmp_path / folder).mkdir()
    return (optuna.create_study(study_name="s", storage=storage, direction="maximize"),
            FileSystemArtifactStore(str(tmp_path / "artifacts")))


def study_artifacts(study, store, target: Path) -> dict[str, bytes]:
    target.mkdir(exist_ok=True)
    files = {}
    for meta in get_all_artifact_meta(study):
        path = target / meta.filename
        download_artifact(artifact_store=store, file_path=str(path), artifact_id=meta.artifact_id)
        files[meta.filename] = path.read_bytes()
    return files


class PageParser(HTMLParser):
    """The section ids, link targets and images (by the link around them) of a page."""

    def __init__(self):
        super().__init__()
        self.sections, self.links, self.images = [], [], {}

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.sections.append(attrs["id"])
        elif tag == "a":
            self.links.append(attrs["href"])
        elif tag == "img":
            self.images[self.links[-1]] = attrs["src"]


def page_images(page: Path, sections: set[str]) -> dict[str, Image.Image]:
    """Parse `page`; check it has `sections`, that it works offline, that every link resolves to a file beside
    it and that every image is an embedded PNG, not blank, identical to the file it links to; return the images
    by file name."""
    parser = PageParser()
    text = page.read_text()
    parser.feed(text)
    assert sections <= set(parser.sections), parser.sections
    assert "http" not in " ".join(parser.links) and "<script" not in text
    assert all((page.parent / link).is_file() for link in parser.links if not link.startswith("#")), parser.links
    images = {}
    for name, source in parser.images.items():
        assert source.startswith("data:image/png;base64,")  # embedded: the page is one self-contained file
        data = base64.b64decode(source.split(",", 1)[1])
        assert data == (page.parent / name).read_bytes()
        images[name] = Image.open(io.BytesIO(data))
        assert images[name].format == "PNG"
        pixels = np.asarray(images[name].convert("L"), dtype=float)
        assert pixels.std() > 5 and len(np.unique(pixels)) > 20, f"{name} is blank"
    return images


def test_study_report_robustness_of_the_best_trial_uploaded_as_study_artifacts(tmp_path, sqlite_study):
    study, store = sqlite_study
    scratch = tmp_path / "scratch"
    numbers = [add_trial(study, store, value, scratch) for value in (0.7, 0.9, 0.8)]
    report = tmp_path / "report"
    table = write_report(study, report, artifact_store=store)
    assert list(table.number) == [numbers[1], numbers[2], numbers[0]]
    assert (report / "optimization_history.html").is_file() and not (report / "pareto_front.csv").exists()
    saved = json.loads((report / "robustness" / "robustness.json").read_text())
    assert saved["title"].startswith(f"trial {numbers[1]},")
    with np.load(predictions_npz(scratch / "again.npz", np.random.default_rng(numbers[1]), 0.9, True)) as arrays:
        expected = write_robustness_report(tmp_path / "direct", arrays["val_labels"], arrays["val_view_probs"].mean(0),
                                           arrays["shifted_view_probs"].mean(0), ShiftedRows.from_arrays(arrays),
                                           CLASSES)
    assert saved["shifted_accuracy"] == pytest.approx(expected.shifted_accuracy)
    assert saved["clean_accuracy"] == pytest.approx(expected.clean_accuracy)
    uploaded = study_artifacts(study, store, tmp_path / "downloaded")
    assert set(uploaded) == {"top_trials.csv", "notes.txt", "index.html", "reliability.png", *REPORT_FILES}
    assert uploaded["index.html"] == (report / "index.html").read_bytes()
    assert uploaded["robustness.csv"] == (report / "robustness" / "robustness.csv").read_bytes()
    assert uploaded["top_trials.csv"] == (report / "top_trials.csv").read_bytes()
    assert "artifact:report/robustness/robustness.png" in study.user_attrs

    add_trial(study, store, 0.95, scratch, shifted=False)  # the new best trial saved no shifted predictions
    write_report(study, report, artifact_store=store)
    uploaded = study_artifacts(study, store, tmp_path / "downloaded_again")
    assert len(get_all_artifact_meta(study)) == len(uploaded)  # rewritten in place, not listed twice
    assert b"saved no shifted_* predictions" in uploaded["notes.txt"]
    assert uploaded["top_trials.csv"] == (report / "top_trials.csv").read_bytes()


def test_study_report_without_an_artifact_store_keeps_the_old_call_working(tmp_path, sqlite_study):
    study, _ = sqlite_study
    for value in (0.5, 0.6):
        add_trial(study, None, value, tmp_path)
    table = write_report(study, tmp_path / "report")
    assert list(table.columns[:2]) == ["number", "value"] and len(table) == 2
    assert "no artifact store" in (tmp_path / "report" / "notes.txt").read_text()
    assert get_all_artifact_meta(study) == []
    page = tmp_path / "report" / "index.html"
    assert page_images(page, {"overview", "samples", "cleaning", "corruptions", "best", "notes"}) == {}
    assert "recorded no spec" in page.read_text()  # a study made by hand: the data sections say why they are empty


def test_without_plotly_the_report_skips_its_interactive_plots_with_one_note(tmp_path, sqlite_study, monkeypatch):
    study, store = sqlite_study
    for value in (0.5, 0.6):
        add_trial(study, store, value, tmp_path / "scratch")
    monkeypatch.setitem(sys.modules, "plotly", None)  # import plotly raises ImportError
    write_report(study, tmp_path / "report", artifact_store=store)
    notes = (tmp_path / "report" / "notes.txt").read_text()
    assert "interactive plots skipped" in notes and "pip install 'cellsearch[plots]'" in notes
    assert [p.name for p in (tmp_path / "report").glob("*.html")] == ["index.html"]
    assert "pip install &#x27;cellsearch[plots]&#x27;" in (tmp_path / "report" / "index.html").read_text()
    assert (tmp_path / "report" / "robustness" / "robustness.png").is_file()  # the rest is written


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_multi_objective_report_holds_the_pareto_front(tmp_path):
    study = optuna.create_study(directions=["maximize", "maximize"])
    study.set_metric_names(["val_accuracy_tta", "val_corrupted_accuracy_tta"])
    store = FileSystemArtifactStore(str(tmp_path))
    points = [(0.9, 0.5), (0.8, 0.7), (0.7, 0.6), (0.85, 0.55), (0.6, 0.4)]  # #2 and #4 are dominated
    numbers = [add_trial(study, store, list(values), tmp_path) for values in points]
    report = tmp_path / "report"
    table = write_report(study, report, artifact_store=store)
    assert list(table.number) == [numbers[i] for i in (0, 3, 1, 2, 4)]
    front = pd.read_csv(report / "pareto_front.csv")
    assert list(front.number) == [numbers[i] for i in (0, 1, 3)]
    assert list(front.columns[:3]) == ["number", "val_accuracy_tta", "val_corrupted_accuracy_tta"]
    assert front.val_corrupted_accuracy_tta.tolist() == pytest.approx([0.5, 0.7, 0.55])
    assert (report / "pareto_front.html").is_file()
    assert_png(report / "pareto_front.png")
    assert not (report / "optimization_history.html").exists()
    assert f"best trial {numbers[0]}" in (report / "notes.txt").read_text()
    assert {"pareto_front.csv", "pareto_front.png", "robustness.png"} <= {m.filename for m in
                                                                          get_all_artifact_meta(study)}
    assert list(top_trials(study, 2).columns[:3]) == ["number", "val_accuracy_tta", "val_corrupted_accuracy_tta"]


def test_grid_rows_choose_the_right_images():
    from data_pipeline.corrupt import CORRUPTIONS, FAMILIES
    from common.image_grids import HELD_OUT, class_sample_rows, confidently_wrong_rows
    from search.reports.study_page import corruption_rows

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8)
    labels = np.arange(40) % C
    rows = class_sample_rows(images, labels, CLASSES, per_class=3)
    assert [label for label, _ in rows] == [f"{name}\n(5)" for name in CLASSES]
    assert all(any((image == images[labels == k]).all(axis=(1, 2, 3)).any() for image, _ in cells)
               for k, (_, cells) in enumerate(rows)) and all(len(cells) == 3 for _, cells in rows)

    rows = corruption_rows(images[0], heldout=("artefact",))
    assert len(rows) == len(CORRUPTIONS) and all(len(cells) == 6 for _, cells in rows)
    assert [label for label, _ in rows if HELD_OUT in label] == [f"artefact ({HELD_OUT})\n{kind}"
                                                                 for kind in FAMILIES["artefact"]]
    assert np.array_equal(rows[0][1][0][0], images[0]) and not np.array_equal(rows[0][1][5][0], images[0])

    probs = probs_for(labels, np.arange(40) >= 5)  # the first 5 wrong, at confidences 0.8 ... 0.95 below
    probs[:5] *= 1 + np.arange(5)[::-1, None] / 100
    rows = confidently_wrong_rows(images, labels, probs / probs.sum(1, keepdims=True), CLASSES, columns=4)
    assert [len(cells) for _, cells in rows] == [4, 1]
    assert np.array_equal(rows[0][1][0][0], images[0]) and np.array_equal(rows[1][1][0][0], images[4])
    assert rows[0][1][0][1].startswith(f"{CLASSES[0]}\nas {CLASSES[1]}\n")
    assert confidently_wrong_rows(images, labels, probs_for(labels, np.ones(40, bool)), CLASSES) == []


def planted_data(path: Path) -> Path:
    """A small MedMNIST-layout subset of the embedded cells with one exact duplicate and one label conflict
    planted in the training split."""
    from data_pipeline.loaders import default_data_path

    rng = np.random.default_rng(1)
    arrays = {}
    with np.load(default_data_path()) as full:
        for split, size in (("train", 160), ("val", 64), ("test", 64)):
            keep = np.sort(rng.choice(len(full[f"{split}_labels"]), size, replace=False))
            arrays.update({f"{split}_{key}": full[f"{split}_{key}"][keep] for key in ("images", "labels", "files")})
    arrays["train_images"][1], arrays["train_labels"][1] = arrays["train_images"][0], arrays["train_labels"][0]
    arrays["train_images"][3] = arrays["train_images"][2]
    arrays["train_labels"][3] = (arrays["train_labels"][2] + 1) % C
    np.savez(path, **arrays)
    return path


def test_study_page_shows_the_data_what_cleaning_removed_and_the_corruptions(tmp_path):
    from search.execution.data_check import load_and_clean
    from search.study.spec import load_spec
    from search_helpers import write_tiny_spec

    data = planted_data(tmp_path / "cells.npz")
    path = write_tiny_spec(tmp_path, name="paged", data=data)
    spec = load_spec(str(path))
    prepared = load_and_clean(spec)  # the real cleaning, as search.run does it before any trial
    report = pd.read_csv(prepared.report_file).query("not kept")
    assert {"exact_duplicate", "label_conflict"} <= set(report.reason)
    location = spec.location
    study = optuna.create_study(study_name="paged", storage=location.storage, direction="maximize")
    study.set_user_attr("spec", json.loads(json.dumps(spec.to_dict())))
    Path(location.artifacts).mkdir()
    store = FileSystemArtifactStore(location.artifacts)
    for value in (0.6, 0.7):
        add_trial(study, store, value, location.folder)
    write_report(study, location.report_dir, artifact_store=store)

    page = location.report_dir / "index.html"
    images = page_images(page, {"overview", "samples", "cleaning", "corruptions", "best", "files", "notes"})
    assert set(images) == {"samples.png", "cleaning.png", "corruptions.png", "reliability.png",
                           "robustness/robustness.png", "robustness/confusion_shifted.png"}
    assert images["samples.png"].height > images["cleaning.png"].height  # 8 classes, 2-3 reasons
    assert images["corruptions.png"].height > 2.5 * images["corruptions.png"].width  # 21 kinds x 6 columns
    text = page.read_text()
    assert f"({len(report)} images" not in text and "label_conflict" in text and "exact_duplicate" in text
    assert "acquisition, artefact (red) are held out" in text
    uploaded = {m.filename for m in get_all_artifact_meta(study)}
    assert {"index.html", "samples.png", "cleaning.png", "corruptions.png", "reliability.png"} <= uploaded


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_without_plotly_a_multi_objective_report_keeps_its_pareto_png(tmp_path, monkeypatch):
    study = optuna.create_study(directions=["maximize", "maximize"])
    store = FileSystemArtifactStore(str(tmp_path))
    for values in ((0.9, 0.5), (0.8, 0.7), (0.7, 0.6)):
        add_trial(study, store, list(values), tmp_path)
    monkeypatch.setitem(sys.modules, "plotly", None)
    write_report(study, tmp_path / "report", artifact_store=store)
    assert_png(tmp_path / "report" / "pareto_front.png")
    assert not (tmp_path / "report" / "pareto_front.html").exists()
    assert "interactive plots skipped" in (tmp_path / "report" / "notes.txt").read_text()
