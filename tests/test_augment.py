"""Augmentation policies on real 28x28 blood-cell batches: identity at strength 0, label safety, soft labels,
determinism by key, graph mode, and clear errors."""

import numpy as np
import pytest
import tensorflow as tf

from data_pipeline.augment import MIXING_POLICIES, POLICIES, build_augmenter
from data_pipeline.errors import DataError

N_CLASSES = 8


@pytest.fixture(scope="module")
def batch(embedded):
    """32 images from all classes (the embedded data is sorted by class, so take a random subset)."""
    idx = np.random.default_rng(0).choice(len(embedded), 32, replace=False)
    images = embedded.images[idx].astype(np.float32)
    labels = np.eye(N_CLASSES, dtype=np.float32)[embedded.labels[idx]]
    return images, labels


def _dihedral_views(image: np.ndarray) -> list[np.ndarray]:
    return [np.rot90(view, k) for view in (image, image[:, ::-1]) for k in range(4)]


@pytest.mark.parametrize("policy", POLICIES)
def test_strength_zero_is_exact_identity(batch, policy):
    images, labels = batch
    out_images, out_labels = build_augmenter(policy, 0.0, N_CLASSES, seed=1)(images, labels, seed=5)
    assert np.array_equal(out_images.numpy(), images)
    assert np.array_equal(out_labels.numpy(), labels)


@pytest.mark.parametrize("policy", POLICIES[1:])
def test_strength_one_changes_images_and_keeps_shape_dtype_range(batch, policy):
    images, labels = batch
    out_images, out_labels = build_augmenter(policy, 1.0, N_CLASSES)(images, labels, seed=3)
    assert out_images.shape == images.shape and out_images.dtype == tf.float32
    assert out_labels.shape == labels.shape and out_labels.dtype == tf.float32
    out = out_images.numpy()
    assert out.min() >= 0 and out.max() <= 255
    changed = np.abs(out - images).reshape(len(images), -1).max(axis=1) > 0
    assert changed.mean() > 0.75  # D4 leaves 1 image in 8 as it was; the policy op changes almost all
    if policy not in MIXING_POLICIES:
        assert np.array_equal(out_labels.numpy(), labels)


@pytest.mark.parametrize("policy", MIXING_POLICIES)
def test_mixing_policies_give_soft_labels_summing_to_one(batch, policy):
    images, labels = batch
    _, out_labels = build_augmenter(policy, 1.0, N_CLASSES)(images, labels, seed=11)
    out = out_labels.numpy()
    assert np.allclose(out.sum(axis=1), 1.0, atol=1e-5)
    assert out.min() >= 0 and out.max() <= 1 + 1e-6
    assert (out.max(axis=1) < 0.999).sum() >= len(out) // 4  # many rows are genuine mixtures


def test_cutmix_label_weight_is_the_pasted_pixel_share(batch):
    """With a single image repeated but two labels, the label mix must equal the share of pixels kept."""
    images, _ = batch
    black_white = np.stack([np.zeros_like(images[0]), np.full_like(images[0], 255)] * 16)
    labels = np.eye(N_CLASSES, dtype=np.float32)[[0, 1] * 16]
    out_images, out_labels = build_augmenter("cutmix", 1.0, N_CLASSES)(black_white, labels, seed=2)
    white_share = (out_images.numpy()[..., 0] > 127).mean(axis=(1, 2))
    assert np.allclose(out_labels.numpy()[:, 1], white_share, atol=1e-5)


def test_orientation_is_an_exact_d4_element_and_uses_all_eight(embedded):
    images = embedded.images[:64].astype(np.float32)
    augmenter = build_augmenter("light", 1.0, N_CLASSES)
    with augmenter._stream.bound(tf.constant([4, 2], tf.int64)):
        oriented = augmenter._orient(tf.constant(images)).numpy()
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
    with augmenter._stream.bound(tf.constant([3, 1], tf.int64)):
        oriented = augmenter._orient(tf.constant(images)).numpy()
    for original, out in zip(images, oriented):
        views = [original, original[::-1, ::-1], original[:, ::-1], original[::-1]]
        assert any(np.array_equal(view, out) for view in views)
    assert build_augmenter("light", 1.0, N_CLASSES)(images, labels, seed=1)[0].shape == images.shape


def test_same_key_same_output_and_other_key_differs(batch):
    images, labels = batch
    for policy in POLICIES[1:]:
        first = build_augmenter(policy, 0.7, N_CLASSES)(images, labels, seed=9)
        again = build_augmenter(policy, 0.7, N_CLASSES)(images, labels, seed=9)
        other = build_augmenter(policy, 0.7, N_CLASSES)(images, labels, seed=10)
        assert np.array_equal(first[0].numpy(), again[0].numpy()), policy
        assert np.array_equal(first[1].numpy(), again[1].numpy()), policy
        assert not np.array_equal(first[0].numpy(), other[0].numpy()), policy


def test_works_inside_tf_data_map_at_28_and_64(batch):
    images, labels = batch
    for size in (28, 64):
        resized = tf.image.resize(images[:16], (size, size)).numpy().round()
        for policy in ("randaugment", "augmix"):
            dataset = tf.data.Dataset.from_tensors((resized, labels[:16])).map(build_augmenter(policy, 1.0, N_CLASSES))
            out_images, out_labels = next(iter(dataset))
            assert out_images.shape == (16, size, size, 3) and out_labels.shape == (16, N_CLASSES)
            assert not np.array_equal(out_images.numpy(), resized)


def test_float32_output_under_a_global_mixed_float16_policy(batch):
    """The trainer sets mixed_float16 on GPUs; augmentation layers must still compute in float32."""
    import keras

    images, labels = batch
    previous = keras.config.dtype_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        augmenter = build_augmenter("light", 1.0, N_CLASSES)
    finally:
        keras.config.set_dtype_policy(previous)
    out_images, _ = augmenter(images, labels, seed=1)
    assert out_images.dtype == tf.float32


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
