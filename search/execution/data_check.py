"""Before any worker starts: load and validate the data, clean it, split it, and check the split works.

A bad data set (wrong shapes or dtypes, too few images per class, a missing file) fails here in seconds
with the loader's own message, instead of failing every trial minutes later inside the workers. Cleaning
(`data_pipeline.cleaning`: exact and near duplicates, label conflicts, non-cell outliers) runs once, here;
the ids it removed are saved in the study folder and every trial drops them before splitting, so the
split is made after cleaning and is the same for every trial.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from common.atomic import atomic_write_text
from data_pipeline.cleaning import CleaningConfig, clean, write_report
from common.errors import DataError
from search.study.trial_config import TrialConfig
from search.study.space import fixed_fields
from search.study.spec import StudySpec
from search.trial.data import load_cached, split_dataset

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class PreparedData:
    """What the driver found: the classes, split sizes after cleaning, and the cleaning report (None: off)."""

    sizes: dict[str, int]
    removed: int
    report_file: Path | None
    class_names: tuple[str, ...] = ()

    def describe(self) -> str:
        sizes = ", ".join(f"{name} {n}" for name, n in self.sizes.items())
        cleaned = f"; cleaning removed {self.removed} image(s)" if self.report_file else "; cleaning off"
        names = list(self.class_names[:10]) + (["..."] if len(self.class_names) > 10 else [])
        return f"data: {len(self.class_names)} classes ({', '.join(names)}); {sizes}{cleaned}"


def cleaning_config(spec: StudySpec) -> CleaningConfig:
    settings = spec.cleaning
    return CleaningConfig(near_distance=settings.near_distance if settings.near_distance >= 0 else None,
                          drop_label_conflicts=settings.drop_label_conflicts, outliers=settings.outliers,
                          outlier_z=settings.outlier_z, seed=spec.data.split_seed)


def _clean(spec: StudySpec, config: TrialConfig) -> tuple[int, Path]:
    """Clean once per study: the saved list of removed ids is reused by reruns and by every trial."""
    location = spec.location
    report_file = location.cleaning_dir / "cleaning_report.csv"
    if location.removed_ids_file.is_file() and report_file.is_file():
        return len(json.loads(location.removed_ids_file.read_text())), report_file
    dataset = load_cached(config.data, config.image_size, config.center_crop)
    try:
        cleaned, report = clean(dataset, cleaning_config(spec))
    except DataError as exc:
        raise DataError(f"cleaning {dataset.source or 'the data'}: {exc} (configure it, or switch it off with "
                        f"'cleaning.enabled = false', in the spec)") from None
    removed = sorted(set(dataset.ids.tolist()) - set(cleaned.ids.tolist()))
    write_report(report, report_file)
    atomic_write_text(location.removed_ids_file, json.dumps(removed))
    return len(removed), report_file


def _check_split(dataset, config: TrialConfig) -> dict[str, int]:
    sizes = {}
    for name in SPLITS:
        part = dataset.split(name)
        part.check_every_class_present()
        sizes[name] = len(part)
    if config.max_train_images is not None and config.max_train_images < dataset.num_classes:
        raise DataError(f"data.max_train_images = {config.max_train_images} cannot hold one image of each of "
                        f"the {dataset.num_classes} classes")
    return sizes


def load_and_clean(spec: StudySpec) -> PreparedData:
    """Validate, clean and split the spec's data in this process; raises DataError naming the problem."""
    config = TrialConfig(**fixed_fields(spec))
    if config.data and not Path(config.data).exists():
        raise DataError(f"data path not found: {config.data} (set --data or 'data.path')")
    removed, report_file = _clean(spec, config) if spec.cleaning.enabled else (0, None)
    dataset = split_dataset(config)
    return PreparedData(sizes=_check_split(dataset, config), removed=removed, report_file=report_file,
                        class_names=dataset.class_names)


def upload_cleaning_report(study, artifact_store, prepared: PreparedData) -> None:
    """The cleaning report as a study artifact (once per study), so the dashboard lists it."""
    from optuna.artifacts import upload_artifact

    key = "artifact:cleaning_report.csv"
    if prepared.report_file is None or key in study.user_attrs:
        return
    study.set_user_attr(key, upload_artifact(artifact_store=artifact_store, file_path=str(prepared.report_file),
                                             study_or_trial=study))
    reasons = pd.read_csv(prepared.report_file).query("not kept")["reason"].value_counts()
    study.set_user_attr("cleaning_removed", {str(k): int(v) for k, v in reasons.items()} or {"none": 0})
