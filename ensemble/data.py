"""The test images behind a trial's saved predictions, for the held-out-family test copy.

Saved predictions carry image ids, so the images are found by id in the data set the trial's config
names (with its resize/crop). Ids that are not unique fall back to re-making the trial's split from its
config (search.trial.data's rule: predefined split, else the study's saved split file, else the same
seeded stratified split). Either way the ids AND labels must match the saved ones exactly, or the
evaluation would silently score other images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from common.errors import EnsembleError
from search.study.trial_config import TrialConfig


def load_split_images(config: TrialConfig, ids: np.ndarray, labels: np.ndarray, split: str = "test") -> np.ndarray:
    """uint8 (N,H,W,3) images of `ids` in that order, checked against `labels`."""
    from common.errors import DataError
    from data_pipeline.loaders import load
    from data_pipeline.splits import ensure_splits

    try:
        dataset = load(config.data, image_size=config.image_size, center_crop=config.center_crop)
    except DataError as exc:
        raise EnsembleError(f"cannot load the {split} images of the study's data: {exc}") from None
    ids = np.asarray(ids).astype(str)
    images = None
    if len(np.unique(dataset.ids)) == len(dataset.ids):
        position = {value: i for i, value in enumerate(dataset.ids)}
        rows = [position.get(value) for value in ids]
        if all(r is not None for r in rows):
            rows = np.asarray(rows)
            images, found_labels = dataset.images[rows], dataset.labels[rows]
    if images is None:
        split_file = Path(config.split_file) if config.split_file and Path(config.split_file).is_file() else None
        part = ensure_splits(dataset, split_file, config.val_fraction, config.test_fraction,
                             config.split_seed).split(split)
        if not np.array_equal(part.ids.astype(str), ids):
            raise EnsembleError(f"cannot rebuild the trial's {split} split from {config.data or 'the embedded data'}"
                                " (ids differ from the saved predictions)")
        images, found_labels = part.images, part.labels
    if not np.array_equal(found_labels, labels):
        raise EnsembleError(f"{split} labels of {config.data or 'the embedded data'} differ from the saved "
                            "predictions' labels: not the data the study was run on")
    return images
