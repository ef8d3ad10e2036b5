"""The study's `index.html` (search.reports.report_page): what the data looks like, what cleaning removed, what the
corruption families do, how the best trial holds up under shift and how well its confidence is calibrated,
and links to every other report file.

The data sections re-load the study's data from the spec it recorded (`spec` user attribute), exactly as a
trial does; when that fails (data moved, a study made by hand) the page says why and keeps the rest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import optuna
import pandas as pd

from common.errors import CellsearchError, ConfigError
from common.image_grids import HELD_OUT, Row, class_sample_rows, cleaning_rows, image_grid_png
from common.plots import reliability_png
from search.reports.report_page import ReportPage, Section

SAMPLES, CLEANING, CORRUPTIONS, RELIABILITY = "samples.png", "cleaning.png", "corruptions.png", "reliability.png"


def _overview(page: ReportPage, study: optuna.Study, table: pd.DataFrame) -> None:
    section = page.section("overview", "Trials")
    counts = pd.Series([t.state.name.lower() for t in study.get_trials(deepcopy=False)]).value_counts()
    states = ", ".join(f"{n} {state}" for state, n in counts.items()) or "no trials"
    objective = study.user_attrs.get("spec", {}).get("algorithm", {}).get("objective", "?")
    page.text(section, f"objective {objective}; {states}. The best trials:")
    page.table(section, table)


def study_data(study: optuna.Study):
    """(spec, the checked config every trial shares, the split data set as trials see it)."""
    from search.study.trial_config import TrialConfig
    from search.study.space import fixed_fields
    from search.study.spec import spec_from_dict
    from search.trial.data import split_dataset

    if "spec" not in study.user_attrs:
        raise ConfigError("the study recorded no spec (not made by search.run)")
    spec = spec_from_dict(study.user_attrs["spec"], origin=f"study {study.study_name!r}")
    config = TrialConfig(**fixed_fields(spec))
    return spec, config, split_dataset(config)


def _samples(page: ReportPage, section: Section, train) -> None:
    image_grid_png(class_sample_rows(train.images, train.labels, train.class_names), page.folder / SAMPLES,
                   f"training images per class ({len(train)} in all; count per class in brackets)")
    page.image(section, SAMPLES, "Random training images of each class.")


def _cleaning(page: ReportPage, section: Section, spec, config) -> None:
    from search.trial.data import load_cached

    report_file = spec.location.cleaning_dir / "cleaning_report.csv"
    if not spec.cleaning.enabled:
        page.note(section, "Cleaning was off for this study (cleaning.enabled = false): nothing was removed.")
        return
    if not report_file.is_file():
        page.note(section, f"No cleaning report at {report_file}.")
        return
    report = pd.read_csv(report_file, dtype={"id": str})
    removed = report[~report["kept"].astype(bool)]
    if removed.empty:
        page.note(section, "Cleaning removed nothing: no duplicates, label conflicts or outliers were found.")
        return
    raw = load_cached(config.data, config.image_size, config.center_crop)
    position = {value: i for i, value in enumerate(raw.ids)}
    images = {i: raw.images[position[i]] for i in removed["id"] if i in position}
    counts = ", ".join(f"{n} {reason}" for reason, n in removed["reason"].value_counts().items())
    image_grid_png(cleaning_rows(report, images, raw.class_names), page.folder / CLEANING,
                   f"removed by cleaning: {counts}", cell_inches=1.1)
    page.image(section, CLEANING, f"Images cleaning removed ({counts}), by reason, with label and id; all of them "
                                  "are listed in the cleaning report.")


def _corruptions(page: ReportPage, section: Section, config, train) -> None:
    from data_pipeline.corrupt import check_families

    trained, heldout = check_families(config.train_families, config.heldout_families)
    image = train.images[np.random.default_rng(config.robust_seed).integers(len(train))]
    image_grid_png(corruption_rows(image, heldout, seed=config.robust_seed), page.folder / CORRUPTIONS,
                   "every corruption kind at severities 1-5 (red: held out from training)")
    page.image(section, CORRUPTIONS, f"One training image under every corruption. Training draws from "
                                     f"{', '.join(trained) or 'no family'}; {', '.join(heldout)} (red) are held "
                                     "out and measure shift the model never saw.")


def _data_sections(page: ReportPage, study: optuna.Study) -> None:
    samples = page.section("samples", "Sample images")
    cleaning = page.section("cleaning", "What cleaning removed")
    corruptions = page.section("corruptions", "Corruptions")
    try:
        spec, config, dataset = study_data(study)
    except (CellsearchError, KeyError, OSError, ValueError) as exc:  # a report after hours of search must not fail
        for section in (samples, cleaning, corruptions):
            page.note(section, f"Skipped: the study's data could not be loaded ({exc}).")
        return
    train = dataset.split("train")
    _samples(page, samples, train)
    _cleaning(page, cleaning, spec, config)
    _corruptions(page, corruptions, config, train)


def _best_trial(page: ReportPage, arrays: dict | None, robustness: list[Path], note: str) -> None:
    section = page.section("best", "Best trial under shift")
    page.text(section, note)
    captions = {"robustness.png": "Accuracy on the held-out-family validation copy by family and severity; "
                                  "dashed: clean accuracy of the same images.",
                "confusion_shifted.png": "Confusion matrix on the held-out-family validation copy."}
    for path in robustness:
        if path.name in captions:
            page.image(section, path.relative_to(page.folder).as_posix(), captions[path.name])
    if arrays is None:
        return
    sets = {"clean validation": (arrays["val_labels"], arrays["val_view_probs"].mean(axis=0))}
    if "shifted_view_probs" in arrays:
        sets["held-out-family copy"] = (arrays["val_labels"][arrays["shifted_source"]],
                                        arrays["shifted_view_probs"].mean(axis=0))
    reliability_png(sets, page.folder / RELIABILITY, "best trial: reliability on validation")
    page.image(section, RELIABILITY, "Reliability diagram: accuracy against confidence in the bins the ECE is "
                                     "computed on; the diagonal is perfect calibration.")


def write_study_page(study: optuna.Study, folder: Path, table: pd.DataFrame, files: list[Path], notes: list[str],
                     best: tuple[dict | None, list[Path], str]) -> list[Path]:
    """Write `folder/index.html` and the PNGs it adds to `files`; return those (page last). `best` is (the best
    trial's saved prediction arrays or None, its robustness files, the note about it)."""
    page = ReportPage(folder, f"Study {study.study_name}")
    _overview(page, study, table)
    _data_sections(page, study)
    _best_trial(page, *best)
    section = page.section("files", "All report files")
    page.links(section, [f for f in files if f.is_file()])
    section = page.section("notes", "Notes")
    for line in notes:
        page.note(section, line)
    return [*(path for path in page.images if path not in files), page.write()]


def corruption_rows(image: np.ndarray, heldout: Sequence[str] = (), seed: int = 0) -> list[Row]:
    """One row per corruption kind, labelled with its family (and HELD_OUT for the `heldout` families): the
    clean image, then severities 1..5, captioned on the first row."""
    from data_pipeline.corrupt import CORRUPTIONS, SEVERITIES, corrupt, family_of  # CORRUPTIONS here is a file name

    rows = []
    for kind in CORRUPTIONS:
        family = family_of(kind)
        images = [image] + [corrupt(image[None], kind, s, seed)[0] for s in SEVERITIES]
        captions = ["clean", *(f"severity {s}" for s in SEVERITIES)] if not rows else [""] * len(images)
        label = f"{family} ({HELD_OUT})" if family in heldout else family
        rows.append((f"{label}\n{kind}", list(zip(images, captions))))
    return rows
