"""Deterministic stratified splits, saved with a study so every trial of it trains and scores on the same rows.

A split is saved rather than re-derived from its seed in each trial because re-deriving is only repeatable
while scikit-learn's shuffling and the row order of the data stay the same; a file that carries a
fingerprint of the data is immune to both, and refuses loudly when the data under it has changed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from sklearn.model_selection import StratifiedKFold, train_test_split

from data_pipeline.dataset import SPLIT_NAMES, ImageDataset, check_seed
from common.errors import DataError

SPLIT_FILE_FORMAT = "cellsearch-splits/1"


def _check_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) == 0:
        raise DataError(f"labels: expected a non-empty 1-D array of class indices, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"labels: expected integer class indices, got dtype {labels.dtype}")
    return labels.astype(np.int64)


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not 0 <= value < 1:
            raise DataError(f"{name} must be a number in [0, 1), got {value!r}")
    if val_fraction + test_fraction >= 1:
        raise DataError(f"val_fraction + test_fraction must be < 1 to leave rows for training, "
                        f"got {val_fraction} + {test_fraction}")


def _check_class_sizes(labels: np.ndarray, needed: int, purpose: str) -> None:
    classes, counts = np.unique(labels, return_counts=True)
    small = np.flatnonzero(counts < needed)
    if small.size:
        i = small[0]
        raise DataError(f"class {classes[i]} has {counts[i]} rows; {purpose} needs at least {needed} per class")


def _rows_needed_per_class(fractions: list[float]) -> int:
    """Rows a class needs so that its expected share of the smallest split is at least one row."""
    smallest = min(f for f in fractions if f > 0)
    return max(len(fractions), math.ceil(1 / smallest - 1e-9))


def _split_off(rows: np.ndarray, labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if fraction == 0:
        return rows, rows[:0]
    try:
        kept, taken = train_test_split(rows, test_size=fraction, stratify=labels, random_state=seed, shuffle=True)
    except ValueError as exc:
        raise DataError(f"cannot make a stratified split: {exc}") from None
    return kept, taken


def stratified_split(labels: np.ndarray, val_fraction: float = 0.1, test_fraction: float = 0.2,
                     seed: int = 0) -> dict[str, np.ndarray]:
    """Split row indices into train/val/test with each class in the same proportion in every split.

    Returns sorted, disjoint int64 index arrays covering every row. A zero fraction gives an empty split.
    """
    labels = _check_labels(labels)
    _check_fractions(val_fraction, test_fraction)
    seed = check_seed(seed)
    fractions = {"train": 1 - val_fraction - test_fraction, "val": val_fraction, "test": test_fraction}
    needed = _rows_needed_per_class([f for f in fractions.values() if f > 0])
    shares = "/".join(f"{f:.0%}" for f in fractions.values())
    _check_class_sizes(labels, needed, f"a stratified {shares} train/val/test split")

    rows = np.arange(len(labels), dtype=np.int64)
    rest, test = _split_off(rows, labels, test_fraction, seed)
    train, val = _split_off(rest, labels[rest], val_fraction / (1 - test_fraction), seed)
    splits = {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}
    _check_every_class_in_every_split(labels, splits)
    return splits


def _check_every_class_in_every_split(labels: np.ndarray, splits: Mapping[str, np.ndarray]) -> None:
    """Rounding can still starve a class that barely meets the size check; refuse rather than train blind."""
    classes = np.unique(labels)
    for name, idx in splits.items():
        if len(idx) == 0:
            continue
        missing = np.setdiff1d(classes, labels[idx])
        if missing.size:
            raise DataError(f"stratified split left class {missing[0]} out of '{name}'; "
                            f"it has too few rows for the requested fractions")


def kfold_splits(labels: np.ndarray, k: int = 5, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Stratified k-fold: k dicts of sorted 'train'/'val' indices; every row is in exactly one 'val'.

    To cross-validate inside a held-out split, pass `labels[rows]` and map the result back with `rows[idx]`.
    """
    labels = _check_labels(labels)
    seed = check_seed(seed)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 2:
        raise DataError(f"k must be an integer >= 2, got {k!r}")
    _check_class_sizes(labels, int(k), f"stratified {k}-fold")
    folds = StratifiedKFold(n_splits=int(k), shuffle=True, random_state=seed)
    return [{"train": np.sort(train).astype(np.int64), "val": np.sort(val).astype(np.int64)}
            for train, val in folds.split(np.zeros(len(labels)), labels)]


def dataset_fingerprint(dataset: ImageDataset) -> str:
    """A short hash of what decides which row is which: row count, image shape, labels and ids.

    Pixels are left out on purpose: hashing 13k images each trial costs time and a re-encode of the same
    images should not invalidate a study's split. Data without ids is only guarded by its labels.
    """
    digest = hashlib.sha256()
    digest.update(f"{SPLIT_FILE_FORMAT}|{len(dataset)}|{dataset.image_shape}|".encode())
    digest.update(np.ascontiguousarray(dataset.labels, dtype="<i8").tobytes())
    digest.update("\0".join(dataset.ids.tolist()).encode("utf-8"))
    return digest.hexdigest()[:16]


def save_splits(path: str | os.PathLike, splits: Mapping[str, np.ndarray], dataset_fingerprint: str,
                params: Mapping[str, Any] | None = None) -> Path:
    """Write splits as JSON atomically, so a trial starting mid-write never reads half a file.

    `params` (fractions, seed, ...) are stored for the record and compared by `ensure_splits`.
    """
    path = Path(path)
    record = {
        "format": SPLIT_FILE_FORMAT,
        "fingerprint": str(dataset_fingerprint),
        "params": dict(params or {}),
        "splits": {str(name): _index_list(name, idx) for name, idx in splits.items()},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(record, handle, separators=(",", ":"))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _index_list(name: str, indices: np.ndarray) -> list[int]:
    indices = np.asarray(indices)
    if indices.ndim != 1 or (indices.size and not np.issubdtype(indices.dtype, np.integer)):
        raise DataError(f"split '{name}': expected a 1-D integer index array, got {indices.dtype} {indices.shape}")
    return indices.astype(np.int64).tolist()


def _read_split_file(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"split file not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not a readable split file ({exc})") from None
    if not isinstance(record, dict) or record.get("format") != SPLIT_FILE_FORMAT:
        raise DataError(f"{path}: not a {SPLIT_FILE_FORMAT} split file")
    if not isinstance(record.get("splits"), dict) or not isinstance(record.get("fingerprint"), str):
        raise DataError(f"{path}: split file lacks 'splits' or 'fingerprint'")
    return record


def _splits_from_record(record: Mapping[str, Any], path: Path) -> dict[str, np.ndarray]:
    splits = {}
    for name, values in record["splits"].items():
        if not isinstance(values, list) or not all(isinstance(v, int) and v >= 0 for v in values):
            raise DataError(f"{path}: split '{name}' is not a list of non-negative row indices")
        splits[name] = np.asarray(values, dtype=np.int64)
    return splits


def _read_checked(path: Path, expected_fingerprint: str) -> dict[str, Any]:
    record = _read_split_file(path)
    if record["fingerprint"] != expected_fingerprint:
        raise DataError(f"{path}: split file was made for other data (fingerprint {record['fingerprint']}, "
                        f"data has {expected_fingerprint}); delete it to re-split or point to the right data")
    return record


def load_splits(path: str | os.PathLike, expected_fingerprint: str) -> dict[str, np.ndarray]:
    """Read splits saved by `save_splits`, refusing a file made for different data."""
    path = Path(path)
    return _splits_from_record(_read_checked(path, expected_fingerprint), path)


def _has_predefined_splits(dataset: ImageDataset) -> bool:
    if not dataset.splits:
        return False
    missing = [name for name in SPLIT_NAMES if name not in dataset.splits]
    if missing:
        # Re-splitting would mix a predefined test set into training, so do not guess.
        raise DataError(f"{dataset.source or 'data set'}: predefined splits lack {missing}; "
                        f"pass use_predefined=False to re-split all rows")
    return True


def ensure_splits(dataset: ImageDataset, split_file: str | os.PathLike | None = None, val_fraction: float = 0.1,
                  test_fraction: float = 0.2, seed: int = 0, use_predefined: bool = True) -> ImageDataset:
    """Give `dataset` train/val/test splits: predefined ones, else the study's saved file, else a new saved one.

    When the saved file exists its split wins over the requested fractions and seed (that is the point of
    saving it); a mismatch is warned about so a changed config does not pass unnoticed.
    """
    if use_predefined and _has_predefined_splits(dataset):
        return dataset
    _check_fractions(val_fraction, test_fraction)
    fingerprint = dataset_fingerprint(dataset)
    params = {"val_fraction": float(val_fraction), "test_fraction": float(test_fraction), "seed": check_seed(seed)}
    if split_file is not None and Path(split_file).exists():
        path = Path(split_file)
        record = _read_checked(path, fingerprint)
        saved = record.get("params") or {}
        if saved and saved != params:
            warnings.warn(f"{path}: using the saved split made with {saved}, not the requested {params}; "
                          f"delete the file to re-split", stacklevel=2)
        return dataset.with_splits(_splits_from_record(record, path))
    splits = stratified_split(dataset.labels, val_fraction, test_fraction, seed)
    if split_file is not None:
        save_splits(split_file, splits, fingerprint, params)
    return dataset.with_splits(splits)
