"""Stratified splits and k-fold: deterministic, stratified, disjoint, covering, saved with a fingerprint."""

import json
import warnings

import numpy as np
import pytest

from data_pipeline.dataset import ImageDataset
from common.errors import DataError
from data_pipeline.splits import (dataset_fingerprint, ensure_splits, kfold_splits, load_splits, save_splits,
                                  stratified_split)


def _proportions(labels: np.ndarray, num_classes: int = 8) -> np.ndarray:
    return np.bincount(labels, minlength=num_classes) / len(labels)


def _unsplit(dataset: ImageDataset) -> ImageDataset:
    return ImageDataset(dataset.images, dataset.labels, dataset.class_names, dataset.ids, source="unsplit")


@pytest.fixture(scope="module")
def labels(embedded) -> np.ndarray:
    return embedded.labels


@pytest.fixture(scope="module")
def small_dataset(embedded) -> ImageDataset:
    """600 real rows without predefined splits, so ensure_splits has to make its own."""
    rows = np.random.default_rng(0).choice(len(embedded), 600, replace=False)
    return embedded.subset(np.sort(rows), source="small")


def test_split_is_disjoint_covering_and_sorted(labels):
    splits = stratified_split(labels, 0.1, 0.2, seed=0)
    assert set(splits) == {"train", "val", "test"}
    together = np.concatenate(list(splits.values()))
    assert len(together) == len(labels) and len(np.unique(together)) == len(labels)
    for idx in splits.values():
        assert idx.dtype == np.int64 and np.all(np.diff(idx) > 0)


def test_split_sizes_follow_fractions(labels):
    splits = stratified_split(labels, 0.15, 0.25, seed=3)
    n = len(labels)
    assert abs(len(splits["test"]) - 0.25 * n) <= 8
    assert abs(len(splits["val"]) - 0.15 * n) <= 8


def test_split_is_stratified(labels):
    whole = _proportions(labels)
    for name, idx in stratified_split(labels, 0.1, 0.2, seed=7).items():
        assert np.abs(_proportions(labels[idx]) - whole).max() < 0.01, name


def test_split_is_deterministic_by_seed(labels):
    first, again = stratified_split(labels, seed=1), stratified_split(labels, seed=1)
    other = stratified_split(labels, seed=2)
    for name in first:
        np.testing.assert_array_equal(first[name], again[name])
    assert not np.array_equal(first["test"], other["test"])


def test_zero_val_fraction_gives_empty_val(labels):
    splits = stratified_split(labels, val_fraction=0.0, test_fraction=0.2)
    assert len(splits["val"]) == 0
    assert len(splits["train"]) + len(splits["test"]) == len(labels)


@pytest.mark.parametrize("val, test", [(-0.1, 0.2), (0.1, 1.0), (0.5, 0.5), (0.7, 0.4), ("0.1", 0.2)])
def test_bad_fractions_refused(labels, val, test):
    with pytest.raises(DataError, match="fraction"):
        stratified_split(labels, val, test)


def test_too_small_class_refused():
    labels = np.array([0] * 50 + [1] * 50 + [2] * 3)
    with pytest.raises(DataError, match="class 2 has 3 rows"):
        stratified_split(labels, 0.1, 0.2)


def test_every_class_reaches_every_split_when_just_large_enough():
    labels = np.repeat(np.arange(4), [10, 11, 30, 200])
    splits = stratified_split(labels, 0.1, 0.2, seed=0)
    for idx in splits.values():
        assert set(labels[idx]) == {0, 1, 2, 3}


def test_bad_labels_refused():
    with pytest.raises(DataError):
        stratified_split(np.zeros((4, 2), dtype=int))
    with pytest.raises(DataError):
        stratified_split(np.array([0.5, 1.0]))


def test_kfold_val_covers_every_row_exactly_once(labels):
    folds = kfold_splits(labels, k=5, seed=0)
    assert len(folds) == 5
    val_counts = np.bincount(np.concatenate([f["val"] for f in folds]), minlength=len(labels))
    assert np.all(val_counts == 1)
    whole = _proportions(labels)
    for fold in folds:
        assert len(np.intersect1d(fold["train"], fold["val"])) == 0
        assert len(fold["train"]) + len(fold["val"]) == len(labels)
        assert np.abs(_proportions(labels[fold["val"]]) - whole).max() < 0.01


@pytest.mark.parametrize("seed", [-1, 2**32, 1.5, True])
def test_splits_and_corruptions_refuse_the_same_seeds(labels, seed):
    """One seed check serves both: a seed one accepts, the other accepts too."""
    from data_pipeline.corrupt import corrupt

    images = np.zeros((1, 8, 8, 3), np.uint8)
    for call in (lambda: stratified_split(labels, seed=seed), lambda: kfold_splits(labels, 3, seed=seed),
                 lambda: corrupt(images, "gaussian_noise", 1, seed=seed)):
        with pytest.raises(DataError, match=r"seed must be an integer in 0\.\.2\*\*32-1"):
            call()
    assert corrupt(images, "gaussian_noise", 1, seed=2**32 - 1).shape == images.shape


def test_kfold_is_deterministic_by_seed(labels):
    a, b, c = kfold_splits(labels, 3, seed=4), kfold_splits(labels, 3, seed=4), kfold_splits(labels, 3, seed=5)
    assert all(np.array_equal(x["val"], y["val"]) for x, y in zip(a, b))
    assert not np.array_equal(a[0]["val"], c[0]["val"])


@pytest.mark.parametrize("k", [1, 0, 2.5, True])
def test_kfold_bad_k_refused(labels, k):
    with pytest.raises(DataError, match="k must be"):
        kfold_splits(labels, k=k)


def test_kfold_class_smaller_than_k_refused():
    with pytest.raises(DataError, match="class 1 has 2 rows"):
        kfold_splits(np.array([0] * 10 + [1] * 2), k=3)


def test_fingerprint_is_stable_and_tracks_labels_and_ids(small_dataset):
    fp = dataset_fingerprint(small_dataset)
    assert fp == dataset_fingerprint(small_dataset) and len(fp) == 16
    relabelled = ImageDataset(small_dataset.images, np.roll(small_dataset.labels, 1), small_dataset.class_names,
                              small_dataset.ids)
    renamed = ImageDataset(small_dataset.images, small_dataset.labels, small_dataset.class_names,
                           np.roll(small_dataset.ids, 1))
    assert dataset_fingerprint(relabelled) != fp
    assert dataset_fingerprint(renamed) != fp


def test_save_load_round_trip(tmp_path, labels):
    splits = stratified_split(labels, seed=0)
    path = save_splits(tmp_path / "study" / "splits.json", splits, "abc123")
    loaded = load_splits(path, "abc123")
    assert set(loaded) == set(splits)
    for name in splits:
        np.testing.assert_array_equal(loaded[name], splits[name])
    assert [p.name for p in path.parent.iterdir()] == ["splits.json"]  # no temp file left behind


def test_load_refuses_other_data(tmp_path):
    path = save_splits(tmp_path / "splits.json", {"train": np.arange(3)}, "aaaa")
    with pytest.raises(DataError, match="splits.json.*other data"):
        load_splits(path, "bbbb")


def test_load_refuses_missing_or_garbage_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_splits(tmp_path / "none.json", "x")
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    with pytest.raises(DataError, match="garbage.json"):
        load_splits(garbage, "x")
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"format": "cellsearch-splits/1", "fingerprint": "x", "splits": {"train": [1, -2]}}))
    with pytest.raises(DataError, match="'train'"):
        load_splits(wrong, "x")


def test_ensure_splits_keeps_predefined(embedded, tmp_path):
    path = tmp_path / "splits.json"
    result = ensure_splits(embedded, path)
    assert result is embedded
    assert not path.exists()


def test_ensure_splits_refuses_partial_predefined(small_dataset):
    partial = small_dataset.with_splits({"train": np.arange(10), "test": np.arange(10, 20)})
    with pytest.raises(DataError, match="lack"):
        ensure_splits(partial, None)
    assert set(ensure_splits(partial, None, use_predefined=False).splits) == {"train", "val", "test"}


def test_ensure_splits_saves_then_reuses_file(small_dataset, tmp_path):
    path = tmp_path / "study" / "splits.json"
    first = ensure_splits(small_dataset, path, 0.1, 0.2, seed=0)
    assert path.exists()
    expected = stratified_split(small_dataset.labels, 0.1, 0.2, seed=0)
    for name in expected:
        np.testing.assert_array_equal(first.splits[name], expected[name])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = ensure_splits(small_dataset, path, 0.1, 0.2, seed=0)
    for name in expected:
        np.testing.assert_array_equal(again.splits[name], expected[name])


def test_ensure_splits_saved_file_wins_over_new_params(small_dataset, tmp_path):
    path = tmp_path / "splits.json"
    first = ensure_splits(small_dataset, path, 0.1, 0.2, seed=0)
    with pytest.warns(UserWarning, match="saved split"):
        second = ensure_splits(small_dataset, path, 0.1, 0.2, seed=99)
    np.testing.assert_array_equal(first.splits["test"], second.splits["test"])


def test_ensure_splits_loads_a_hand_written_file(small_dataset, tmp_path):
    custom = {"train": np.arange(400), "val": np.arange(400, 450), "test": np.arange(450, 600)}
    path = save_splits(tmp_path / "splits.json", custom, dataset_fingerprint(small_dataset))
    result = ensure_splits(small_dataset, path)
    np.testing.assert_array_equal(result.splits["val"], custom["val"])


def test_ensure_splits_refuses_file_of_other_data(small_dataset, embedded, tmp_path):
    path = tmp_path / "splits.json"
    ensure_splits(small_dataset, path)
    other = _unsplit(embedded)
    with pytest.raises(DataError, match="other data"):
        ensure_splits(other, path)


def test_ensure_splits_without_file_is_deterministic(small_dataset):
    a, b = ensure_splits(small_dataset, None, seed=5), ensure_splits(small_dataset, None, seed=5)
    np.testing.assert_array_equal(a.splits["train"], b.splits["train"])
