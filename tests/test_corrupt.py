"""Corruption suite: shape/dtype kept, damage grows with severity, deterministic, bad input refused."""

import numpy as np
import pytest
from PIL import Image

from data_pipeline.corrupt import (CORRUPTIONS, SEVERITIES, SEVERITY_LEVELS, corrupt, corrupt_dataset,
                                   corruption_suite)
from common.errors import DataError

RANDOM_KINDS = ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "motion_blur", "haze",
                "hue_shift", "stain_shift", "gamma", "bubbles", "dust", "stain_deposit", "smudge")
ARTEFACTS = ("bubbles", "dust", "stain_deposit", "smudge")
NEW_KINDS = ("motion_blur", "gamma", "downsample") + ARTEFACTS


@pytest.fixture(scope="module")
def clean(embedded) -> np.ndarray:
    """256 real test images, every class represented."""
    test = embedded.splits["test"]
    return embedded.images[np.sort(np.random.default_rng(0).choice(test, 256, replace=False))]


@pytest.fixture(scope="module")
def suite(clean) -> dict[tuple[str, int], np.ndarray]:
    return {(kind, s): out for kind, s, out in corruption_suite(clean, seed=0)}


def _mean_abs_change(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def test_catalogue_is_complete():
    assert len(CORRUPTIONS) == 21 and len(set(CORRUPTIONS)) == len(CORRUPTIONS)
    assert set(NEW_KINDS) < set(CORRUPTIONS)
    assert set(SEVERITY_LEVELS) == set(CORRUPTIONS)
    assert all(len(levels) == len(SEVERITIES) for levels in SEVERITY_LEVELS.values())


def test_suite_yields_every_kind_and_severity(suite):
    assert list(suite) == [(kind, s) for kind in CORRUPTIONS for s in SEVERITIES]


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_shape_and_dtype_kept_and_image_changed(suite, clean, kind):
    for s in SEVERITIES:
        out = suite[kind, s]
        assert out.shape == clean.shape and out.dtype == np.uint8
    assert _mean_abs_change(suite[kind, 1], clean) > 0.5


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_damage_grows_with_severity(suite, clean, kind):
    changes = [_mean_abs_change(suite[kind, s], clean) for s in SEVERITIES]
    assert all(a < b for a, b in zip(changes, changes[1:])), changes


@pytest.mark.parametrize("kind", ARTEFACTS)
def test_artefacts_stay_in_place_and_grow(suite, clean, kind):
    """Positions and shapes come from the seed: every pixel an artefact touches at one severity it still
    touches at the next, only more pixels join."""
    touched = [np.abs(suite[kind, s].astype(np.int16) - clean).max(axis=-1) > 0 for s in SEVERITIES]
    for lower, higher in zip(touched, touched[1:]):
        assert (lower & higher).sum() >= 0.999 * lower.sum()
        assert higher.sum() > lower.sum()


@pytest.mark.parametrize("kind", NEW_KINDS)
def test_new_kinds_grow_with_severity_at_96(clean, kind):
    large = np.stack([np.asarray(Image.fromarray(image).resize((96, 96), Image.Resampling.BICUBIC))
                      for image in clean[:24]])
    changes = [_mean_abs_change(corrupt(large, kind, s), large) for s in SEVERITIES]
    assert changes[0] > 0.3 and all(a < b for a, b in zip(changes, changes[1:])), changes


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_severity_three_degrades_but_does_not_destroy(suite, clean, kind):
    """Calibration guard: severity 3 keeps the cell's correlation with the clean image clearly positive."""
    out = suite[kind, 3].astype(np.float64)
    ref = clean.astype(np.float64)
    assert 1.0 < _mean_abs_change(suite[kind, 3], clean) < 60
    flat_out, flat_ref = out.reshape(len(out), -1), ref.reshape(len(ref), -1)
    corr = [np.corrcoef(a, b)[0, 1] for a, b in zip(flat_out, flat_ref)]
    assert np.median(corr) > 0.5


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_deterministic_by_seed(clean, kind):
    np.testing.assert_array_equal(corrupt(clean[:16], kind, 4, seed=3), corrupt(clean[:16], kind, 4, seed=3))


@pytest.mark.parametrize("kind", RANDOM_KINDS)
def test_seed_changes_random_kinds(clean, kind):
    assert not np.array_equal(corrupt(clean[:16], kind, 4, seed=1), corrupt(clean[:16], kind, 4, seed=2))


def test_input_is_not_modified(clean):
    before = clean.copy()
    for kind in CORRUPTIONS:
        corrupt(clean[:4], kind, 5)
    np.testing.assert_array_equal(clean, before)


@pytest.mark.parametrize("shape", [(3, 96, 96, 3), (2, 40, 32, 3), (1, 28, 28, 3)])
def test_any_image_size_works(shape, clean):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=shape, dtype=np.uint8)
    for kind in CORRUPTIONS:
        out = corrupt(images, kind, 3)
        assert out.shape == shape and out.dtype == np.uint8, kind


@pytest.mark.parametrize("kind", ["gaussian_blur", "defocus_blur"])
def test_blur_scales_with_image_size(kind):
    """The same severity blurs a 4x larger image by a 4x larger radius, so an upscaled edge looks the same."""
    small = np.zeros((1, 28, 28, 3), np.uint8)
    small[:, :, 14:] = 255
    large = np.repeat(np.repeat(small, 4, axis=1), 4, axis=2)
    profile_small = corrupt(small, kind, 5)[0, 0, :, 0].astype(float)
    profile_large = corrupt(large, kind, 5)[0, 0, :, 0].astype(float).reshape(28, 4).mean(axis=1)
    assert np.abs(profile_small - profile_large).max() < 12
    assert ((profile_small > 10) & (profile_small < 245)).sum() >= 3  # the edge really is blurred


@pytest.mark.parametrize("kind", ["fog", "", "GAUSSIAN_NOISE"])
def test_unknown_kind_refused(clean, kind):
    with pytest.raises(DataError, match="unknown corruption"):
        corrupt(clean[:2], kind, 1)


@pytest.mark.parametrize("severity", [0, 6, -1, 2.5, True, "3"])
def test_bad_severity_refused(clean, severity):
    with pytest.raises(DataError, match="severity"):
        corrupt(clean[:2], "contrast", severity)


def test_bad_images_refused(clean):
    with pytest.raises(DataError):
        corrupt(clean[0], "contrast", 1)  # missing batch axis
    with pytest.raises(DataError):
        corrupt(clean[:2] / 255.0, "contrast", 1)  # floats in [0, 1]
    with pytest.raises(DataError):
        corrupt(clean[:2, :, :, :1], "contrast", 1)
    with pytest.raises(DataError, match="seed"):
        corrupt(clean[:2], "gaussian_noise", 1, seed=-1)


def test_corrupt_dataset_mixes_kinds_and_severities(clean):
    images, kinds, severities = corrupt_dataset(clean, seed=0)
    assert images.shape == clean.shape and images.dtype == np.uint8
    assert kinds.shape == severities.shape == (len(clean),)
    assert set(kinds) <= set(CORRUPTIONS) and len(set(kinds)) >= 10
    assert set(severities.tolist()) == set(SEVERITIES)
    again = corrupt_dataset(clean, seed=0)
    np.testing.assert_array_equal(images, again[0])
    np.testing.assert_array_equal(kinds, again[1])
    np.testing.assert_array_equal(severities, again[2])
    other = corrupt_dataset(clean, seed=1)
    assert not np.array_equal(kinds, other[1])


def test_corrupt_dataset_restricted_choice_matches_corrupt(clean):
    images, kinds, severities = corrupt_dataset(clean, severities=(2,), kinds=("contrast",))
    assert set(kinds) == {"contrast"} and set(severities.tolist()) == {2}
    np.testing.assert_array_equal(images, corrupt(clean, "contrast", 2))


def test_corrupt_dataset_and_suite_check_arguments_at_call(clean):
    with pytest.raises(DataError, match="unknown corruption"):
        corrupt_dataset(clean, kinds=("blur",))
    with pytest.raises(DataError, match="severity"):
        corrupt_dataset(clean, severities=(1, 7))
    with pytest.raises(DataError, match="no corruption kinds"):
        corrupt_dataset(clean, kinds=())
    with pytest.raises(DataError, match="unknown corruption"):
        corruption_suite(clean, kinds=("blur",))  # raises before the first next()


def test_suite_subset_and_single_values(clean):
    produced = [(k, s) for k, s, _ in corruption_suite(clean[:4], kinds="pixelate", severities=3)]
    assert produced == [("pixelate", 3)]
