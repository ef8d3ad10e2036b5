"""The train/val/test arrays one trial sees, loaded once per process and split identically for every trial."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

from data_pipeline.dataset import ImageDataset
from data_pipeline.loaders import load
from data_pipeline.splits import ensure_splits
from search.config import TrialConfig


@dataclass(frozen=True)
class TrialData:
    train: ImageDataset
    val: ImageDataset
    test: ImageDataset

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.train.class_names


@functools.lru_cache(maxsize=4)
def _load_cached(data: str | None, image_size: int | None, center_crop: int | None) -> ImageDataset:
    return load(data, image_size=image_size, center_crop=center_crop)


def _stratified_subsample(dataset: ImageDataset, size: int, seed: int) -> ImageDataset:
    if size >= len(dataset):
        return dataset
    keep, _ = train_test_split(np.arange(len(dataset)), train_size=size, stratify=dataset.labels,
                               random_state=seed)
    return dataset.subset(np.sort(keep))


def prepare_trial_data(config: TrialConfig) -> TrialData:
    """Load, split (predefined, saved, or made and saved once) and optionally subsample the training set."""
    dataset = _load_cached(config.data, config.image_size, config.center_crop)
    split_file = Path(config.split_file) if config.split_file else None
    dataset = ensure_splits(dataset, split_file, config.val_fraction, config.test_fraction, config.split_seed)
    train = dataset.split("train")
    if config.max_train_images:
        train = _stratified_subsample(train, config.max_train_images, config.split_seed)
    train.check_every_class_present()
    return TrialData(train=train, val=dataset.split("val"), test=dataset.split("test"))
