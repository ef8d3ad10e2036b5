"""The ensemble's `index.html` (search.reports.report_page) in its report/ folder: the ensemble against its members
as the shift grows, sample test cells, held-out corruptions as the test copy applied them, the most
confidently wrong test images, a reliability diagram, and the build's tables and files.

`report/robustness.png` is redrawn here with a second panel, every member's accuracy against severity
beside the ensemble's: the one picture that shows what the ensemble buys under shift. The page and every
PNG of report/ are also uploaded to the study's artifact store, named `ensemble_<file>`, so optuna-dashboard
shows the pictures inline and offers the page for download beside the study's own.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from common.metrics import accuracy
from common.image_grids import class_sample_rows, confidently_wrong_rows, image_grid_png, short
from common.plots import reliability_png
from search.reports.report_page import PAGE_NAME, ReportPage
from common.robust_report import ALL, robustness_png

ENSEMBLE = "ensemble"
UPLOAD_PREFIX = "ensemble_"
SAMPLES, HELDOUT, WRONG, RELIABILITY = "samples.png", "heldout_examples.png", "confidently_wrong.png", "reliability.png"


def severity_table(y: np.ndarray, clean: dict[str, np.ndarray], shifted: dict[str, np.ndarray], copy) -> pd.DataFrame:
    """Accuracy per model (columns): the clean test ("clean" row), then the held-out copy at each severity
    over all its families."""
    from ensemble.evaluate import heldout_comparison

    table = heldout_comparison(y, clean, shifted, copy)
    rows = table[(table["family"] == ALL) & (table["severity"] != ALL)].set_index("severity")[list(clean)]
    first = pd.DataFrame({name: [accuracy(probs, y)] for name, probs in clean.items()}, index=["clean"])
    return pd.concat([first, rows]).rename_axis("severity")


def heldout_rows(copy, probs: np.ndarray, labels: np.ndarray, class_names) -> list:
    """One row per held-out family, one image per severity (the first the test copy holds), captioned with
    its kind and the ensemble's verdict ("right", or "as" the class it predicted)."""
    rows = []
    predicted = probs.argmax(axis=1)
    for family in pd.unique(copy.family):
        cells = []
        for severity in sorted(set(copy.severity.tolist())):
            hits = np.flatnonzero((copy.family == family) & (copy.severity == severity))
            i = hits[0]
            verdict = "right" if predicted[i] == labels[i] else f"as {short(class_names[predicted[i]])}"
            cells.append((copy.images[i], f"severity {severity}\n{copy.kind[i]}\n{verdict}"))
        rows.append((f"{family} (held out)", cells))
    return rows


def _member_probs(ens, X: np.ndarray) -> dict[str, np.ndarray]:
    """The ensemble's and each member's probabilities from member probabilities X (N, members, classes)."""
    return {ENSEMBLE: ens.combiner_.predict_proba(X), **{name: X[:, k] for k, name in enumerate(ens.member_names)}}


def _tables(page: ReportPage, report) -> None:
    section = page.section("overview", "Ensemble")
    page.text(section, f"objective {report.objective}; {len(report.members)} member(s). Clean and held-out-family "
                       "test metrics of the ensemble, its best single member and the plain average:")
    page.table(section, report.metrics)
    page.text(section, "Members (validation scores under the objective):")
    page.table(section, report.members.drop(columns=["file"], errors="ignore"))
    page.text(section, "Combiners considered (out-of-fold validation; no test data):")
    page.table(section, report.combiners)
    if report.rotation is not None:
        page.text(section, "Family rotation of the best member: each corruption family left out of training in "
                           "turn and scored on the validation split it corrupts, against the member as searched "
                           "(gain: what training on the other families buys on a family never seen):")
        page.table(section, report.rotation)


def _robustness(page: ReportPage, report, ens, y: np.ndarray, clean: dict, shifted: dict | None, copy) -> None:
    section = page.section("robustness", "Against its members under shift")
    if shifted is None or report.robustness is None:
        page.note(section, "No held-out-family test copy was evaluated (--no-heldout-eval, or no test images).")
        return
    curves = severity_table(y, clean, shifted, copy)
    robustness_png(report.robustness, page.folder / "robustness.png", f"{ENSEMBLE} ({ens.n_members_} members)",
                   compared=curves, highlight=ENSEMBLE)
    page.image(section, "robustness.png", "Left: the ensemble's accuracy by held-out family and severity. Right: the "
                                          "ensemble (black) and each member, clean and at every severity.")
    page.table(section, curves.reset_index())
    if report.heldout is not None:
        page.text(section, "Accuracy on the held-out-family test copy by family and severity:")
        page.table(section, report.heldout)
    image_grid_png(heldout_rows(copy, shifted[ENSEMBLE], y[copy.source], ens.class_names_), page.folder / HELDOUT,
                   "held-out corruptions as the test copy applied them", cell_inches=1.1)
    page.image(section, HELDOUT, "Test images as the held-out families corrupted them, one per severity, with "
                                 "the ensemble's verdict.")


def _reliability(page: ReportPage, y: np.ndarray, clean: dict, shifted: dict | None, copy) -> None:
    section = page.section("calibration", "Reliability")
    sets = {"clean test": (y, clean[ENSEMBLE])}
    if shifted is not None:
        sets["held-out-family copy"] = (y[copy.source], shifted[ENSEMBLE])
    reliability_png(sets, page.folder / RELIABILITY, "ensemble: reliability on test")
    page.image(section, RELIABILITY, "Accuracy against confidence in the bins the ECE is computed on; the diagonal "
                                     "is perfect calibration.")


def _images(page: ReportPage, ens, y: np.ndarray, clean: dict, test: np.ndarray | None) -> None:
    samples = page.section("samples", "Sample test images")
    wrong = page.section("wrong", "Most confidently wrong")
    if test is None:
        for section in (samples, wrong):
            page.note(section, "Skipped: the test images could not be loaded (see the notes).")
        return
    image_grid_png(class_sample_rows(test, y, ens.class_names_), page.folder / SAMPLES,
                   f"test images per class ({len(test)} in all; count per class in brackets)")
    page.image(samples, SAMPLES, "Random test images of each class.")
    rows = confidently_wrong_rows(test, y, clean[ENSEMBLE], ens.class_names_)
    if not rows:
        page.note(wrong, "The ensemble gets every test image right.")
        return
    image_grid_png(rows, page.folder / WRONG, "most confidently wrong test images", cell_inches=1.25)
    page.image(wrong, WRONG, "The wrong test predictions of highest confidence, most confident first: true class, "
                             "predicted class, confidence.")


def write_ensemble_page(report, ens, reference, images: dict, X_test: np.ndarray, title: str = "Ensemble") -> Path:
    """Write `report.folder/report/index.html` and its PNGs for a build's `EnsembleReport` (`report.folder`:
    the artifact folder being written), its classifier, the reference candidate (test labels), the build's
    images (test, heldout, heldout_probs) and the members' test probabilities X_test (N, members, classes)."""
    folder = Path(report.folder) / "report"
    page = ReportPage(folder, title)
    y, copy = np.asarray(reference.test_labels), images.get("heldout")
    clean = _member_probs(ens, X_test)
    shifted = None if copy is None else _member_probs(ens, images["heldout_probs"])
    _tables(page, report)
    _robustness(page, report, ens, y, clean, shifted, copy)
    _images(page, ens, y, clean, images.get("test"))
    _reliability(page, y, clean, shifted, copy)
    section = page.section("files", "All report files")
    page.links(section, sorted(p for p in folder.iterdir() if p.is_file() and p.name != PAGE_NAME))
    section = page.section("notes", "Notes")
    for line in report.notes or ["none"]:
        page.note(section, line)
    return page.write()


def upload_ensemble_page(location, store, folder: Path) -> dict[str, str]:
    """Upload the page and the PNGs of report/ to the study's artifacts (ensemble_*), replacing an earlier
    build's; {name: artifact id}."""
    from ensemble.candidates import open_study
    from search.reports.study_report import upload_report

    return upload_report(open_study(location), store, folder, [folder / PAGE_NAME, *sorted(folder.glob("*.png"))],
                         prefix=UPLOAD_PREFIX)
