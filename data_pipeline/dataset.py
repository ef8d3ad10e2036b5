"""The one in-memory data set object every loader returns and every later stage consumes."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from data_pipeline.classes import class_order
from common.errors import DataError, DataWarning
from common.inference import check_images

SPLIT_NAMES = ("train", "val", "test")


def to_rgb(images: np.ndarray, source: str = "images") -> np.ndarray:
    """Greyscale (N,H,W) or (N,H,W,1) images repeated into 3 channels, with one warning; others unchanged.

    The models and every augmentation take RGB, and a grey image is an RGB image with equal channels, so
    MedMNIST-style greyscale sets are converted rather than refused.
    """
    images = np.asarray(images)
    if images.ndim == 3 and images.shape[-1] == 3:
        raise DataError(f"{source}: shape {images.shape} looks like one RGB image; add a batch axis (images[None])")
    if images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 1):
        warnings.warn(f"{source}: greyscale images {images.shape} converted to RGB", DataWarning, stacklevel=2)
        return np.repeat(images.reshape(*images.shape[:3], 1), 3, axis=-1)
    return images


def encode_labels(labels: Sequence, class_names: Sequence[str] | None = None, source: str = "labels"
                  ) -> tuple[np.ndarray, tuple[str, ...] | None]:
    """Class-name labels as integers and the names in label order (`classes.class_order`, or `class_names`
    when given); numeric labels are returned as they are, with `class_names` (None: named later).

    Raises DataError naming the first label that is empty or not one of `class_names`.
    """
    labels = np.asarray(labels)
    if labels.dtype.kind == "O" and not any(isinstance(v, (str, bytes)) for v in labels.reshape(-1)):
        labels = labels.astype(np.float64)  # numbers in an object array (a list, a pandas column)
    if labels.dtype.kind not in "USO":
        return labels, None if class_names is None else tuple(str(c) for c in class_names)
    text = labels.astype(str).reshape(-1).tolist()
    empty = [i for i, value in enumerate(text) if not value.strip()]
    if empty:
        raise DataError(f"{source}: empty label at index {empty[0]}")
    names = tuple(str(c) for c in class_names) if class_names is not None else tuple(class_order(text))
    position = {name: i for i, name in enumerate(names)}
    unknown = [value for value in text if value not in position]
    if unknown:
        raise DataError(f"{source}: unknown label {unknown[0]!r} (classes: {', '.join(names)})")
    return np.array([position[value] for value in text], dtype=np.int64), names


def validate_images(images: np.ndarray, source: str = "images") -> np.ndarray:
    """Return `images` as a C-contiguous uint8 (N,H,W,3) array, or raise DataError naming the problem
    (the one input rule, `common.inference.check_images`)."""
    return check_images(images, source, DataError)


def validate_labels(labels: np.ndarray, n_images: int, num_classes: int, source: str = "labels") -> np.ndarray:
    """Return labels as int64 (N,), accepting (N,), (N,1) or one-hot (N,C); raise DataError otherwise."""
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    elif labels.ndim == 2 and labels.shape[1] == num_classes and labels.shape[1] > 1:
        row_sums = labels.sum(axis=1)
        if not (np.all((labels == 0) | (labels == 1)) and np.all(row_sums == 1)):
            raise DataError(f"{source}: (N,{num_classes}) labels must be one-hot (one 1 per row)")
        labels = labels.argmax(axis=1)
    elif labels.ndim != 1:
        raise DataError(f"{source}: expected shape (N,), (N,1) or one-hot (N,{num_classes}), got {labels.shape}")
    if len(labels) != n_images:
        raise DataError(f"{source}: {len(labels)} labels for {n_images} images")
    if not np.issubdtype(labels.dtype, np.integer):
        if not np.issubdtype(labels.dtype, np.number) or not np.all(np.equal(np.mod(labels, 1), 0)):
            raise DataError(f"{source}: labels must be integers, got dtype {labels.dtype}")
    labels = labels.astype(np.int64)
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"{source}: label {labels[first]} at index {first} is out of range 0..{num_classes - 1}"
        )
    return labels


def check_seed(seed: int) -> int:
    """`seed` as an int in 0..2**32-1, the range both NumPy generators and scikit-learn's random_state accept.

    >>> check_seed(7)
    7
    >>> check_seed(-1)
    Traceback (most recent call last):
    common.errors.DataError: seed must be an integer in 0..2**32-1, got -1
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise DataError(f"seed must be an integer in 0..2**32-1, got {seed!r}")
    return int(seed)


@dataclass(frozen=True)
class ImageDataset:
    """Images, labels and names kept together and validated once, at construction.

    `splits` maps a split name (train/val/test, or fold names) to integer indices into the arrays, when
    the source defines them (MedMNIST) or after `data_pipeline.splits` has made them.
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    ids: np.ndarray = field(default=None)  # type: ignore[assignment]
    splits: Mapping[str, np.ndarray] = field(default_factory=dict)
    source: str = ""

    def __post_init__(self) -> None:
        where = self.source or "data set"
        images = validate_images(self.images, where)
        class_names = tuple(str(c) for c in self.class_names)
        if len(class_names) < 2:
            raise DataError(f"{where}: need at least 2 classes, got {len(class_names)}")
        labels = validate_labels(self.labels, len(images), len(class_names), where)
        ids = np.arange(len(images)).astype(str) if self.ids is None else np.asarray(self.ids).astype(str)
        if ids.shape != (len(images),):
            raise DataError(f"{where}: {ids.shape[0]} ids for {len(images)} images")
        splits = {name: self._checked_split(name, idx, len(images), where) for name, idx in self.splits.items()}
        object.__setattr__(self, "images", images)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "class_names", class_names)
        object.__setattr__(self, "ids", ids)
        object.__setattr__(self, "splits", splits)

    @staticmethod
    def _checked_split(name: str, indices: np.ndarray, n: int, where: str) -> np.ndarray:
        indices = np.asarray(indices, dtype=np.int64)
        if indices.ndim != 1 or (len(indices) and (indices.min() < 0 or indices.max() >= n)):
            raise DataError(f"{where}: split '{name}' has indices outside 0..{n - 1}")
        return indices

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=self.num_classes)

    def subset(self, indices: np.ndarray, source: str | None = None) -> "ImageDataset":
        """A new data set of the given rows; splits are dropped because their indices no longer apply."""
        indices = np.asarray(indices, dtype=np.int64)
        return ImageDataset(
            self.images[indices], self.labels[indices], self.class_names, self.ids[indices],
            source=source or self.source,
        )

    def split(self, name: str) -> "ImageDataset":
        if name not in self.splits:
            raise DataError(f"{self.source or 'data set'}: no split '{name}' (have {sorted(self.splits)})")
        return self.subset(self.splits[name], source=f"{self.source}[{name}]")

    def with_splits(self, splits: Mapping[str, np.ndarray]) -> "ImageDataset":
        return ImageDataset(self.images, self.labels, self.class_names, self.ids, splits, self.source)

    def check_every_class_present(self) -> None:
        empty = [self.class_names[i] for i, c in enumerate(self.class_counts()) if c == 0]
        if empty:
            raise DataError(f"{self.source or 'data set'}: class {empty[0]!r} has no images")
