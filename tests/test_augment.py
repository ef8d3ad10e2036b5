"""Augmentation policies on real 28x28 blood-cell batches: identity at strength 0, label safety, soft labels,
determinism by key, compiled and threaded calls, and clear errors. Backend-neutral (keras.ops): CI runs them
under JAX and TensorFlow."""

import numpy as np
import pytest
import keras
from keras import ops

from data_pipeline.augment import MIXING_POLICIES, POLICIES, build_augmenter
from common.errors import DataError

N_CLASSES = 8


@pytest.fixture(scope="module")
def batch(embedded):
    """32 images from all classes (the embedded data is sorted by class, so take a random subset)."""
    idx = np.random.default_rng(0).choice(len(embedded), 32, replace=False)
    images = embedded.images[idx].astype(np.float32)
    labels = np.eye(N_CLASSES, dtype=np.float32)[embedded.labels[idx]]
    return images, labels


def _np(tensor) -> np.ndarray:
    return ops.convert_to_numpy(tensor)


def _key(*key: int) -> np.ndarray:
    return np.array(key, np.int32)


def _dihedral_views(image: np.ndarray) -> list[np.ndarray]:
    return [np.rot90(view, k) for view in (image, image[:, ::-1]) for k in range(4)]


@pytest.mark.parametrize("policy", POLICIES)
def test_strength_zero_is_exact_identity(batch, policy):
    images, labels = batch
    out_images, out_labels = build_augmenter(policy, 0.0, N_CLASSES, seed=1)(images, labels, seed=5)
    assert np.array_equal(_np(out_images), images)
    assert np.array_equal(_np(out_labels), labels)


@pytest.mark.parametrize("policy", POLICIES[1:])
def test_strength_one_changes_images_and_keeps_shape_dtype_range(batch, policy):
    images, labels = batch
    out_images, out_labels = build_augmenter(policy, 1.0, N_CLASSES)(images, labels, seed=3)
    assert out_images.shape == images.shape and keras.backend.standardize_dtype(out_images.dtype) == "float32"
    assert out_labels.shape == labels.shape and keras.backend.standardize_dtype(out_labels.dtype) == "float32"
    out = _np(out_images)
    assert out.min() >= 0 and out.max() <= 255
    changed = np.abs(out - images).reshape(len(images), -1).max(axis=1) > 0
    assert changed.mean() > 0.75  # D4 leaves 1 image in 8 as it was; the policy op changes almost all
    if policy not in MIXING_POLICIES:
        assert np.array_equal(_np(out_labels), labels)


@pytest.mark.parametrize("policy", MIXING_POLICIES)
def test_mixing_policies_give_soft_labels_summing_to_one(batch, policy):
    images, labels = batch
    _, out_labels = build_augmenter(policy, 1.0, N_CLASSES)(images, labels, seed=11)
    out = _np(out_labels)
    assert np.allclose(out.sum(axis=1), 1.0, atol=1e-5)
    assert out.min() >= 0 and out.max() <= 1 + 1e-6
    assert (out.max(axis=1) < 0.999).sum() >= len(out) // 4  # many rows are genuine mixtures


def test_cutmix_label_weight_is_the_pasted_pixel_share(batch):
    """With a single image repeated but two labels, the label mix must equal the share of pixels kept."""
    images, _ = batch
    black_white = np.stack([np.zeros_like(images[0]), np.full_like(images[0], 255)] * 16)
    labels = np.eye(N_CLASSES, dtype=np.float32)[[0, 1] * 16]
    out_images, out_labels = build_augmenter("cutmix", 1.0, N_CLASSES)(black_white, labels, seed=2)
    white_share = (_np(out_images)[..., 0] > 127).mean(axis=(1, 2))
    assert np.allclose(_np(out_labels)[:, 1], white_share, atol=1e-5)


def test_orientation_is_an_exact_d4_element_and_uses_all_eight(embedded):
    images = embedded.images[:64].astype(np.float32)
    augmenter = build_augmenter("light", 1.0, N_CLASSES)
    with augmenter._stream.bound(_key(4, 2)):
        oriented = _np(augmenter._orient(images))
    used = set()
    for original, out in zip(images, oriented):
        assert np.array_equal(np.sort(out, axis=None), np.sort(original, axis=None))  # same pixel multiset
        matches = [i for i, view in enumerate(_dihedral_views(original)) if np.array_equal(view, out)]
        assert matches, "output is not a flip/rot90 of its input"
        used.add(matches[0])
    assert len(used) == 8


def test_non_square_images_only_flip_or_half_turn(embedded):
    images = np.concatenate([embedded.images[:16], embedded.images[16:32, :, :12]], axis=2).astype(np.float32)
    labels = np.eye(N_CLASSES, dtype=np.float32)[embedded.labels[:16]]
    augmenter = build_augmenter("light", 1.0, N_CLASSES)
    with augmenter._stream.bound(_key(3, 1)):
        oriented = _np(augmenter._orient(images))
    for original, out in zip(images, oriented):
        views = [original, original[::-1, ::-1], original[:, ::-1], original[::-1]]
        assert any(np.array_equal(view, out) for view in views)
    assert build_augmenter("light", 1.0, N_CLASSES)(images, labels, seed=1)[0].shape == images.shape


def test_same_key_same_output_and_other_key_differs(batch):
    images, labels = batch
    for policy in POLICIES[1:]:
        first = build_augmenter(policy, 0.7, N_CLASSES)(images, labels, seed=9)
        rebuilt = build_augmenter(policy, 0.7, N_CLASSES)  # each build compiles: two per policy are enough
        again, other = rebuilt(images, labels, seed=9), rebuilt(images, labels, seed=10)
        assert np.array_equal(_np(first[0]), _np(again[0])), policy
        assert np.array_equal(_np(first[1]), _np(again[1])), policy
        assert not np.array_equal(_np(first[0]), _np(other[0])), policy


def test_works_at_28_and_64_and_on_backend_tensors(batch):
    images, labels = batch
    for size in (28, 64):
        resized = np.round(_np(ops.image.resize(images[:16], (size, size))))
        for policy in ("randaugment", "augmix"):
            out_images, out_labels = build_augmenter(policy, 1.0, N_CLASSES)(ops.convert_to_tensor(resized),
                                                                            ops.convert_to_tensor(labels[:16]), seed=1)
            assert out_images.shape == (16, size, size, 3) and out_labels.shape == (16, N_CLASSES)
            assert not np.array_equal(_np(out_images), resized)


def test_float32_output_under_a_global_mixed_float16_policy(batch):
    """The trainer sets mixed_float16 on GPUs; augmentation layers must still compute in float32."""
    import keras

    from common.precision import dtype_policy

    images, labels = batch
    with dtype_policy("mixed_float16"):
        augmenter = build_augmenter("light", 1.0, N_CLASSES)
    out_images, _ = augmenter(images, labels, seed=1)
    assert keras.backend.standardize_dtype(out_images.dtype) == "float32"


@pytest.mark.parametrize("policy", ["bogus", "RandAugment", "", None])
def test_unknown_policy_raises_data_error_naming_it(policy):
    with pytest.raises(DataError, match="unknown augmentation policy") as error:
        build_augmenter(policy, 0.5, N_CLASSES)
    assert repr(policy) in str(error.value)


@pytest.mark.parametrize("strength", [-0.1, 1.5, float("nan"), "0.5", True])
def test_strength_outside_unit_interval_raises(strength):
    with pytest.raises(DataError, match="strength"):
        build_augmenter("light", strength, N_CLASSES)


def test_label_width_must_match_num_classes(batch):
    images, labels = batch
    with pytest.raises(DataError, match="one-hot labels"):
        build_augmenter("mixup", 0.5, 5)(images, labels, seed=1)


# -- the replacements for Keras ops -------------------------------------------------------------------------

def _keras_one_by_one(layer, images: np.ndarray) -> np.ndarray:
    return np.stack([_np(layer(image[None]))[0] for image in images])


def _equalize_reference(image: np.ndarray) -> np.ndarray:
    """Keras' equalization lookup for one image, channel by channel, in numpy (floor bins of 0..255)."""
    out = image.copy()
    for c in range(image.shape[-1]):
        bins = np.floor(np.clip(image[..., c], 0, 255)).astype(int)
        hist = np.bincount(bins.ravel(), minlength=256)
        if np.count_nonzero(hist) <= 1:
            continue
        cdf = np.cumsum(hist)
        low = cdf[cdf > 0].min()
        out[..., c] = np.clip(np.round((cdf - low) * 255.0 / max(cdf[-1] - low, 1)), 0, 255)[bins]
    return out


def test_equalization_is_per_image(batch):
    """Keras pools the histogram over the batch; ours is per image: it equals Keras on batches of one (integer
    pixels; Keras bins fractional ones differently per backend) and a per-image reference on the fractional
    pixels an earlier interpolating op leaves."""
    import keras

    from data_pipeline.augment import _equalize

    images = batch[0][:12]
    reference = keras.layers.Equalization(value_range=(0, 255))
    assert np.array_equal(_np(_equalize(images)), _keras_one_by_one(reference, images))
    rotated = np.clip(_np(keras.layers.RandomRotation(0.1, seed=1)(images)), 0, 255)
    assert np.array_equal(_np(_equalize(rotated)), np.stack([_equalize_reference(x) for x in rotated]))


def test_equalization_leaves_flat_channels_as_they_are(batch):
    from data_pipeline.augment import _equalize

    images = batch[0][:4].copy()
    images[0, ..., 1] = 77.25  # one flat channel (Keras leaves a channel with <= 1 used bin unchanged)
    images[1] = 5.0           # a flat image
    out = _np(_equalize(images))
    assert np.array_equal(out[0, ..., 1], images[0, ..., 1]) and np.array_equal(out[1], images[1])
    assert not np.array_equal(out[2], images[2])


def test_brightness_leaves_its_input_alone(batch):
    """keras RandomBrightness adds in place, which under PyTorch changed the caller's batch."""
    from data_pipeline.augment import _Brightness, _SeedStream

    images = ops.convert_to_tensor(batch[0])
    before = _np(images).copy()
    stream = _SeedStream()
    layer = _Brightness(0.3, value_range=(0, 255), name="brightness")
    layer.generator = stream
    with stream.bound(_key(1, 1)):
        out = _np(layer(images, training=True))
    assert np.array_equal(_np(images), before) and not np.array_equal(out, before)


def test_light_contrast_goes_both_ways():
    """Keras RandomContrast(0.15) only draws x[1, 1.15]; 'light' asks for x[0.85, 1.15] explicitly."""
    import keras

    from data_pipeline.augment import JITTER

    layer = keras.layers.RandomContrast((JITTER["contrast"],) * 2, value_range=(0, 255), seed=1)
    factors = _np(layer.get_random_transformation(np.zeros((512, 2, 2, 3), np.float32))["contrast_factor"])
    assert factors.min() < 0.9 and factors.max() > 1.1 and 0.85 <= factors.min() and factors.max() <= 1.15


def test_colour_matrices_identity_and_full_desaturation():
    from data_pipeline.augment import _colour_matrices

    identity = _np(_colour_matrices(np.array([1.0], np.float32), np.array([0.0], np.float32)))[0]
    assert np.allclose(identity, np.eye(3), atol=1e-5)
    grey = _np(_colour_matrices(np.array([0.0], np.float32), np.array([0.3], np.float32)))[0]
    assert np.allclose(grey, np.tile([[0.299, 0.587, 0.114]], (3, 1)), atol=1e-3)  # every channel = luma


def test_colour_jitter_bounded_and_identity_at_strength_zero(batch):
    from data_pipeline.augment import _make_colour_jitter, _SeedStream

    images = ops.convert_to_tensor(batch[0])
    stream = _SeedStream()
    with stream.bound(_key(7, 1)):
        still = _np(_make_colour_jitter(0.0, stream)(images))
        jittered = _np(_make_colour_jitter(1.0, stream)(images))
    assert np.abs(still - batch[0]).max() < 1e-3
    change = np.abs(jittered - batch[0])
    assert 0.5 < change.mean() < 6 and change.max() < 60  # chroma x[0.82, 1.22], hue +-7.2 degrees
    assert (change.reshape(len(change), -1).max(axis=1) > 1).mean() > 0.9  # nearly every image changes
    luma = np.array([0.299, 0.587, 0.114])
    assert np.abs((jittered - batch[0]) @ luma).mean() < 0.5  # luma is kept (except where clipped)


@pytest.mark.parametrize("size", [28, 64])
def test_gridmask_erases_the_share_its_ratio_implies(size):
    """ratio ~ U[0.3, 0.6] * strength, so the erased share averages E[ratio^2] (0.21 at strength 1)."""
    from data_pipeline.augment import GRIDMASK_MAX_RATIO, _grid_keep_masks, _SeedStream

    stream = _SeedStream()
    white = np.full((256, size, size, 3), 255.0, np.float32)
    for strength in (1.0, 0.5):
        high = GRIDMASK_MAX_RATIO * strength
        expected = (high ** 3 - (high / 2) ** 3) / (3 * high / 2)
        with stream.bound(_key(5, 5)):
            keep = _np(_grid_keep_masks(white, strength, stream))
        assert keep.shape == (256, size, size, 1) and set(np.unique(keep)) <= {0.0, 1.0}
        erased = 1.0 - keep.mean(axis=(1, 2, 3))
        assert abs(erased.mean() - expected) < 0.15 * expected
        assert erased.min() > 0  # every image gets squares (a unit is at most ~half the image)


def test_gridmask_masks_depend_only_on_the_key():
    from data_pipeline.augment import _grid_keep_masks, _SeedStream

    stream = _SeedStream()
    images = np.zeros((8, 64, 64, 3), np.float32)

    def masks(key):
        with stream.bound(_key(*key)):
            return _np(_grid_keep_masks(images, 1.0, stream))

    assert np.array_equal(masks([1, 2]), masks([1, 2]))
    assert not np.array_equal(masks([1, 2]), masks([1, 3]))


def test_augmix_chains_have_depth_one_to_three():
    from data_pipeline.augment import AUGMIX_CHAINS, AUGMIX_MAX_DEPTH, _AugMix, _SeedStream

    stream = _SeedStream()
    layer = _AugMix(1.0, stream)
    skip = len(layer._augment_layers)
    depths = set()
    for seed in range(40):
        with stream.bound(_key(seed, 0)):
            chosen = _np(layer._draw_ops()).reshape(AUGMIX_CHAINS, AUGMIX_MAX_DEPTH)
        for chain in chosen:
            depth = int((chain != skip).sum())
            assert 1 <= depth <= AUGMIX_MAX_DEPTH
            assert (chain[:depth] != skip).all() and (chain[depth:] == skip).all()  # ops first, then identity
            depths.add(depth)
    assert depths == {1, 2, 3}
    assert "solarization" not in layer._augment_layers


@pytest.mark.parametrize("policy", ["light", "augmix", "gridmask"])
def test_threaded_calls_are_deterministic(batch, policy):
    """Keyed draws: batches augmented from several threads at once (as a PyDataset with workers) equal the
    same keys run one by one."""
    from concurrent.futures import ThreadPoolExecutor

    images, labels = batch
    augmenter = build_augmenter(policy, 0.8, N_CLASSES, seed=3)
    one_by_one = [_np(augmenter(images, labels, seed=key)[0]) for key in range(6)]
    with ThreadPoolExecutor(3) as pool:
        threaded = list(pool.map(lambda key: _np(augmenter(images, labels, seed=key)[0]), range(6)))
    assert all(np.array_equal(x, y) for x, y in zip(one_by_one, threaded))
    assert not np.array_equal(one_by_one[0], one_by_one[1])  # different keys, different batches
