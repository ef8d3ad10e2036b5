"""The train/val/test arrays one trial sees, loaded once per process and split identically for every trial.

Besides the splits, a trial gets the held-out-family corrupted copy of its validation split
(`data_pipeline.corrupt.shifted_copy`): seeded by the study, so every trial and every worker scores
exactly the same images, and cached per process, so a worker makes it once.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

from data_pipeline.corrupt import ShiftedCopy, check_families, shifted_copy
from data_pipeline.dataset import ImageDataset
from common.errors import DataError
from data_pipeline.loaders import load
from data_pipeline.splits import ensure_splits
from search.study.trial_config import TrialConfig


@dataclass(frozen=True)
class TrialData:
    train: ImageDataset
    val: ImageDataset
    test: ImageDataset
    val_shifted: ShiftedCopy  # held-out-family corrupted copy of `val`; its labels: `val_shifted_labels`

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.train.class_names

    @property
    def val_shifted_labels(self) -> np.ndarray:
        return self.val.labels[self.val_shifted.source]


@functools.lru_cache(maxsize=4)
def load_cached(data: str | None, image_size: int | None, center_crop: int | None) -> ImageDataset:
    return load(data, image_size=image_size, center_crop=center_crop)


def read_removed_ids(exclude_file: str | None) -> frozenset[str]:
    if not exclude_file:
        return frozenset()
    path = Path(exclude_file)
    if not path.is_file():
        raise DataError(f"cleaning's list of removed images not found: {path} (rerun `search.run`, which "
                        f"writes it before any trial starts)")
    return frozenset(str(i) for i in json.loads(path.read_text()))


def without_removed(dataset: ImageDataset, removed: frozenset[str]) -> ImageDataset:
    """Drop the images cleaning removed, keeping predefined splits re-indexed to the kept rows."""
    if not removed:
        return dataset
    keep = np.flatnonzero(~np.isin(dataset.ids, list(removed)))
    position = np.full(len(dataset), -1)
    position[keep] = np.arange(len(keep))
    splits = {name: position[idx][position[idx] >= 0] for name, idx in dataset.splits.items()}
    return dataset.subset(keep).with_splits(splits)


def _stratified_subsample(dataset: ImageDataset, size: int, seed: int) -> ImageDataset:
    if size >= len(dataset):
        return dataset
    keep, _ = train_test_split(np.arange(len(dataset)), train_size=size, stratify=dataset.labels,
                               random_state=seed)
    return dataset.subset(np.sort(keep))


def split_dataset(config: TrialConfig) -> ImageDataset:
    """The data set a trial of `config` uses: loaded, cleaned as the study decided, and split."""
    dataset = without_removed(load_cached(config.data, config.image_size, config.center_crop),
                              read_removed_ids(config.exclude_file))
    split_file = Path(config.split_file) if config.split_file else None
    return ensure_splits(dataset, split_file, config.val_fraction, config.test_fraction, config.split_seed)


_SHIFTED: dict[tuple, ShiftedCopy] = {}


def _shifted_cached(val: ImageDataset, families: tuple[str, ...], seed: int) -> ShiftedCopy:
    """One copy per validation split (named by its image ids), families and seed, kept for the process."""
    key = (hashlib.sha1("\n".join(val.ids).encode()).hexdigest(), val.image_shape, families, seed)
    if key not in _SHIFTED:
        _SHIFTED.clear()
        _SHIFTED[key] = shifted_copy(val.images, families, seed=seed)
    return _SHIFTED[key]


def load_trial_data(config: TrialConfig) -> TrialData:
    """Load, clean, split (predefined, saved, or made and saved once), optionally subsample the training
    set, and make (or reuse) the held-out-family copy of the validation split."""
    dataset = split_dataset(config)
    train = dataset.split("train")
    if config.max_train_images:
        train = _stratified_subsample(train, config.max_train_images, config.split_seed)
    train.check_every_class_present()
    val = dataset.split("val")
    _, heldout = check_families(config.train_families, config.heldout_families)
    return TrialData(train=train, val=val, test=dataset.split("test"),
                     val_shifted=_shifted_cached(val, tuple(heldout), config.robust_seed))
