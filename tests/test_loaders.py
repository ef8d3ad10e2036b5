"""Loaders for the three formats, on the embedded real data and the raw PBC JPEG sample, and their errors."""

import shutil

import numpy as np
import pytest

from data_pipeline.classes import BLOOD_CELL_CLASSES
from data_pipeline.dataset import ImageDataset
from common.errors import DataError
from data_pipeline.loaders import load, load_folder, load_image_file, load_npz


def test_embedded_default_is_medmnist_layout_with_splits(embedded):
    assert len(embedded) == 13_673
    assert embedded.image_shape == (28, 28, 3)
    assert embedded.images.dtype == np.uint8
    assert embedded.class_names == BLOOD_CELL_CLASSES
    assert {k: len(v) for k, v in embedded.splits.items()} == {"train": 9572, "val": 1367, "test": 2734}
    train = embedded.split("train")
    assert train.class_counts().tolist() == [682, 1746, 869, 1621, 680, 795, 1864, 1315]
    assert train.ids[0].startswith("basophil/")


def _an2dl_npz(tmp_path, embedded, labels_of):
    rows = np.concatenate([np.flatnonzero(embedded.labels == c)[:6] for c in range(8)])
    images, labels = embedded.images[rows], embedded.labels[rows]
    path = tmp_path / "an2dl.npz"
    np.savez(path, images=images, labels=labels_of(labels))
    return path, images, labels


@pytest.mark.parametrize(
    "labels_of",
    [lambda y: y, lambda y: y[:, None], lambda y: np.eye(8, dtype=np.float32)[y]],
    ids=["flat", "column", "one_hot"],
)
def test_an2dl_npz_accepts_every_label_layout(tmp_path, embedded, labels_of):
    path, images, labels = _an2dl_npz(tmp_path, embedded, labels_of)
    data = load(path)
    assert np.array_equal(data.images, images)
    assert np.array_equal(data.labels, labels)
    assert data.splits == {}
    assert data.num_classes == 8


def test_folder_loader_reads_raw_pbc_jpegs(raw_sample_dir):
    data = load_folder(raw_sample_dir, image_size=64, center_crop=200)
    assert len(data) == 240
    assert data.image_shape == (64, 64, 3)
    assert data.class_names == BLOOD_CELL_CLASSES  # 'ig' folder maps to immature_granulocyte, label 3
    assert data.class_counts().tolist() == [30] * 8
    assert all(i.startswith("ig/") for i in data.ids[data.labels == 3])
    # Real cell images: not flat, not saturated.
    assert 20 < data.images.std() < 120


def test_load_image_file_crops_then_resizes(raw_sample_dir):
    first = sorted((raw_sample_dir / "basophil").glob("*.jpg"))[0]
    full = load_image_file(first)
    assert full.shape[2] == 3 and full.shape[0] > 300
    small = load_image_file(first, image_size=28, center_crop=200)
    assert small.shape == (28, 28, 3) and small.dtype == np.uint8


@pytest.mark.parametrize(
    ("images", "labels", "message"),
    [
        (np.zeros((4, 8, 8), np.uint8), np.zeros(4), "rank 3"),
        (np.zeros((4, 8, 8, 1), np.uint8), np.zeros(4), "3 colour channels"),
        (np.full((4, 8, 8, 3), 300.0), np.zeros(4), "0..255"),
        (np.full((4, 8, 8, 3), 0.5, np.float32), np.zeros(4), "0..1"),
        (np.zeros((4, 8, 8, 3), np.uint8), np.array([0, 1, 2, 9]), "label 9 at index 3 is out of range"),
        (np.zeros((4, 8, 8, 3), np.uint8), np.zeros(3), "3 labels for 4 images"),
        (np.zeros((4, 8, 8, 3), np.uint8), np.zeros((4, 3)), "expected shape"),
    ],
)
def test_validation_names_the_problem(images, labels, message):
    with pytest.raises(DataError, match=message):
        ImageDataset(images, labels, BLOOD_CELL_CLASSES)


def test_integer_valued_floats_become_uint8():
    data = ImageDataset(np.full((2, 4, 4, 3), 200.0), np.array([0, 1]), ("a", "b"))
    assert data.images.dtype == np.uint8 and data.images.max() == 200


def test_missing_path_is_named(tmp_path):
    with pytest.raises(DataError, match="not found: .*nowhere.npz"):
        load(tmp_path / "nowhere.npz")


def test_npz_without_known_keys_is_refused(tmp_path):
    path = tmp_path / "other.npz"
    np.savez(path, x=np.zeros(3))
    with pytest.raises(DataError, match="no 'images' or 'train_images' key"):
        load_npz(path)


def test_corrupt_npz_is_refused(tmp_path):
    path = tmp_path / "broken.npz"
    path.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(DataError, match="broken.npz: not a readable .npz"):
        load(path)


def test_unreadable_image_names_the_file(tmp_path, raw_sample_dir):
    for cls in ("basophil", "eosinophil"):
        shutil.copytree(raw_sample_dir / cls, tmp_path / cls)
    (tmp_path / "eosinophil" / "bad.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(DataError, match="unreadable image .*bad.jpg"):
        load_folder(tmp_path, image_size=28)


def test_class_folder_without_images_is_named(tmp_path, raw_sample_dir):
    shutil.copytree(raw_sample_dir / "basophil", tmp_path / "basophil")
    (tmp_path / "platelet").mkdir()
    with pytest.raises(DataError, match="'platelet' has no images"):
        load_folder(tmp_path, image_size=28)


def test_a_class_with_no_images_is_detected(embedded):
    subset = embedded.subset(np.flatnonzero(embedded.labels != 5))
    with pytest.raises(DataError, match="class 'monocyte' has no images"):
        subset.check_every_class_present()


def test_unknown_split_is_named(embedded):
    with pytest.raises(DataError, match="no split 'holdout'"):
        embedded.split("holdout")
