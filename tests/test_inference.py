"""common/inference.py: the dihedral views in numpy, as index maps and as one tensor gather, and the input rule."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from common.errors import DataError, EnsembleError
from common.inference import (SHAPE_KEEPING_VIEWS, VIEW_SETS, check_images, dihedral_index_maps, dihedral_view,
                              stack_views, view_indices)


def _asymmetric(height: int, width: int) -> np.ndarray:
    """(2,H,W,3) images whose every pixel differs, so every non-identity view moves some pixel."""
    return np.arange(2 * height * width * 3, dtype=np.int64).reshape(2, height, width, 3)


def test_the_eight_views_are_the_dihedral_group_in_rot90_order():
    images = _asymmetric(4, 4)
    views = [dihedral_view(images, v) for v in range(8)]
    assert np.array_equal(views[0], images)
    assert len({view.tobytes() for view in views}) == 8
    for k in range(4):
        assert np.array_equal(views[k], np.rot90(images, k, axes=(1, 2)))
        assert np.array_equal(views[4 + k], np.rot90(images[:, :, ::-1], k, axes=(1, 2)))
    with pytest.raises(DataError, match="0..7"):
        dihedral_view(images, 8)


@pytest.mark.parametrize("height, width", [(5, 5), (3, 5)])
def test_index_maps_gather_the_same_views(height, width):
    images = _asymmetric(height, width)
    maps = dihedral_index_maps(height, width)
    views = range(8) if height == width else SHAPE_KEEPING_VIEWS
    assert maps.shape == (len(views), height * width) and maps.dtype == np.int32
    for row, view in zip(maps, views):
        gathered = images.reshape(2, -1, 3)[:, row].reshape(images.shape)
        assert np.array_equal(gathered, dihedral_view(images, view))


def test_quarter_turns_of_non_square_images_are_refused():
    with pytest.raises(DataError, match="square"):
        dihedral_index_maps(3, 5, (0, 1))


@pytest.mark.parametrize("height, width, views", [(6, 6, range(8)), (6, 6, (0, 4)), (4, 7, SHAPE_KEEPING_VIEWS)])
def test_stack_views_is_the_numpy_views_view_major(height, width, views):
    from keras import ops

    images = _asymmetric(height, width).astype(np.float32)
    stacked = ops.convert_to_numpy(stack_views(ops.convert_to_tensor(images), views))
    np.testing.assert_array_equal(stacked, np.concatenate([dihedral_view(images, v) for v in views]))


def test_view_sets_and_their_check():
    assert [view_indices(n) for n in sorted(VIEW_SETS)] == [(0,), (0, 4), (0, 1, 2, 3), tuple(range(8))]
    with pytest.raises(DataError, match="tta views must be one of"):
        view_indices(3)


@pytest.mark.parametrize("bad, message", [
    (np.zeros((28, 28, 3), np.uint8), r"single image\? add a batch axis"),
    (np.zeros((2, 28, 28), np.uint8), "greyscale"),
    (np.zeros((2, 28, 28, 4), np.uint8), "3 colour channels"),
    (np.zeros((0, 28, 28, 3), np.uint8), "no images"),
    (np.zeros((2, 0, 28, 3), np.uint8), "empty image size"),
    (np.zeros((2, 4, 4, 3), bool), "must be uint8"),
    (np.full((2, 4, 4, 3), 0.5, np.float32), "0..1; scale them"),
    (np.full((2, 4, 4, 3), 300.0), "0..255"),
    (np.full((2, 4, 4, 3), np.nan), "0..255"),
])
def test_bad_images_raise_the_callers_error_naming_the_source(bad, message):
    with pytest.raises(DataError, match=f"^train: .*{message}"):
        check_images(bad, "train")
    with pytest.raises(EnsembleError, match=message):
        check_images(bad, "x.npz", EnsembleError)


def test_numbers_in_0_255_become_contiguous_uint8():
    images = np.random.default_rng(0).integers(0, 256, (3, 5, 5, 3), dtype=np.uint8)
    assert check_images(images) is images  # valid uint8 input is not copied
    floats = check_images(np.clip(images.astype(np.float64) + 0.3, 0, 255))  # rounded, not truncated
    assert floats.dtype == np.uint8 and np.array_equal(floats, images)
    strided = check_images(images[:, ::-1])
    assert strided.flags.c_contiguous and np.array_equal(strided, images[:, ::-1])


def test_importing_the_runtime_imports_neither_keras_nor_the_package():
    code = ("import sys, common.inference; "
            "print(sorted(m for m in ('keras', 'tensorflow', 'jax', 'torch', 'data_pipeline', 'ensemble', "
            "'backbones', 'search') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def test_an_unknown_preprocessing_mode_is_refused():
    from common.errors import ConfigError
    from common.inference import preprocess_layer_class

    with pytest.raises(ConfigError, match="unknown preprocessing mode 'bgr'"):
        preprocess_layer_class()("bgr")
